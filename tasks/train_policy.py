"""Stage `train_policy`: PPO from the round's policy against the new reward model.

The frozen reference is always the base policy (models/base), so KL measures the total drift
from it over all rounds, not just this one. A killed run resumes from its last checkpoint
(`ppo.checkpoint_every`) with the same result it would have had.

With LoRA (`ppo.lora_rank` > 0) the policy is the base model plus adapters, and the reference is
that model with its adapters off: one copy of the weights. The round saves the merged model (what
every other stage and a user loads) and, in its `lora/` folder, the adapters with the fingerprint
of the base they belong to; the next round continues those adapters when the base is the same.

With `ppo.processes` > 1 the stage starts that many processes under torchrun (one per GPU; CPU
processes over gloo without one), each rolling out its own batch: DDP, or FSDP with `ppo.fsdp`.
The first process logs into the stage's MLflow run and saves the policy.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch

from tasks import prompts as prompts_, tracking
from tasks.config import PipelineConfig
from tasks.modeling import compute_device, encode_prompt, load_policy, load_reward, load_tokenizer, save
from tasks.ppo import lora
from tasks.ppo.rollout import Critic, PolicyWithValue
from tasks.ppo.config import RESUMABLE_CHANGES
from tasks.ppo.trainer import PPOTrainer, autocast_dtype, changed_keys
from tasks.stage import StageError, stage_main, time_left
from tasks.workspace import RoundState, Workspace


LORA_DIR = "lora"  # inside a saved policy: its adapters and base.sha256


def weights_fingerprint(ref: str | Path) -> str | None:
    """sha256 over a saved model folder's safetensors files; None for a Hugging Face id."""
    files = _weight_files(ref)
    if not files:
        return None
    return _sha256(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _weight_files(ref: str | Path) -> list[Path]:
    """A saved model folder's safetensors files, in order; none for a Hugging Face id."""
    return sorted(Path(ref).glob("*.safetensors")) if Path(ref).is_dir() else []


@functools.lru_cache(maxsize=None)  # a stage reads the base's up to three times: hash its gigabytes once
def _sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed by path, size and modification time: a rewritten file is hashed anew."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def build_policy(policy_ref: str, base_ref: str, rank: int, alpha: float, seed: int = 0, reference: bool = True,
                 frozen_dtype: torch.dtype = torch.float32):
    """The policy LM to train and its frozen reference (None: the policy with its adapters off, or
    `reference=False`: the policy alone, with the shape to load its trained weights into).

    Without LoRA: the round's policy, the base beside it. With LoRA: the base with the round's
    adapters (continued when the round's policy was saved with adapters on this same base, new
    when the round's policy is the base itself); a policy trained otherwise gets new adapters on
    its own weights, and then the base is loaded beside it as the reference. `frozen_dtype`: the
    dtype of LoRA's frozen weights (bf16 under mixed precision: half the memory; the adapters
    stay float32, as PEFT makes them).
    """
    if not rank:
        return load_policy(policy_ref), load_policy(base_ref) if reference else None
    base = weights_fingerprint(base_ref)
    adapters = Path(policy_ref) / LORA_DIR
    if base and _saved_adapters(adapters) == (base, rank, alpha):
        return lora.load_lora(load_policy(base_ref, frozen_dtype), adapters), None
    if base and weights_fingerprint(policy_ref) == base:
        return lora.add_lora(load_policy(base_ref, frozen_dtype), rank, alpha, seed), None
    if reference:
        print(f"LoRA: {policy_ref} holds no rank-{rank} adapters on the base model and is not the base model; "
              "new adapters on its weights, the base model loaded beside it as the reference")
    return (lora.add_lora(load_policy(policy_ref, frozen_dtype), rank, alpha, seed),
            load_policy(base_ref, frozen_dtype) if reference else None)


def _saved_adapters(folder: Path) -> tuple[str, int, float] | None:
    """(base fingerprint, rank, alpha) of adapters a round saved, or None."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        return (folder / "base.sha256").read_text().strip(), config["r"], float(config["lora_alpha"])
    except (OSError, ValueError, KeyError):
        return None


def save_policy(lm, tokenizer, folder: Path, base_ref: str) -> None:
    """The merged model for everyone; with LoRA also the adapters and their base's fingerprint."""
    if folder.exists():
        shutil.rmtree(folder)
    if lora.is_lora(lm):
        lm.save_pretrained(folder / LORA_DIR)
        (folder / LORA_DIR / "base.sha256").write_text(weights_fingerprint(base_ref) or "")
        # merged in float32, on the CPU: merged into a bf16 base (mixed precision) the adapters'
        # update would be rounded to bf16, and an upcast copy on the GPU could outgrow it
        lm = lm.cpu().float().merge_and_unload()
    save(lm.float(), tokenizer, folder)


