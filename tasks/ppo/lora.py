"""LoRA adapters for the policy (PEFT): the frozen reference is the policy with its adapters off.

For models whose full fine-tuning does not fit: only the adapters and the value head train, so
gradients and Adam's state are a few percent of the model's size, and the reference costs no
second copy of the weights (PPOTrainer with `ref_lm=None`). The adapters go on every linear layer
but the LM head (PEFT's "all-linear", as QLoRA recommends), without dropout: PPO's training pass
must see the log-probabilities the rollout saw. Imports peft only when called.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def add_lora(lm: nn.Module, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """A PEFT model over `lm` with fresh adapters; it starts equal to `lm` (LoRA's B is zero).

    A's random init is drawn from `seed`, so a run (and a killed run resumed) is reproducible.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG where it was
        torch.manual_seed(seed)
        return get_peft_model(lm, config)


def add_critic_lora(classifier: nn.Module, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """Fresh adapters on every linear layer of a critic's trunk (a reward model's copy, in place),
    its `score` head trained whole: a critic for a model too large to train whole costs its frozen
    weights and a few percent more. The trainable weights are float32 whatever the frozen dtype."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", exclude_modules=["score"],
                        lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = inject_adapter_in_model(config, classifier)  # freezes every weight but the adapters'
    classifier.score.requires_grad_(True)
    for p in classifier.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return classifier


def load_lora(lm: nn.Module, folder: str | Path) -> nn.Module:
    """A PEFT model over `lm` with the trainable adapters saved in `folder` (save_pretrained)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(lm, str(folder), is_trainable=True)


def is_lora(lm: nn.Module) -> bool:
    """A PEFT model, whose `disable_adapter()` gives the model it was built on."""
    return hasattr(lm, "peft_config") and hasattr(lm, "disable_adapter")
