"""Rollout engine: batched sampling with a KV cache, and batched scoring passes.

Prompts are left-padded so every row's last prompt token sits at the same column and the
response starts at column P for all rows. Position ids are computed from the attention mask,
so padding never shifts a row's positions. Imports torch and transformers only.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from tasks.ppo.core import logprobs_and_entropy


class PolicyWithValue(nn.Module):
    """A causal LM and its value function, trained together.

    By default a scalar value head on the LM's own last hidden state (one trunk, two heads: one
    model's memory and passes). With `critic` (a Critic: a copy of the reward model, as InstructGPT
    and TRL start theirs) the values come from that separate model: the value loss never moves the
    policy's trunk, at the cost of a second trunk's passes, gradients and Adam state.
    """

    def __init__(self, lm: nn.Module, critic: "Critic | None" = None):
        super().__init__()
        self.lm, self.critic = lm, critic
        if critic is not None:
            return
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        # in the dtype of the weights that train (bf16 weights: a bf16 head; LoRA's float32 adapters
        # over a bf16 base: a float32 head)
        trains = [p.dtype for p in lm.parameters() if p.requires_grad] or [next(lm.parameters()).dtype]
        self.value_head = nn.Linear(hidden, 1, dtype=trains[0])
        nn.init.zeros_(self.value_head.weight)  # start from V = 0: no bias in the first advantages
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        shared = self.critic is None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=shared, use_cache=False, **_keep(self.lm, logits_to_keep))
        if shared:  # (B, L); the head's input in its dtype (LoRA's float32 head over a bf16 base, no autocast)
            values = self.value_head(out.hidden_states[-1].to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            values = self.critic(input_ids, attention_mask, position_ids)  # (B, L)
        return out.logits, values


class Critic(nn.Module):
    """A value model made of a sequence classifier (a reward model): its score head applied to
    every position's last hidden state, where the classifier reads the last real token's only.
    Started from the reward model, its value at a sequence's last token is that model's score.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        trunk = getattr(classifier, getattr(classifier, "base_model_prefix", ""), None)
        score = getattr(classifier, "score", None)
        if not isinstance(trunk, nn.Module) or not isinstance(score, nn.Linear) or score.out_features != 1:
            raise ValueError(f"{type(classifier).__name__} is not a reward model a critic can start from: it needs "
                             "a Hugging Face sequence classifier with one output (a trunk and a `score` head)")
        self.trunk, self.score = trunk, score

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)[0]  # (B, L, H)
        return self.score(hidden).squeeze(-1)  # (B, L)


class PaddedHead(nn.Linear):
    """An LM head that multiplies by its weight padded to a multiple of 64 rows, then drops the pad.

    The logits are the same. With GPT-2's 50,257 rows the logits' row length is odd, and cuBLAS
    has only slow unaligned bf16 kernels for that (in generation that head took 281 us a token
    against about 15 us padded, on an H100); the scoring and update passes have the same head.
    """

    @classmethod
    def wrapping(cls, head: nn.Linear) -> "PaddedHead":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = head.in_features, head.out_features
        new.weight, new.bias = head.weight, head.bias  # the same parameters: tied weights stay tied
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.out_features % 64
        bias = None if self.bias is None else F.pad(self.bias, (0, pad))
        return F.linear(x, F.pad(self.weight, (0, 0, 0, pad)), bias)[..., :self.out_features]


def pad_lm_head(lm: nn.Module) -> bool:
    """Give `lm` a PaddedHead over its own LM-head parameters, where that changes anything.

    State-dict keys, tied weights and saved checkpoints are unchanged. Left alone: heads already
    a multiple of 64, heads that are not a plain nn.Linear, and heads with hooks (device maps).
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if (type(head) is not nn.Linear or head.out_features % 64 == 0 or head._forward_hooks
            or head._forward_pre_hooks or hasattr(head, "_hf_hook")):
        return False
    lm.set_output_embeddings(PaddedHead.wrapping(head))
    return True


def base_model(lm: nn.Module) -> nn.Module:
    """The Hugging Face model itself: inside a PEFT model, the one its adapters were put into."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def _keep(lm: nn.Module, n: int) -> dict:
    """HF's `logits_to_keep`: the LM head runs on the last n positions only (the response's)."""
    model = base_model(lm)  # PEFT passes it through
    return {"logits_to_keep": n} if n and "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) one token per row drawn from softmax(logits / temperature).

    The exponential race: argmax of p_i / E_i with E_i ~ Exp(1) picks i with probability p_i.
    Unlike torch.multinomial it never waits for the GPU, and it draws one number per logit, so
    both samplers consume a generator identically. Temperature 0 is greedy: the argmax, no draw.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(lm: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
           temperature: float, eos_id: int, pad_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, P) left-padded prompts -> (B, T<=max_new_tokens) sampled responses, pad after EOS.

    One forward over the prompts fills the KV cache, then one token per step for the whole
    batch; it stops as soon as every row has emitted EOS.
    """
    B = prompt_ids.shape[0]
    attention_mask = prompt_mask.long()
    position_ids = position_ids_from_mask(attention_mask)
    out = lm(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        next_token = sample_token(logits.float(), temperature, generator)  # (B,)
        next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
        tokens.append(next_token)
        done |= next_token == eos_id
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = lm(input_ids=next_token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return torch.stack(tokens, dim=1)


def left_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, width) token ids padded on the left (width: the longest by default), and their attention
    mask: every sequence ends at the last column, so a response sampled after it starts at one."""
    T = max(len(s) for s in sequences) if width is None else width
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


def cat_responses(parts: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Responses sampled in chunks, each (B_i, T_i), -> one (sum B_i, max T_i), right-padded with pad_id."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad_id) for p in parts])


def response_forward(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     responses: torch.Tensor, resp_mask: torch.Tensor, temperature: float,
                     with_value: bool, with_entropy: bool = True) -> dict[str, torch.Tensor]:
    """Log-probabilities (and values, entropy) of the response tokens, all (B, T).

    The logit at column P-1+t predicts response token t, and the value there is the value of
    the state before token t is emitted. The LM head runs on those T columns only.
    """
    P, T = prompt_ids.shape[1], responses.shape[1]
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), resp_mask.long()], dim=1)
    position_ids = position_ids_from_mask(attention_mask)
    out = {}
    if with_value:
        logits, values = model(input_ids, attention_mask, position_ids, logits_to_keep=T + 1)
        out["values"] = values[:, P - 1:-1].float()
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **_keep(model, T + 1)).logits
    logits = logits[:, -(T + 1):-1]  # (B, T, V): all columns, or the T + 1 kept
    if temperature != 1.0:
        logits = logits / temperature
    out["logprobs"], entropy = logprobs_and_entropy(logits, responses, with_entropy)
    if with_entropy:
        out["entropy"] = entropy
    return out


@torch.no_grad()
def reward_scores(reward_model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  responses: torch.Tensor, resp_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model score of prompt + response, read at the last real token."""
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), resp_mask.long()], dim=1)
    position_ids = position_ids_from_mask(attention_mask)
    # Same call as TRL's RewardTrainer makes in training: the model pools at its last non-pad token.
    logits = reward_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits  # (B, 1)
    return logits[:, 0].float()
