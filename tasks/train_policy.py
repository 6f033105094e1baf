"""Stage `train_policy`: PPO from the round's policy against the new reward model.

The frozen reference is always the base policy (models/base), so KL measures the total drift
from it over all rounds, not just this one. A killed run resumes from its last checkpoint
(`ppo.checkpoint_every`) with the same result it would have had.
"""
from __future__ import annotations

import shutil

import mlflow
import torch

from tasks import scenario, tracking
from tasks.config import PipelineConfig
from tasks.modeling import load_policy, load_reward, load_tokenizer, save
from tasks.ppo.rollout import PolicyWithValue
from tasks.ppo.trainer import PPOTrainer
from tasks.stage import StageError, stage_main
from tasks.workspace import RoundState, Workspace


def build_trainer(policy_ref: str, ref_ref: str, reward_ref: str, prompts: list[str], cfg: PipelineConfig,
                  seed: int, checkpoint_dir=None, device: str = "cpu") -> tuple[PPOTrainer, object]:
    tokenizer = load_tokenizer(policy_ref)
    reward_tokenizer = load_tokenizer(reward_ref)
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"the reward model {reward_ref} uses another tokenizer than the policy {policy_ref}; "
                         "start the reward model from the policy (leave models.reward empty) or from a model "
                         "with the same tokenizer")
    policy = PolicyWithValue(load_policy(policy_ref)).to(device)
    ref = load_policy(ref_ref).to(device)
    reward = load_reward(reward_ref, tokenizer.pad_token_id).to(device)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    trainer = PPOTrainer(policy, ref, reward, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         cfg.ppo, seed=seed, device=device, checkpoint_dir=checkpoint_dir)
    return trainer, tokenizer


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint_dir = ws.root / ".cache" / "ppo-checkpoints" / f"round-{state.round}"
    with tracking.stage_run(ws, cfg.project, "train_policy", state, data_file=ws.accepted):
        policy_ref = tracking.resolve_model(ws, state.policy)
        trainer, tokenizer = build_trainer(policy_ref, str(ws.base_model), str(ws.reward_model),
                                           scenario.feedback_prompts(), cfg, cfg.seed * 1000 + state.round,
                                           checkpoint_dir, device)
        mlflow.log_params({f"ppo.{k}": v for k, v in cfg.ppo.__dict__.items()} | {"ppo.device": device})

        def log(metrics: dict) -> None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
            print(f"ppo step {int(metrics['step']):3d}  score {metrics['objective/scores']:+.3f}  "
                  f"kl {metrics['objective/kl']:.3f}  entropy {metrics['policy/entropy']:.3f}")

        history = trainer.train(on_step=log)
        if any(not torch.isfinite(p).all() for p in trainer.policy.parameters()):
            raise StageError("PPO produced non-finite weights; lower ppo.lr or raise ppo.kl_coef")
        if ws.policy_model.exists():
            shutil.rmtree(ws.policy_model)
        save(trainer.policy.lm.float(), tokenizer, ws.policy_model)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the round's policy is saved: no resume needed
    return history


if __name__ == "__main__":
    stage_main(run)
