"""A judge: a reward model that did not train the candidate, reading responses in its own format.

PPO learns whatever pleases the round's reward model: some of it is what your annotators want,
some is that model's blind spots (Gao et al., 2022, reward over-optimisation). A reward model PPO
never saw (trained on other data, or bigger) tells the two apart. With `evaluate.judge` it scores
both policies' responses beside the round's reward model, and `gates.min_judge_win_rate` gates on
its win-rate; its accuracy on the round's held-out feedback says how far to trust it.

A judge is a sequence classifier with one output, with its own tokenizer: a folder, Hugging Face id
or models:/ URI (a reward model this pipeline or TRL trained, or a public one). It reads a prompt
and a response as such models are trained to:
- its tokenizer has a chat template: the prompt's turns (an HH-RLHF dialogue's turns, else one user
  turn; after `chat.system_prompt`, if set) and the response as the assistant's reply, rendered by
  that template;
- an encoder's tokenizer (a [CLS]-style and a separator token, e.g. the DeBERTa reward models):
  prompt and response as the two texts of a pair;
- otherwise prompt + response + EOS as one text, as TRL's RewardTrainer and this pipeline read it.
Batches are padded on the right and the model pools as it was built to (an encoder its first token,
a decoder its last that is not padding), so a text's score does not depend on the texts beside it.
A text longer than the judge's positions loses the start of its prompt: the response and the most
recent turns are kept, and how many texts were cut is reported (`judge/truncated`).
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from tasks.config import ChatConfig
from tasks.modeling import ModelLoadError, _explain, ensure_classifier, made_up, max_positions


def check(ref: str) -> None:
    """Whether `ref` is a judge, from its config alone (no weights read): a one-output sequence
    classifier. Raises ModelLoadError saying what it is instead."""
    try:
        config = AutoConfig.from_pretrained(ref)
    except Exception as e:  # a missing folder, an unknown id, no network
        raise _explain(ref, "judge (a reward model)", e) from None
    ensure_classifier(config)  # a reward model of an architecture transformers has no classifier for, saved here
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    if config.architectures and not heads:
        raise ModelLoadError(f"judge {ref!r} is a {config.architectures[0]}, not a reward model: a judge is a "
                             "sequence classifier with one output (a ...ForSequenceClassification), as "
                             "`rlhf run` saves its reward models")
    if config.num_labels != 1:
        raise ModelLoadError(f"judge {ref!r} has {config.num_labels} outputs ({sorted(config.id2label.values())}); "
                             "a reward model gives one score (num_labels 1)")


def load_judge(ref: str, device: torch.device | None = None):
    """(model, tokenizer) of a judge on `device` (the CPU by default): float32 on a CPU, the
    checkpoint's own dtype on a GPU. A model that is not a one-output sequence classifier with a
    trained head is refused, with what it is."""
    check(ref)
    device = device or torch.device("cpu")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            ref, dtype="auto" if device.type == "cuda" else torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except Exception as e:
        raise _explain(ref, "judge (a reward model)", e) from None
    if made_up(tokenizer):
        raise ModelLoadError(f"judge {ref!r} has no tokenizer (none is saved there: the one transformers makes up "
                             "instead holds special tokens only); save its tokenizer into its folder "
                             "(tokenizer.save_pretrained)")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelLoadError(f"judge {ref!r}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                             f"{vocab}: not the tokenizer it was trained with")
    if info["missing_keys"]:  # e.g. a base model: its score head would be random
        raise ModelLoadError(f"judge {ref!r} has no trained score head (would start random: "
                             f"{', '.join(sorted(info['missing_keys'])[:3])}): a judge is a reward model saved "
                             "with its head")
    if model.config.pad_token_id is None:  # decoders pool at the last token that is not padding
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ModelLoadError(f"judge {ref!r}: its tokenizer has neither a pad nor an EOS token to pad a batch with")
        model.config.pad_token_id = pad
    tokenizer.truncation_side = "left"  # a text cut to fit loses the start of its prompt
    return model.to(device).eval(), tokenizer


def positions(model, tokenizer) -> int | None:
    """The most tokens the judge reads: its positions, or its tokenizer's model_max_length if fewer."""
    limits = [n for n in (max_positions(model.config), tokenizer.model_max_length) if n and n < 10**9]
    return min(limits) if limits else None


