"""Loading models and tokenizers through the same `from_pretrained` path users take.

A model reference is a folder, a Hugging Face id, or a registry URI (`models:/<name>/<version>`
or `models:/<name>@<alias>`, resolved by tasks.tracking). Errors say which of these failed.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSequenceClassification, AutoTokenizer)

from tasks.errors import ModelLoadError  # noqa: F401  (raised here; importers catch it from here too)

if TYPE_CHECKING:  # annotations only: this module imports no pydantic, so the bench on a GPU machine can use it
    from tasks.config import ChatConfig


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


def load_tokenizer(ref: str | Path, chat: ChatConfig | None = None):
    """The tokenizer of a folder or Hugging Face id, left-padding, with a pad token. With `chat`
    (params.yaml `chat`, when chat.template is true): its chat template is checked, and its EOS
    becomes the token that ends the assistant's turn in that template (see `end_of_turn`)."""
    ref = str(ref)
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors...
        raise _explain(ref, "tokenizer", e) from None
    if made_up(tok):
        raise ModelLoadError(f"cannot load tokenizer {ref!r}: none is saved there (the one transformers makes up "
                             "instead holds special tokens only); save the model's tokenizer into its folder "
                             "(tokenizer.save_pretrained)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 style models ship no pad token
    if tok.eos_token is None:
        raise ModelLoadError(f"tokenizer {ref!r} has no EOS token; responses could never end")
    tok.padding_side = "left"  # prompts are left-padded so responses start at one column
    if chat is not None:
        turn_end = end_of_turn(tok, ref, chat)
        if turn_end != tok.eos_token:  # e.g. Gemma's <end_of_turn> where its EOS is <eos>
            if ref not in _TOLD:  # once a process: a stage loads the tokenizer up to three times
                print(f"chat.template: {ref} ends the assistant's turn with {turn_end!r}, not its EOS "
                      f"{tok.eos_token!r}: responses end at {turn_end!r}")
                _TOLD.add(ref)
            tok.eos_token = turn_end
    return tok


def made_up(tokenizer) -> bool:
    """Whether `tokenizer` is the empty one transformers makes up where a folder holds none: special
    tokens only (1 for GPT-2), every text read as nothing."""
    return len(tokenizer) <= len(set(tokenizer.all_special_ids))


PROBE = "rlhf-pipeline probe reply"
_TOLD: set[str] = set()


def render(tokenizer, chat: ChatConfig, prompt: str, reply: str | None = None) -> str:
    """The chat template's text of a prompt's turns: with `reply`, closed by the assistant's
    turn; without, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(chat.messages(prompt, reply), add_generation_prompt=reply is None,
                                         tokenize=False, **chat.template_kwargs)


def end_of_turn(tokenizer, ref: str, chat: ChatConfig) -> str:
    """The special token the tokenizer's chat template writes right after an assistant's message
    (<|im_end|> for Qwen, <|eot_id|> for Llama 3, <end_of_turn> for Gemma): where a response ends."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"chat.template is true but the tokenizer of {ref!r} has no chat template "
                             "(a base model's usually has none): use a chat or instruct model, give the tokenizer "
                             "a chat_template, or set chat.template to false and write prompts as text")
    try:
        text = render(tokenizer, chat, "hi", PROBE)
    except Exception as e:  # a template's own checks raise jinja's TemplateError or anything else
        turns = "a system, a user and an assistant turn" if chat.system_prompt is not None else \
            "a user turn and an assistant turn"
        raise ModelLoadError(f"the chat template of {ref!r} cannot render {turns} "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    after = text.split(PROBE, 1)[1].lstrip() if PROBE in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in tokenizer.all_special_ids:
        raise ModelLoadError(f"the chat template of {ref!r} does not end an assistant's turn with a special token "
                             f"(it writes {after[:40]!r} after the reply), so a response could never end: "
                             "register that end-of-turn token as a special token of the tokenizer")
    return tokenizer.convert_ids_to_tokens(ids[0])


def encode_prompt(tokenizer, prompt: str, chat: ChatConfig | None = None) -> list[int]:
    """The tokens a policy is given for a prompt. Plain: the text as the tokenizer encodes it, its
    BOS included. `chat`: the prompt as a user turn of the tokenizer's chat template (after the
    system turn, if any) with the assistant's turn opened, encoded without adding special tokens
    (the template writes its own BOS; the tokenizer's on top would give Llama 3 two)."""
    if chat is None:
        return tokenizer(prompt)["input_ids"]
    return tokenizer(render(tokenizer, chat, prompt), add_special_tokens=False)["input_ids"]


def encode_sequence(tokenizer, prompt: str, response: str, chat: ChatConfig | None = None) -> list[int]:
    """What the reward model reads, in training and when scoring: prompt, response, EOS. Plain: the
    joined text encoded at once, as TRL's RewardTrainer encodes text. `chat`: the prompt's turn as
    `encode_prompt` gives it to the policy, then the reply and the end of its turn, as PPO hands the
    reward model a rollout."""
    if chat is None:
        return tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    return (encode_prompt(tokenizer, prompt, chat) + tokenizer(response, add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id])


def max_positions(config) -> int | None:
    """How many positions (prompt + response tokens) a model config allows; None if it says not. An
    image-text model's (a Gemma 3 reward model's) are its language model's."""
    config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def compute_device() -> torch.device:
    """Where sampling and scoring run outside PPO (collect, evaluate, serving): the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _config(ref: str):
    """The config of a folder or id; None where transformers reads none (from_pretrained then says why)."""
    try:
        return AutoConfig.from_pretrained(ref)
    except Exception:
        return None


def load_policy(ref: str | Path, dtype: torch.dtype = torch.float32):
    """The causal LM of a folder or Hugging Face id; of an image-text model (Gemma 3 from 4B, Gemma 4,
    Mistral 3, as they are released) its language model alone: see `language_model`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    ref = str(ref)
    config = _config(ref)
    # Mistral 3 and other image-text models transformers gives no causal-LM class: loaded as what they are
    auto = (AutoModelForImageTextToText if config is not None and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
            and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING else AutoModelForCausalLM)
    try:
        model = auto.from_pretrained(ref, dtype=dtype)
    except Exception as e:
        raise _explain(ref, "causal language model", e) from None
    return language_model(model, ref)


def language_model(model, ref: str = "the model"):
    """`model` itself where it is a causal LM of text; an image-text model's language model alone, as
    the causal LM transformers has for its text config (Gemma 4's Gemma4ForCausalLM): the same
    modules (trunk and LM head, no copy), without the vision (and audio) towers, which RLHF on text
    never runs. What is saved of it then is that text model: it loads, serves and trains as one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text = model.config.get_text_config()
    if text is model.config:
        return model
    lm_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text), None)
    if lm_class is not None and isinstance(model, lm_class):  # already the text model, under the whole config
        return model
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if lm_class is None or decoder is model or head is None:
        raise ModelLoadError(f"cannot load {ref!r} as a causal language model: it is a {type(model).__name__}, and "
                             f"transformers has no text-only causal LM for its language model "
                             f"({type(text).__name__}) to train on text; set models.policy to a text model")
    with torch.device("meta"):  # the shell alone: its trunk and head are the model's own modules
        lm = lm_class(text)
    trunk_name = lm.base_model_prefix
    if type(getattr(lm, trunk_name, None)) is not type(decoder):
        raise ModelLoadError(f"cannot load {ref!r} as a causal language model: its language model is a "
                             f"{type(decoder).__name__}, where {lm_class.__name__} holds a "
                             f"{type(getattr(lm, trunk_name, None)).__name__}; set models.policy to a text model")
    setattr(lm, trunk_name, decoder)
    lm.set_output_embeddings(head)
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"cannot load {ref!r} as a causal language model: {lm_class.__name__} has weights "
                             f"its {type(model).__name__} does not ({', '.join(left[:3])}); "
                             "set models.policy to a text model")
    # tied as they are in the model: the wrapper's config can say so where its text config does not (Mistral 3)
    text.tie_word_embeddings = head.weight is decoder.get_input_embeddings().weight
    lm.generation_config = model.generation_config  # its EOS tokens, its sampling defaults
    return lm.train(model.training)  # (from_pretrained's: eval)


def reward_head_problem(config) -> str | None:
    """Why no reward model can start from a model of this config, None where one can: transformers
    has a sequence classifier for its architecture, or `ensure_classifier` makes one."""
    if ensure_classifier(config):
        return None
    return (f"transformers has no sequence-classification model for {type(config).__name__} "
            f"(model_type {config.model_type!r}) and no decoder trunk to give a score head to, so a reward model "
            "cannot start from it; set models.reward to a model that has one and the same tokenizer (a reward "
            "model trained elsewhere on this vocabulary, or a Llama, Qwen, Gemma, Phi-3 or GPT-2 made with it)")


def ensure_classifier(config) -> bool:
    """Whether AutoModelForSequenceClassification can build a model of this config, making it so
    where it can: for the decoder-only architectures transformers has a trunk for but no sequence
    classifier (IBM's Granite, Cohere, OLMoE, LFM2, Gemma 4's text model...), transformers' own
    GenericForSequenceClassification (the trunk, a linear `score` head, the score read at the last
    token that is not padding, as Llama's classifier) is made for the architecture and registered
    in this process. It loads the causal LM's trunk weights as the classifiers transformers ships
    do, and saves and loads like them, in any process that calls this first (load_reward does)."""
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING

    if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:  # transformers' own, or registered here
        return True
    if type(config) not in MODEL_MAPPING:
        return False
    trunk = MODEL_MAPPING[type(config)]
    family = next((c for c in trunk.__mro__[1:] if c.__name__.endswith("PreTrainedModel")), None)
    if (family is None or not trunk.__name__.endswith("Model")  # a multimodal wrapper, not a trunk
            or "decoder_input_ids" in inspect.signature(trunk.forward).parameters):  # an encoder-decoder pair
        return False
    name = trunk.__name__.removesuffix("Model") + "ForSequenceClassification"
    # the family's name for its trunk (CodeGen's `transformer`), so the causal LM's weights load into it
    classifier = type(name, (GenericForSequenceClassification, family), {
        "__module__": __name__, "config_class": type(config), "base_model_prefix": family.base_model_prefix})
    AutoModelForSequenceClassification.register(type(config), classifier, exist_ok=True)
    return True


def load_reward(ref: str | Path, pad_token_id: int, dtype: torch.dtype = torch.float32):
    """A sequence classifier with one output: a reward model, or a causal LM given a score head
    (any decoder-only architecture: see ensure_classifier). Only the score head may start new: a
    checkpoint whose trunk would not load into the classifier (other weight names) is refused."""
    ref = str(ref)
    config = _config(ref)
    problem = reward_head_problem(config) if config is not None else None
    if problem:
        raise ModelLoadError(f"cannot load reward model {ref!r}: {problem}")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(ref, num_labels=1, dtype=dtype,
                                                                         output_loading_info=True)
    except Exception as e:
        raise _explain(ref, "reward model", e) from None
    score = getattr(model, "score", None)
    head = {f"score.{n}" for n, _ in score.named_parameters()} if isinstance(score, torch.nn.Module) else set()
    random_trunk = sorted(set(info["missing_keys"]) - head)
    if random_trunk:
        raise ModelLoadError(f"cannot load reward model {ref!r}: {len(random_trunk)} of its trunk's weights are not "
                             f"in the checkpoint under the names {type(model).__name__} reads (e.g. "
                             f"{', '.join(random_trunk[:3])}), so they would start random; set models.reward to "
                             "a model of this tokenizer that loads as a sequence classifier")
    model.config.pad_token_id = pad_token_id
    return model


def pair_token_length(tokenizer, prompt: str, chosen: str, rejected: str, chat: ChatConfig | None = None) -> int:
    """Tokens of the longer of prompt+chosen and prompt+rejected as the reward model reads them,
    not counting the EOS after them."""
    return max(len(encode_sequence(tokenizer, prompt, chosen, chat)),
               len(encode_sequence(tokenizer, prompt, rejected, chat))) - 1


def save(model, tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 256, chat: ChatConfig | None = None,
                   static: bool | None = None) -> list[str]:
    """Sample one response per prompt on the model's device; returns the decoded text after the
    prompt (no EOS). `static`: through PPO's static-cache decoder (a CUDA graph per token), by
    default on a GPU for the models it covers; else HF's cache, token by token."""
    from tasks.ppo import static_decode
    from tasks.ppo.core import truncate_after_eos
    from tasks.ppo.rollout import left_pad, sample

    device = _device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad([encode_prompt(tokenizer, p, chat) for p in prompts[start:start + batch_size]],
                             tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        width = ids.shape[1] + max_new_tokens
        if static if static is not None else device.type == "cuda" and static_decode.supports(model, width):
            decoder = static_decode.StaticDecoder(model, len(ids), ids.shape[1], max_new_tokens)
            out = decoder.sample(ids, mask, temperature, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        else:
            out = sample(model, ids, mask, max_new_tokens, temperature, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, generator)
        out = truncate_after_eos(out, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)
    return texts


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64,
                chat: ChatConfig | None = None) -> torch.Tensor:
    """Reward of prompt + response + EOS (`encode_sequence`: as RewardTrainer saw them in training), (N,).

    The batch is left-padded, so position ids come from the attention mask: without them a text's
    positions shift with the longest text beside it, and so does its score (measured: 0.70 alone,
    -1.02 beside a longer text, same model and text).
    """
    from tasks.ppo.rollout import left_pad, position_ids_from_mask

    model.eval()
    device = _device(model)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad([encode_sequence(tokenizer, p, r, chat)
                              for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])],
                             tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        out.append(model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, 0]
                   .float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 128,
                      chat: ChatConfig | None = None):
    """Sum of log-probs of each response (with its EOS) given its prompt, and its token count. (N,), (N,)"""
    from tasks.ppo.core import response_mask
    from tasks.ppo.rollout import left_pad, response_forward

    device = _device(model)
    totals, counts = [], []
    for i in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = left_pad([encode_prompt(tokenizer, p, chat) for p in prompts[i:i + batch_size]],
                                           tokenizer.pad_token_id)
        r_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in responses[i:i + batch_size]]
        T = max(len(r) for r in r_ids)
        resp = torch.full((len(r_ids), T), tokenizer.pad_token_id)
        for j, r in enumerate(r_ids):
            resp[j, :len(r)] = torch.tensor(r)
        mask = response_mask(resp, tokenizer.eos_token_id).to(device)
        # PPO's scoring pass, as the rollout reads log-probs (the LM head on the response's positions only)
        lp = response_forward(model, prompt_ids.to(device), prompt_mask.to(device), resp.to(device), mask, 1.0,
                              with_value=False, with_entropy=False)["logprobs"] * mask
        totals.append(lp.sum(1).cpu())
        counts.append(mask.sum(1).cpu())
    return torch.cat(totals), torch.cat(counts)
