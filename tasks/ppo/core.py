"""PPO math for language models, as small pure functions (imports torch only).

Shapes: B episodes, T response tokens. `mask` is 1.0 on response tokens up to and including
the first EOS, 0.0 after it. The recipe follows Ziegler et al. (2019), InstructGPT and
"The N Implementation Details of RLHF with PPO" (Huang et al., 2024): per-token KL penalty,
score on the last token, GAE, advantage whitening, clipped policy and value losses.
"""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values for an unbiased estimate, got {int(n)}")
        var = var * n / (n - 1)  # Bessel's correction
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) index of the first True per row, T where there is none."""
    T = bools.shape[-1]
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, T)).min(-1).values


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) tokens -> (B, T) float mask: 1 up to and including the first EOS, 0 after."""
    first_eos = first_true_index(responses == eos_id)  # (B,)
    idx = torch.arange(responses.shape[1], device=responses.device)
    return (idx[None, :] <= first_eos[:, None]).float()


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace every token after the first EOS by pad (the EOS itself is kept)."""
    return torch.where(response_mask(responses, eos_id).bool(), responses, torch.full_like(responses, pad_id))


def score_normalizer(scores: torch.Tensor) -> tuple[float, float]:
    """(mean, std) that take `scores` to mean 0 and standard deviation 1: lm-human-preferences sets
    its reward model's gain and bias so on the starting policy's responses (Huang et al., "reward
    normalization"). A reward model that scores them all alike keeps its scale (std 1): dividing
    by ~0 would blow every later difference up."""
    std, mean = torch.std_mean(scores.double(), correction=0)
    return float(mean), float(std) if std > 1e-6 else 1.0


def apply_missing_eos_penalty(scores: torch.Tensor, responses: torch.Tensor, eos_id: int,
                              penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that never emits EOS (Huang et al. detail 23)."""
    if penalty is None:
        return scores
    has_eos = (responses == eos_id).any(-1)
    return torch.where(has_eos, scores, scores - penalty)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman, 2020).

    k1 = log p - log q (unbiased, can be negative); k3 = (r - 1) - log r with r = q / p
    (unbiased, always >= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float) -> torch.Tensor:
    """(B,) scores, (B, T) per-token KL -> (B, T) rewards: -kl_coef * KL on every token,
    plus the score on the last unmasked token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    rewards, values, mask: (B, T). The value after the last unmasked token is 0 (the episode
    ends there). Returns (advantages, returns), both (B, T), zero where masked.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al., 2017), a loss to minimise."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    stats = {
        "policy/clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
        "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
        "policy/ratio": masked_mean(ratio, mask),
    }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2)."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, {"value/clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax distribution."""
    return logprobs_and_entropy(logits, None)[1]


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) tokens -> (B, T) log-probabilities of those tokens."""
    return logprobs_and_entropy(logits, tokens, with_entropy=False)[0]


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor | None,
                         with_entropy: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities of `tokens` and the entropy, from one float32 copy of the logits.

    log p(token) = logit(token) - logsumexp(logits) and H = -sum(p log p): the log-softmax is
    never materialised (at GPT-2's vocabulary and PPO's batch each (B, T, V) float32 tensor is
    1.6 GB), and the scoring pass that wants both pays for one float copy, not two.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = None if tokens is None else logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:  # xlogy: 0 * log 0 = 0, so a logit of -inf (a masked token) adds nothing
        probs = torch.softmax(logits, dim=-1)
        entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return logprobs, entropy


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R]: 1 is a perfect value function, 0 no better than a constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8)


def linear_lr(lr: float, step: int, steps: int) -> float:
    """The learning rate of PPO iteration `step` (0-based) of `steps`, decayed linearly towards 0:
    `lr` at the first iteration, lr / steps at the last. lm-human-preferences anneals so
    (lrnow = lr * (1 - frac)), and TRL's PPOTrainer by its default linear schedule, stepped once
    per iteration: every minibatch update of an iteration takes that iteration's rate."""
    return lr * (1.0 - step / steps)


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the measured KL tracks a target.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n episodes per update.
    With target=None the coefficient stays fixed.
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
