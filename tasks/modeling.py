"""Loading models and tokenizers through the same `from_pretrained` path users take.

A model reference is a folder, a Hugging Face id, or a registry URI (`models:/<name>/<version>`
or `models:/<name>@<alias>`, resolved by tasks.tracking). Errors say which of these failed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tasks.errors import ModelLoadError  # noqa: F401  (raised here; importers catch it from here too)


def _explain(ref: str, kind: str, err: Exception) -> ModelLoadError:
    looks_local = ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1
    if looks_local and not Path(ref).expanduser().exists():
        hint = f"the folder {ref} does not exist"
    elif Path(ref).expanduser().is_dir():
        hint = f"the folder {ref} is not a saved {kind} (save_pretrained output with config.json)"
    else:
        hint = (f"{ref!r} is neither a folder nor a Hugging Face id that could be loaded "
                "(no network? set HF_HUB_OFFLINE=1 and use a local folder)")
    return ModelLoadError(f"cannot load {kind} {ref!r}: {hint}. ({type(err).__name__}: {str(err)[:300]})")


def load_tokenizer(ref: str | Path):
    ref = str(ref)
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors...
        raise _explain(ref, "tokenizer", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 style models ship no pad token
    if tok.eos_token is None:
        raise ModelLoadError(f"tokenizer {ref!r} has no EOS token; responses could never end")
    tok.padding_side = "left"  # prompts are left-padded so responses start at one column
    return tok


def load_policy(ref: str | Path, dtype: torch.dtype = torch.float32):
    try:
        return AutoModelForCausalLM.from_pretrained(str(ref), dtype=dtype)
    except Exception as e:
        raise _explain(str(ref), "causal language model", e) from None


def load_reward(ref: str | Path, pad_token_id: int, dtype: torch.dtype = torch.float32):
    """A sequence classifier with one output: a reward model, or a causal LM given a score head."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(ref), num_labels=1, dtype=dtype)
    except Exception as e:
        raise _explain(str(ref), "reward model", e) from None
    model.config.pad_token_id = pad_token_id
    return model


def pair_token_length(tokenizer, prompt: str, chosen: str, rejected: str) -> int:
    """Tokens of the longer of prompt+chosen and prompt+rejected (as the reward model reads them)."""
    return max(len(tokenizer(prompt + chosen)["input_ids"]), len(tokenizer(prompt + rejected)["input_ids"]))


def save(model, tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 256) -> list[str]:
    """Sample one response per prompt; returns the decoded text after the prompt (no EOS)."""
    from tasks.ppo.core import truncate_after_eos
    from tasks.ppo.rollout import sample

    generator = torch.Generator().manual_seed(seed)
    model.eval()
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        out = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, temperature,
                     tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        out = truncate_after_eos(out, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
    """Reward of prompt + response + EOS (as RewardTrainer saw them in training), (N,).

    The batch is left-padded, so position ids come from the attention mask: without them a text's
    positions shift with the longest text beside it, and so does its score (measured: 0.70 alone,
    -1.02 beside a longer text, same model and text).
    """
    from tasks.ppo.rollout import position_ids_from_mask

    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [p + r + tokenizer.eos_token for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         position_ids=position_ids_from_mask(enc["attention_mask"])).logits[:, 0].float())
    return torch.cat(out) if out else torch.zeros(0)