def encode(tokenizer, prompt: str, response: str, limit: int | None = None,
           system_prompt: str | None = None) -> tuple[dict[str, list[int]], bool]:
    """What the judge reads for a prompt and a response (see the module's docstring), and whether
    it had to be cut to `limit` tokens (from the start of the prompt)."""
    if tokenizer.chat_template:
        turns = ChatConfig(template=True, hh_dialogue=True, system_prompt=system_prompt).messages(
            prompt, response.strip())
        enc = dict(tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False))
    elif tokenizer.cls_token is not None and tokenizer.sep_token is not None:  # an encoder: a text pair
        reply = response.strip()
        enc = dict(tokenizer(prompt, reply))
        if limit is None or len(enc["input_ids"]) <= limit:
            return enc, False
        # the prompt's start goes (truncation_side left), its last turns stay; the reply too, if it
        # fits alone (else both are cut)
        ways = ["only_first", "longest_first"] if len(tokenizer(reply)["input_ids"]) < limit - 1 else ["longest_first"]
        for way in ways:
            enc = dict(tokenizer(prompt, reply, max_length=limit, truncation=way))
            if len(enc["input_ids"]) <= limit:
                break
        return enc, True
    else:
        enc = dict(tokenizer(prompt + response + (tokenizer.eos_token or "")))
    if limit is None or len(enc["input_ids"]) <= limit:
        return enc, False
    ids = enc["input_ids"]
    keep = 1 if ids[0] in tokenizer.all_special_ids else 0  # a BOS stays first
    cut = {k: v[:keep] + v[len(v) - (limit - keep):] for k, v in enc.items()}
    return cut, True


@torch.no_grad()
def scores(model, tokenizer, prompts: list[str], responses: list[str], system_prompt: str | None = None,
           batch_size: int = 32) -> tuple[torch.Tensor, int]:
    """The judge's score of every (prompt, response), (N,), and how many were cut to fit it.
    Batched by length (less padding), right-padded, in the given order out."""
    limit = positions(model, tokenizer)
    encoded = [encode(tokenizer, p, r, limit, system_prompt) for p, r in zip(prompts, responses)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]["input_ids"]))
    device = next(model.parameters()).device
    out = torch.zeros(len(encoded))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = right_pad([encoded[i][0] for i in rows], model.config.pad_token_id)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0]
        out[rows] = logits.float().cpu()
    return out, sum(cut for _, cut in encoded)


def right_pad(encodings: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Encodings as one batch padded on the right: input_ids with pad_id, attention_mask (made if
    absent) and any other field (token_type_ids) with 0."""
    width = max(len(e["input_ids"]) for e in encodings)
    fields = {k for e in encodings for k in e} | {"attention_mask"}
    batch = {k: torch.full((len(encodings), width), pad_id if k == "input_ids" else 0, dtype=torch.long)
             for k in fields}
    for i, e in enumerate(encodings):
        n = len(e["input_ids"])
        for k in fields:
            batch[k][i, :n] = torch.tensor(e[k] if k in e else [1] * n)
    return batch


def accuracy(model, tokenizer, pairs: list[dict], system_prompt: str | None = None) -> dict:
    """How often the judge scores a pair's chosen response above its rejected one: whether it agrees
    with your annotators, as the round's reward model's held-out accuracy says of that model."""
    if not pairs:
        return {"accuracy": float("nan"), "n": 0, "truncated": 0}
    prompts = [p["prompt"] for p in pairs]
    chosen, cut_c = scores(model, tokenizer, prompts, [p["chosen"] for p in pairs], system_prompt)
    rejected, cut_r = scores(model, tokenizer, prompts, [p["rejected"] for p in pairs], system_prompt)
    return {"accuracy": float((chosen > rejected).float().mean()), "n": len(pairs), "truncated": cut_c + cut_r}


def agreement(reward_a: list[float], reward_b: list[float], judge_a: list[float], judge_b: list[float]) -> float:
    """Share of pairs (a_i, b_i) where the reward model and the judge prefer the same side (a tie on
    one side only counts half). Low: what PPO learnt to please is not what the judge values. Pass
    pairs whose responses differ: a response against itself shows no preference, only rounding."""
    same = [float((ra - rb) * (ja - jb) > 0) if (ra - rb) * (ja - jb) != 0 else 1.0 if ra == rb and ja == jb else 0.5
            for ra, rb, ja, jb in zip(reward_a, reward_b, judge_a, judge_b)]
    return sum(same) / len(same) if same else float("nan")


def sample_pairs(pairs: list[dict], n: int = 1024) -> list[dict]:
    """At most `n` of the pairs, the same ones every round while they remain: the lowest ids (ids
    are hashes of a pair's texts, see tasks.records.record_id)."""
    return sorted(pairs, key=lambda p: p["id"])[:n]
