"""PPO's hyper-parameters: a plain dataclass, importable without torch (the pipeline's config
reads it in every stage, most of which never run PPO)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Settings a resumed run may change: how long it goes, how often it saves, and how it computes
# the same numbers (chunked passes and either decoder give the same results). Any other change
# makes a checkpoint another run's.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "micro_batch_size", "generation")


@dataclass
class PPOConfig:
    """PPO hyper-parameters (the `ppo` section of params.yaml). Each field's docstring is its
    description in the Prefect run form (pydantic reads them; this module does not import it)."""

    __pydantic_config__ = {"use_attribute_docstrings": True, "extra": "forbid"}  # unknown keys: an error

    steps: int = 40
    """PPO iterations, one rollout batch each"""
    batch_size: int = 128
    """episodes per rollout"""
    minibatches: int = 4
    """minibatches per PPO epoch"""
    epochs: int = 4
    """PPO epochs over each rollout"""
    micro_batch_size: int = 0
    """episodes per forward/backward pass, to bound memory: the scoring passes and each minibatch's update run in chunks of this size, gradients accumulated (same results); 0 = whole"""
    generation_batch_size: int = 0
    """episodes sampled at once, to bound the KV cache (it grows with them; a multiple of them must make up batch_size); 0 = the whole batch"""
    lr: float = 2e-4
    """Adam learning rate (policy and value function), at the first step: lr_schedule says how it goes on"""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """linear: lr decays linearly towards 0 over the steps, as in lm-human-preferences and TRL's PPO (a resumed run given more steps decays over its new length from there); constant: lr throughout"""
    max_new_tokens: int = 10
    """longest response, in tokens"""
    temperature: float = 1.0
    """sampling temperature"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator"""
    kl_coef: float = 0.1
    """initial KL penalty coefficient"""
    target_kl: float | None = 3.0
    """adaptive controller target, nats per sequence; None = fixed coefficient"""
    kl_horizon: int = 2000
    """adaptive controller horizon, in episodes"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value clip"""
    vf_coef: float = 0.5
    """value loss weight"""
    value_model: Literal["shared", "reward"] = "shared"
    """shared: a value head on the policy's own trunk (one model: the least memory and time); reward: a separate critic started from the round's reward model, as InstructGPT and TRL (the value loss never moves the policy; a second model trained, with lora_rank its adapters)"""
    whiten_rewards: bool = False
    """whiten per-token rewards before GAE"""
    normalize_scores: bool = True
    """scale the reward model's scores to mean 0, std 1 over the first rollout (the starting policy's responses), as lm-human-preferences normalizes its reward model: kl_coef, target_kl and missing_eos_penalty then mean the same whatever the reward model's scale"""
    missing_eos_penalty: float | None = 1.0
    """subtracted from the score of a response that never ends"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    checkpoint_every: int = 10
    """save a resumable checkpoint every N iterations; 0 = never"""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """bf16: the passes run under bf16 autocast over float32 weights (generation over a bf16 copy of them, refreshed each rollout); no: in the weights' own dtype; auto: bf16 on a GPU that has it, no on a CPU"""
    generation: Literal["auto", "static", "dynamic"] = "auto"
    """static KV cache (+ CUDA graph on GPU) for GPT-2, Llama, Qwen, Mistral, Granite, Phi-3, Gemma 2 to 4, OLMo and GPT-NeoX (Pythia) models"""
    lora_rank: int = 0
    """LoRA rank of the policy's adapters, for models too large to train whole (reference = adapters off); 0 = off"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_rank"""
    processes: int = 1
    """processes the train_policy stage runs PPO on, one per GPU (CPU processes without one); each its own batch"""
    fsdp: bool = False
    """shard policy, reference and reward model over the processes (FSDP) instead of a whole copy each (DDP)"""

    def __post_init__(self):
        positive = ["steps", "batch_size", "minibatches", "epochs", "lr", "max_new_tokens", "temperature",
                    "kl_horizon", "cliprange", "cliprange_value", "max_grad_norm"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"ppo.{name} must be > 0, got {getattr(self, name)!r}")
        if self.batch_size % self.minibatches:
            raise ValueError(f"ppo.batch_size ({self.batch_size}) must be a multiple of "
                             f"ppo.minibatches ({self.minibatches})")
        if self.generation_batch_size > 0 and self.batch_size % self.generation_batch_size:
            raise ValueError(f"ppo.batch_size ({self.batch_size}) must be a multiple of "
                             f"ppo.generation_batch_size ({self.generation_batch_size})")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"ppo.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError(f"ppo.lam must be in [0, 1] and ppo.gamma in (0, 1], got {self.lam}, {self.gamma}")
        for name in ["kl_coef", "vf_coef", "checkpoint_every", "lora_rank", "micro_batch_size", "generation_batch_size"]:
            if not getattr(self, name) >= 0:
                raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"ppo.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not self.processes >= 1:
            raise ValueError(f"ppo.processes must be >= 1, got {self.processes!r}")
        if self.fsdp and self.processes < 2:
            raise ValueError("ppo.fsdp shards the models over ppo.processes: set ppo.processes to 2 or more")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"ppo.mixed_precision must be 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        if self.value_model not in ("shared", "reward"):
            raise ValueError(f"ppo.value_model must be 'shared' or 'reward', got {self.value_model!r}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"ppo.lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.generation not in ("auto", "static", "dynamic"):
            raise ValueError(f"ppo.generation must be 'auto', 'static' or 'dynamic', got {self.generation!r}")