def build_trainer(policy_ref: str, ref_ref: str, reward_ref: str, prompts: list[str], cfg: PipelineConfig,
                  seed: int, checkpoint_dir=None, device: str = "cpu", accelerator=None) -> tuple[PPOTrainer, object]:
    chat = cfg.chat_format
    tokenizer = load_tokenizer(policy_ref, chat)
    if load_tokenizer(ref_ref, chat).get_vocab() != tokenizer.get_vocab():
        raise StageError(f"the policy {policy_ref} uses another tokenizer than its reference, the base model "
                         f"{ref_ref}: it was trained from another base model. Train the base model's own line "
                         "of policies in a workspace of its own, or set models.policy back")
    reward_tokenizer = load_tokenizer(reward_ref, chat)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"the reward model {reward_ref} uses another tokenizer than the policy {policy_ref}; "
                         "start the reward model from the policy (leave models.reward empty) or from a model "
                         "with the same tokenizer")
    if chat is not None and (reward_tokenizer.chat_template, reward_tokenizer.eos_token) != (tokenizer.chat_template,
                                                                                 tokenizer.eos_token):
        raise StageError(f"the reward model {reward_ref} has another chat template than the policy {policy_ref}: "
                         "it would score rollouts in a form it was not trained on; start the reward model from "
                         "the policy (leave models.reward empty) or from a model with the same chat template")
    mixed = autocast_dtype(cfg.ppo.mixed_precision, torch.device(device)) is not None
    lm, ref = build_policy(policy_ref, ref_ref, cfg.ppo.lora_rank, cfg.ppo.lora_alpha, seed,
                           frozen_dtype=torch.bfloat16 if mixed else torch.float32)
    critic = None
    if cfg.ppo.value_model == "reward":  # the critic starts as a copy of the reward model
        rank = cfg.ppo.lora_rank  # with LoRA: adapters on its trunk too, over frozen weights as the policy's
        classifier = load_reward(reward_ref, tokenizer.pad_token_id,
                                 torch.bfloat16 if mixed and rank else torch.float32)
        try:
            critic = Critic(classifier)
        except ValueError as e:
            raise StageError(f"ppo.value_model is reward, but {e}; set ppo.value_model to shared") from None
        if rank:
            lora.add_critic_lora(classifier, rank, cfg.ppo.lora_alpha, seed)  # in place: into the critic's trunk
    policy = PolicyWithValue(lm, critic).to(device)
    ref = ref.to(device) if ref is not None else None
    reward = load_reward(reward_ref, tokenizer.pad_token_id).to(device)
    prompt_ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    prompts_.check_lengths(prompt_ids, cfg.ppo.max_new_tokens, lm.config, prompts_.where(cfg, "train"))
    trainer = PPOTrainer(policy, ref, reward, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         cfg.ppo, seed=seed, device=device, checkpoint_dir=checkpoint_dir, accelerator=accelerator,
                         fsdp=cfg.ppo.fsdp)
    return trainer, tokenizer


WORKER = "RLHF_PPO_WORKER"  # set in the processes the stage starts: the round's policy, resolved


def resume_key(ws: Workspace, cfg: PipelineConfig, state: RoundState, policy_ref: str) -> dict:
    """What a PPO checkpoint must share with this run to be resumed: every PPO setting but those a
    resumed run may change (RESUMABLE_CHANGES: go longer, save more often, compute in chunks or
    with the other decoder), the seed, the prompts, and the models it starts from (their weight
    files' sizes and modification times: rewritten is other)."""
    def files(ref) -> list | str:
        if not Path(ref).is_dir():
            return str(ref)  # a Hugging Face id
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in _weight_files(ref)]

    ppo = {k: v for k, v in vars(cfg.ppo).items() if k not in RESUMABLE_CHANGES}
    prompts = hashlib.sha256(json.dumps(prompts_.training_prompts(ws, cfg)).encode()).hexdigest()
    return json.loads(json.dumps({
        "ppo": ppo, "seed": cfg.seed, "round": state.round, "prompts": prompts,
        "models": {"policy": files(policy_ref), "base": files(ws.base_model), "reward": files(ws.reward_model)},
    }))


