"""The PPO loop: rollout, score, advantages, minibatch epochs. Imports torch and transformers only.

One iteration, numbered as in the code below:
  1. sample a batch of prompts and generate responses with the policy;
  2. score: policy log-probs and values, reference log-probs, reward-model scores;
  3. rewards (per-token KL penalty + score on the last token), GAE, whitened advantages;
  4. several PPO epochs over shuffled minibatches (clipped policy and value losses);
  5. update the KL coefficient and report one flat dict of metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn.attention import SDPBackend, sdpa_kernel

from tasks.ppo import core, lora, static_decode
from tasks.ppo.config import RESUMABLE_CHANGES, PPOConfig
from tasks.ppo.rollout import (PolicyWithValue, cat_responses, left_pad, pad_lm_head, response_forward,
                               reward_scores, sample)


@dataclass
class Rollout:
    """One batch of episodes and everything PPO needs from it."""

    prompt_ids: torch.Tensor  # (B, P) left-padded prompt tokens
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    responses: torch.Tensor  # (B, T) response tokens, pad after the first EOS
    mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, T) log pi_old(token)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(token)
    values: torch.Tensor  # (B, T) V_old(state before token)
    scores: torch.Tensor  # (B,) reward-model score, normalized (ppo.normalize_scores), after the missing-EOS penalty
    raw_scores: torch.Tensor  # (B,) the reward model's own score
    kl: torch.Tensor  # (B, T) per-token KL estimate
    rewards: torch.Tensor  # (B, T) -kl_coef * kl, plus the score on the last token
    advantages: torch.Tensor  # (B, T) whitened GAE advantages
    returns: torch.Tensor  # (B, T) advantages + values (before whitening)
    entropy: torch.Tensor  # (B, T) policy entropy at each response position

    def minibatch(self, idx: torch.Tensor | slice) -> "Rollout":
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


class PPOTrainer:
    """Fine-tunes `policy` (a PolicyWithValue: the LM and its value head or critic) against
    `reward_model`, anchored to `ref_lm`.

    Prompts are token lists; the reward model must share the policy's tokenizer (the built-in
    scenario and the pipeline's reward stage both ensure it). `ref_lm=None` with a LoRA policy
    (tasks.ppo.lora): the reference is the policy's LM with its adapters off.

    Precision (`cfg.mixed_precision`): the passes run under bf16 autocast over the models' own
    weights (float32 as the pipeline loads them; a GPU's default), or in those weights' dtype.

    Several processes (`accelerator`, launched by `accelerate launch` or torchrun): DDP by default,
    each process a whole copy; `fsdp=True` shards the policy, reference and reward model over them
    instead (tasks.ppo.sharding), for models too large to train whole on one device.
    """

    def __init__(self, policy: PolicyWithValue, ref_lm: torch.nn.Module | None, reward_model: torch.nn.Module,
                 prompts: list[list[int]], eos_id: int, pad_id: int, cfg: PPOConfig, seed: int = 0,
                 device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None, accelerator=None, fsdp: bool = False):
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        if fsdp and accelerator is None:
            raise ValueError("fsdp=True needs an accelerator: the processes to shard the models over")
        if ref_lm is None and not lora.is_lora(policy.lm):
            raise ValueError("ref_lm=None needs a LoRA policy (tasks.ppo.lora.add_lora): its adapters off are "
                             "the reference; pass the reference model otherwise")
        critic = policy.critic
        if critic is not None and {id(p) for p in critic.parameters()} & {id(p) for p in reward_model.parameters()}:
            raise ValueError("the critic shares weights with the reward model, which stays frozen: give it a copy "
                             "of its own (load the reward model twice)")
        self.policy, self.ref_lm, self.reward_model = policy, ref_lm, reward_model
        self.prompts, self.eos_id, self.pad_id, self.cfg = prompts, eos_id, pad_id, cfg
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        for frozen in (ref_lm, reward_model):
            if frozen is not None:
                frozen.eval().requires_grad_(False)
        disable_dropout(policy)  # else the training pass's log-probs differ from the rollout's (Huang et al.)
        on_gpu = next(policy.parameters()).device.type == "cuda"
        if on_gpu:  # aligned LM-head matmuls in the scoring and update passes
            pad_lm_head(policy.lm)
            if ref_lm is not None:
                pad_lm_head(ref_lm)
        # Several processes: each rolls out its own batch (its own seed), gradients are averaged,
        # metrics are averaged so the KL controller agrees. FSDP shards before the optimizer is
        # made (it must hold the shards); DDP wraps the model and optimizer after.
        self.accelerator, self.fsdp = accelerator, fsdp
        if fsdp:
            from tasks.ppo import sharding

            n, kind = accelerator.num_processes, accelerator.device.type
            sharding.shard(policy, kind, n, inner=(policy.lm,) if critic is None else (policy.lm, critic))
            for frozen in (ref_lm, reward_model):
                if frozen is not None:
                    sharding.shard(frozen, kind, n)
        # fused on a GPU: one kernel for all parameters instead of a dozen per tensor group
        trainable = [p for p in policy.parameters() if p.requires_grad]  # with LoRA: adapters and value head or critic
        self.optimizer = torch.optim.Adam(trainable, lr=cfg.lr, eps=1e-5, fused=on_gpu or None)
        if accelerator is not None:
            if not fsdp:
                self.policy, self.optimizer = accelerator.prepare(policy, self.optimizer)
            self.device = accelerator.device
        self.autocast_dtype = autocast_dtype(cfg.mixed_precision, self.device)
        self.seed = seed
        if accelerator is not None:
            seed = seed + accelerator.process_index
        self.kl_ctl = core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.score_norm: tuple[float, float] | None = None  # (mean, std) of the first rollout's scores
        self.step = 0
        self.resumed_from: int | None = None  # the step of the checkpoint train() continued from
        self.rng = random.Random(seed)  # prompt order
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # sampling and minibatches
        self.history: list[dict[str, float]] = []
        # Every batch is left-padded to the longest prompt, so the static decoder keeps one shape.
        self.prompt_width = max(len(p) for p in prompts)
        max_len = self.prompt_width + cfg.max_new_tokens
        use_static = {"auto": static_decode.supports(self.unwrapped.lm, max_len), "static": True, "dynamic": False}
        self.decoder = None
        if use_static[cfg.generation]:
            self.decoder = static_decode.StaticDecoder(self.unwrapped.lm, self._generation_batch, self.prompt_width,
                                                       cfg.max_new_tokens, autocast_dtype=self.autocast_dtype)

    @property
    def _generation_batch(self) -> int:
        return self.cfg.generation_batch_size or self.cfg.batch_size

    @property
    def _ddp(self) -> bool:  # several processes, each with the whole model wrapped by accelerate
        return self.accelerator is not None and not self.fsdp

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.policy) if self._ddp else self.policy

    def _whole_weights(self):
        """Generation reads every weight at every token: under FSDP, gather them for the rollout."""
        if not self.fsdp:
            return contextlib.nullcontext()
        from tasks.ppo import sharding

        if self.decoder is not None:
            self.decoder.graph = None  # gathered weights may land at new addresses: capture again
        return sharding.unsharded(self.policy, leave=self.policy.critic)  # (the critic does not generate)

    # -- 1. rollout ---------------------------------------------------------------------------
    def _prompt_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = [self.prompts[self.rng.randrange(len(self.prompts))] for _ in range(self.cfg.batch_size)]
        ids, mask = left_pad(batch, self.pad_id, self.prompt_width)  # every response starts at one column
        return ids.to(self.device), mask.to(self.device)

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def _sync(self) -> float:
        if self.device.type == "cuda":  # timings must wait for the GPU's queue
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def _reference(self):
        """The frozen reference LM: its own model, or the LoRA policy's LM with the adapters off."""
        if self.ref_lm is not None:
            yield self.ref_lm
        else:
            with self.unwrapped.lm.disable_adapter():
                yield self.unwrapped.lm

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg = self.cfg
        prompt_ids, prompt_mask = self._prompt_batch()
        self.policy.eval()
        t0 = self._sync()
        parts = []  # in chunks of ppo.generation_batch_size: the KV cache holds one chunk's keys and values
        with self._autocast(), self._whole_weights():
            for start in range(0, cfg.batch_size, self._generation_batch):
                chunk = slice(start, start + self._generation_batch)
                if self.decoder is not None:
                    parts.append(self.decoder.sample(prompt_ids[chunk], prompt_mask[chunk], cfg.temperature,
                                                     self.eos_id, self.pad_id, self.generator))
                else:
                    parts.append(sample(self.unwrapped.lm, prompt_ids[chunk], prompt_mask[chunk], cfg.max_new_tokens,
                                        cfg.temperature, self.eos_id, self.pad_id, self.generator))
        responses = cat_responses(parts, self.pad_id)
        self.t_generate = self._sync() - t0
        with self._autocast():
            responses = core.truncate_after_eos(responses, self.eos_id, self.pad_id)
            mask = core.response_mask(responses, self.eos_id)
            # -- 2. score (in micro-batches: the logits of a whole batch can outgrow the device) ----
            pol, ref, scores = [], [], []
            for part in self._micro_batches(cfg.batch_size):
                batch = (prompt_ids[part], prompt_mask[part], responses[part], mask[part])
                pol.append(response_forward(self.policy, *batch, cfg.temperature, True))
                with self._reference() as ref_lm:
                    ref.append(response_forward(ref_lm, *batch, cfg.temperature, False, with_entropy=False))
                scores.append(reward_scores(self.reward_model, *batch))
            pol, ref, raw_scores = _cat(pol), _cat(ref), torch.cat(scores)
        scores = raw_scores  # (float32: reward_scores casts them)
        if cfg.normalize_scores:
            if self.score_norm is None:  # the first rollout: the starting policy's responses, every process's
                everyone = self.accelerator.gather(scores) if self.accelerator is not None else scores
                self.score_norm = core.score_normalizer(everyone)
            scores = (scores - self.score_norm[0]) / self.score_norm[1]
        scores = core.apply_missing_eos_penalty(scores, responses, self.eos_id, cfg.missing_eos_penalty)
        # -- 3. rewards and advantages --------------------------------------------------------
        kl = core.kl_penalty(pol["logprobs"], ref["logprobs"], cfg.kl_estimator) * mask
        rewards = core.compute_rewards(scores, kl, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = core.compute_gae(rewards, pol["values"], mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, mask) * mask
        return Rollout(prompt_ids, prompt_mask, responses, mask, pol["logprobs"], ref["logprobs"],
                       pol["values"] * mask, scores, raw_scores, kl, rewards, advantages, returns, pol["entropy"])

    # -- 4. PPO epochs ------------------------------------------------------------------------
    def optimize(self, ro: Rollout) -> dict[str, float]:
        cfg = self.cfg
        self.policy.train()
        stats: dict[str, list[torch.Tensor]] = {}  # kept on the device: reading one waits for the GPU
        mb_size = cfg.batch_size // cfg.minibatches
        for _ in range(cfg.epochs):
            order = torch.randperm(cfg.batch_size, generator=self.generator, device=self.device)
            for start in range(0, cfg.batch_size, mb_size):
                mb = ro.minibatch(order[start:start + mb_size])
                tokens = mb.mask.sum().clamp(min=1)
                self.optimizer.zero_grad(set_to_none=True)
                parts = self._micro_batches(mb_size)
                mb_stats: dict[str, torch.Tensor] = {}
                for i, part in enumerate(parts):
                    micro = mb.minibatch(part)
                    with self._autocast():
                        out = response_forward(self.policy, micro.prompt_ids, micro.prompt_mask, micro.responses,
                                               micro.mask, cfg.temperature, True, with_entropy=False)
                    pg_loss, pg_stats = core.ppo_policy_loss(out["logprobs"], micro.logprobs, micro.advantages,
                                                             micro.mask, cfg.cliprange)
                    vf_loss, vf_stats = core.ppo_value_loss(out["values"], micro.values, micro.returns, micro.mask,
                                                            cfg.cliprange_value)
                    # every loss is a masked mean over the minibatch's tokens: a micro-batch's mean,
                    # weighted by its share of them, sums to exactly that
                    share = micro.mask.sum() / tokens
                    with self._gradient_sync(i == len(parts) - 1):
                        self._backward((pg_loss + cfg.vf_coef * vf_loss) * share)
                    for k, v in {"loss/policy": pg_loss, "loss/value": vf_loss, **pg_stats, **vf_stats}.items():
                        mb_stats[k] = mb_stats.get(k, 0) + v.detach() * share
                if self._ddp:
                    self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(v)
        means = torch.stack([torch.stack(v).double().mean() for v in stats.values()]).tolist()  # one wait
        return dict(zip(stats, means))

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.cfg.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _backward(self, loss: torch.Tensor) -> None:
        if self._ddp:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _gradient_sync(self, sync: bool):
        """Processes average their gradients once per minibatch, after its last micro-batch."""
        if self.accelerator is None:
            return contextlib.nullcontext()
        if self.fsdp:
            self.policy.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.policy)

    # -- 5. one iteration and the loop ---------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        # cuDNN's fused attention plans each new shape on first use: on an H100 that cost the first
        # PPO step 5 s (6.2 s against 1.1 s without it, same steady-state speed), so it is left out.
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            t0 = self._sync()
            ro = self.rollout()
            t_rollout = self._sync() - t0
            lr = self.learning_rate()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            train_stats = self.optimize(ro)
            dt = self._sync() - t0
        seq_kl = core.masked_sum(ro.kl, ro.mask, dim=1)  # (B,) nats per sequence
        metrics = {
            "objective/kl": float(seq_kl.mean()),
            "objective/kl_coef": self.kl_ctl.value,
            "objective/scores": float(ro.scores.mean()),  # what PPO maximises: normalized, penalized
            "objective/raw_scores": float(ro.raw_scores.mean()),  # the reward model's
            "objective/rlhf_reward": float(ro.scores.mean() - self.kl_ctl.value * seq_kl.mean()),
            "objective/non_score_reward": float(-self.kl_ctl.value * seq_kl.mean()),
            "optimizer/lr": lr,
            "policy/entropy": float(core.masked_mean(ro.entropy, ro.mask)),
            "val/explained_var": float(core.explained_variance(ro.values, ro.returns, ro.mask)),
            "val/mean": float(core.masked_mean(ro.values, ro.mask)),
            "response/length": float(ro.mask.sum(1).mean()),
            "response/eos_rate": float((ro.responses == self.eos_id).any(1).float().mean()),
            "perf/episodes_per_s": self.cfg.batch_size / dt,
            "perf/step_s": dt,
            "perf/generate_s": self.t_generate,  # sampling alone
            "perf/score_s": t_rollout - self.t_generate,  # policy, reference and reward forward passes
            "perf/train_s": dt - t_rollout,  # the PPO epochs
            "perf/gen_fraction": self.t_generate / dt,
            "perf/rollout_fraction": t_rollout / dt,  # sampling and the scoring passes
            **train_stats,
        }
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            keys = sorted(metrics)
            values = self.accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=self.device), "mean")
            metrics = dict(zip(keys, values.tolist()))
            metrics["perf/episodes_per_s"] *= self.accelerator.num_processes  # all processes together
        self.kl_ctl.update(metrics["objective/kl"], self.cfg.batch_size)
        self.step += 1
        metrics["step"] = self.step
        self.history.append(metrics)
        return metrics

    def learning_rate(self) -> float:
        """This iteration's learning rate (ppo.lr_schedule): a function of the step alone, so a
        resumed run takes the rate it would have had."""
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return core.linear_lr(self.cfg.lr, self.step, self.cfg.steps)

    def train(self, on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        if self.checkpoint_dir and (self.checkpoint_dir / self._state_name).exists():
            self.load_checkpoint(self.checkpoint_dir)
            self.resumed_from = self.step
        while self.step < self.cfg.steps:
            metrics = self.train_step()
            if on_step:
                on_step(metrics)
            if self.checkpoint_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_dir)
        return self.history

    # -- checkpoints: everything a resumed run needs to continue exactly -----------------------
    @property
    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def _state_name(self) -> str:  # optimizer and RNG states differ per process
        return "trainer.pt" if self.accelerator is None else f"trainer-rank{self.accelerator.process_index}.pt"

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def run_key(self) -> dict:
        """What a checkpoint must share with this trainer to be resumed by it: the settings (but
        RESUMABLE_CHANGES), the seed, the prompts, the number of processes and the precision the
        settings come to here (mixed_precision "auto" is bf16 on a GPU, float32 on a CPU). The weights
        it starts from are the caller's to check (the pipeline stamps its checkpoint folder)."""
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items()
                    if k not in RESUMABLE_CHANGES and k != "mixed_precision"}  # it counts as what it comes to
        return {"ppo": settings, "autocast": str(self.autocast_dtype), "seed": self.seed,
                "processes": 1 if self.accelerator is None else self.accelerator.num_processes,
                "prompts": hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()}

    def save_checkpoint(self, folder: str | Path) -> None:
        """Weights to policy.safetensors (with LoRA only the adapters and the value head: the base
        never changes and is read again from its own folder), the rest to trainer[-rankN].pt."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lora_only = lora.is_lora(self.unwrapped.lm)
        if self.fsdp:  # every process takes part in gathering the shards; the first one writes them
            from tasks.ppo import sharding

            weights, optimizer = sharding.full_state_dict(self.policy, self.optimizer)
        else:
            weights, optimizer = None, self.optimizer.state_dict()
            if lora_only:
                weights = dict(self.unwrapped.named_parameters())
        if lora_only:
            trainable = self._trainable_names()
            weights = {k: v for k, v in weights.items() if k in trainable}
        if self._is_main:
            tmp = folder / "policy.safetensors.tmp"
            if weights is None:
                save_model(self.unwrapped, str(tmp))  # handles the tied embedding / LM-head weights
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp),
                          metadata={"contents": "trainable" if lora_only else "all"})
            tmp.replace(folder / "policy.safetensors")
        state = {
            "step": self.step, "optimizer": optimizer, "kl_ctl": self.kl_ctl.state_dict(), "score_norm": self.score_norm,
            "rng": self.rng.getstate(), "generator": self.generator.get_state(), "history": self.history,
            "run": self.run_key(),
        }
        name = self._state_name
        torch.save(state, folder / f"{name}.tmp")
        (folder / f"{name}.tmp").replace(folder / name)  # atomic: a kill never leaves half a file
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        state = torch.load(folder / self._state_name, weights_only=True)
        ours, theirs = self.run_key(), state.get("run")
        if theirs is not None:  # written before mixed precision (float32 throughout), learning-rate schedules
            # (a constant rate) or score normalization (raw scores): what they ran without
            theirs = {"autocast": "None", **theirs,
                      "ppo": {"lr_schedule": "constant", "normalize_scores": False, **theirs["ppo"]}}
        if theirs is not None and theirs != ours:  # (checkpoints written before run keys: not checked)
            changed = ", ".join(changed_keys(ours, theirs))
            raise ValueError(f"the checkpoint in {folder} is another run's ({changed} differ): resuming it would "
                             "continue that run under these settings. Restore them, or delete the folder to start afresh")
        path = folder / "policy.safetensors"
        lora_only = lora.is_lora(self.unwrapped.lm)
        reads = self._is_main or not self.fsdp  # FSDP: the first process reads, the others receive
        weights = {}
        if lora_only and reads:  # the adapters and the value head, over the base already loaded
            weights = load_file(str(path))
            trainable = self._trainable_names()
            if set(weights) != trainable:
                raise ValueError(f"{path} does not hold this LoRA policy's trainable weights "
                                 f"({len(weights)} tensors, the policy trains {len(trainable)}; e.g. "
                                 f"{sorted(set(weights) ^ trainable)[:3]}): a checkpoint of another rank or model")
        if self.fsdp:  # the first process reads the whole weights and sends each process its shards
            from tasks.ppo import sharding

            if not lora_only and reads:
                weights = load_file(str(path))
            sharding.load_full_state_dict(self.policy, self.optimizer, weights, state["optimizer"],
                                          strict=not lora_only)
        else:
            if lora_only:
                self.unwrapped.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=False)
            else:
                load_model(self.unwrapped, str(path), device=str(self.device))
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_norm = tuple(state["score_norm"]) if state.get("score_norm") is not None else None
        self.rng.setstate(_as_random_state(state["rng"]))
        self.generator.set_state(state["generator"])
        self.history = state["history"]


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """ppo.mixed_precision on `device`: the dtype the passes autocast to, or None (the weights' own)."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if mixed_precision == "bf16" else None


def changed_keys(now: dict, then: dict) -> list[str]:
    """The dotted names of the values that differ between two nested dicts ("ppo.lr")."""
    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    now, then = flatten(now), flatten(then)
    return sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout in training mode: nn.Dropout modules, and the rates many Hugging Face models keep
    as plain floats and pass to functional dropout when training (OPT's `dropout`, the
    `attention_dropout` of Llama, Qwen, Mistral...). The model's config is left as it was."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def _as_random_state(state) -> tuple:
    # torch.save turns random.getstate()'s nested tuples into lists; random.setstate wants tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