def keep_matching_checkpoints(folder: Path, key: dict) -> None:
    """Checkpoints in `folder` are resumed only by the run that wrote them: those of another run (a
    setting or a model changed since the kill) are deleted, saying what changed, since resuming
    them would silently continue the old run; then `key` is written there for the run to come."""
    stamp = folder / "run.json"
    if folder.exists():
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None  # no stamp (written before stamps existed, or cut off): not provably ours
        if old != key:
            readable = isinstance(old, dict)
            why = f"{', '.join(changed_keys(key, old))} changed" if readable else "they have no readable run.json"
            print(f"PPO checkpoints in {folder} belong to another run ({why}): deleted; "
                  "this run starts from its first step", flush=True)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(key, indent=1, sort_keys=True))


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> list[dict] | None:
    checkpoint_dir = ws.root / ".cache" / "ppo-checkpoints" / f"round-{state.round}"
    if os.environ.get(WORKER):  # one of the processes started below
        return train(ws, cfg, state, os.environ[WORKER], checkpoint_dir)
    with tracking.stage_run(ws, cfg.project, "train_policy", state, data_file=ws.accepted) as stage_run:
        policy_ref = tracking.resolve_model(ws, state.policy)  # once, before any process starts
        keep_matching_checkpoints(checkpoint_dir, resume_key(ws, cfg, state, policy_ref))
        if cfg.ppo.processes > 1:
            launch(ws, cfg, policy_ref, stage_run.info.run_id)
            history = None
        else:
            history = train(ws, cfg, state, policy_ref, checkpoint_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the round's policy is saved: no resume needed
    return history


def launch(ws: Workspace, cfg: PipelineConfig, policy_ref: str, run_id: str) -> None:
    """This stage again in `ppo.processes` processes under torchrun; they log into `run_id`."""
    n = cfg.ppo.processes
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise StageError(f"ppo.processes is {n} but this machine has {torch.cuda.device_count()} GPUs; "
                         "set ppo.processes to at most that")
    print(f"PPO on {n} processes ({'FSDP' if cfg.ppo.fsdp else 'DDP'}, "
          f"{'one GPU each' if torch.cuda.is_available() else 'CPU'})", flush=True)
    env = {**os.environ, WORKER: policy_ref, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": ws.tracking_uri}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(n), "-m", "tasks.train_policy"], cwd=ws.root, env=env)
    if proc.returncode != 0:
        raise StageError(f"PPO on {n} processes failed (exit {proc.returncode}); their errors are above")


def train(ws: Workspace, cfg: PipelineConfig, state: RoundState, policy_ref: str, checkpoint_dir: Path) -> list[dict]:
    accelerator = None
    if cfg.ppo.processes > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = str(accelerator.device) if accelerator else str(compute_device())
    main = accelerator is None or accelerator.is_main_process
    seed = cfg.seed * 1000 + state.round
    # a started process's first rank logs into the stage's run (MLFLOW_RUN_ID); the others log nothing
    logging = mlflow.start_run() if main and accelerator is not None else contextlib.nullcontext()
    with logging:
        prompts = prompts_.training_prompts(ws, cfg)
        trainer, tokenizer = build_trainer(policy_ref, str(ws.base_model), str(ws.reward_model),
                                           prompts, cfg, seed, checkpoint_dir, device, accelerator)
        reference = "base model, adapters off" if trainer.ref_lm is None else "base model"
        if main:
            mlflow.log_params({f"ppo.{k}": v for k, v in cfg.ppo.__dict__.items()}
                              | {"ppo.device": device.split(":")[0], "ppo.reference": reference,
                                 "ppo.autocast": str(trainer.autocast_dtype).removeprefix("torch.")
                                 if trainer.autocast_dtype else "off",
                                 "ppo.decoder": "static" if trainer.decoder is not None else "dynamic",
                                 "prompts.train": prompts_.source(cfg, "train"),
                                 "prompts.train_count": len(prompts), **cfg.chat.params()})

        start = time.monotonic()

        def log(metrics: dict) -> None:
            if not main:
                return
            step, first = int(metrics["step"]), (trainer.resumed_from or 0) + 1
            if trainer.resumed_from and step == first:
                print(f"PPO resumed from step {trainer.resumed_from}'s checkpoint", flush=True)
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
            # the reward model's own score (as evaluation reports it), not the normalized one PPO maximises
            print(f"ppo step {step:3d}/{cfg.ppo.steps}  score {metrics['objective/raw_scores']:+.3f}  "
                  f"kl {metrics['objective/kl']:.3f}  entropy {metrics['policy/entropy']:.3f}  "
                  f"{time_left(time.monotonic() - start, step - first + 1, cfg.ppo.steps - step)}", flush=True)

        history = trainer.train(on_step=log)
        if main:
            mlflow.log_param("ppo.resumed_from_step", trainer.resumed_from or 0)
            if trainer.score_norm is not None:  # ppo.normalize_scores: the first rollout's mean and std
                mlflow.log_params({"ppo.score_mean": trainer.score_norm[0], "ppo.score_std": trainer.score_norm[1]})
        lm = trainer.unwrapped.lm
        if trainer.fsdp:  # gather the shards (every process), rebuild the whole model on the first
            from tasks.ppo import sharding

            weights = sharding.full_model_state_dict(trainer.policy)
            if main:  # (the LM's shape only: its reference would be a second whole model, unused)
                lm = build_policy(policy_ref, str(ws.base_model), cfg.ppo.lora_rank, cfg.ppo.lora_alpha, seed,
                                  reference=False)[0]
                lm.load_state_dict({k.removeprefix("lm."): v for k, v in weights.items() if k.startswith("lm.")})
        if main:
            if any(not torch.isfinite(p).all() for p in lm.parameters()):
                raise StageError("PPO produced non-finite weights; lower ppo.lr or raise ppo.kl_coef")
            save_policy(lm, tokenizer, ws.policy_model, str(ws.base_model))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()  # the process group ends before the interpreter (gloo can abort at exit)
    return history


if __name__ == "__main__":
    stage_main(run)
