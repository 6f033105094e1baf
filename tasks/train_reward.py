"""Stage `train_reward`: a Bradley-Terry reward model with TRL's RewardTrainer.

Starts from `models.reward` if given, else from the base policy with a fresh score head (so
the reward model shares the policy's tokenizer). Every accepted pair goes to the training or
the held-out split by a hash of its id (or of its prompt, `reward.split: prompt`), so a pair
stays on its side round after round.
Pairwise accuracy on the held-out split is computed by our own forward pass, the same way the
evaluation stage scores responses. RewardTrainer gets the pairs tokenized by `encode_sequence`,
the one function that also tokenizes for scoring, so training, evaluation and PPO read a pair
alike; with chat.template the prompt is a user turn of the chat template.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlflow
import torch
from transformers import TrainerCallback

from tasks import tracking, versioning
from tasks.config import ChatConfig, PipelineConfig
from tasks.intervals import interval_over_prompts, wilson_interval
from tasks.modeling import (compute_device, encode_sequence, load_reward, load_tokenizer, max_positions,
                            pair_token_length, save, score_texts)
from tasks.prompts import held_out as prompt_held_out
from tasks.stage import StageError, stage_main, time_left
from tasks.workspace import RoundState, Workspace


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_c - r_r): the loss RewardTrainer minimises, for tests and evaluation."""
    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()


def split(records: list[dict], eval_fraction: float, by: str = "pair") -> tuple[list[dict], list[dict]]:
    """(training, held out), each pair by a hash of its id, or with by="prompt" by its prompt's text
    (prompts.held_out): every pair of a prompt on one side. Either way a pair stays on its side."""
    train, held_out = [], []
    for r in records:
        out = (prompt_held_out(r["prompt"], eval_fraction) if by == "prompt"
               else id_hash(r["id"]) % 1000 < eval_fraction * 1000)
        (held_out if out else train).append(r)
    return train, held_out


def id_hash(id_: str) -> int:
    """A pair's id as a number to split by: our ids are already hashes (records.record_id, 16 hex
    digits); an id of your own ('row-17', a UUID, a number) is hashed first."""
    if not re.fullmatch(r"[0-9a-f]{16}", id_):
        id_ = hashlib.sha256(id_.encode("utf-8")).hexdigest()
    return int(id_[:8], 16)


def calibration(r_c: torch.Tensor, r_r: torch.Tensor, buckets: int = 4) -> list[dict]:
    """Accuracy by |margin| quartile: a calibrated reward model is more often right when it is surer."""
    margin = (r_c - r_r).abs()
    order = torch.argsort(margin)
    out = []
    for chunk in torch.tensor_split(order, buckets):
        if len(chunk):
            out.append({"margin_low": float(margin[chunk].min()), "margin_high": float(margin[chunk].max()),
                        "accuracy": float((r_c[chunk] > r_r[chunk]).float().mean()), "n": len(chunk)})
    return out


def pairwise_accuracy(model, tokenizer, records: list[dict], chat: ChatConfig | None = None) -> dict:
    if not records:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0, "calibration": []}
    prompts = [r["prompt"] for r in records]
    r_c = score_texts(model, tokenizer, prompts, [r["chosen"] for r in records], chat=chat)
    r_r = score_texts(model, tokenizer, prompts, [r["rejected"] for r in records], chat=chat)
    right = (r_c > r_r).float()
    return {"accuracy": float(right.mean()), "loss": float(bradley_terry_loss(r_c, r_r)),
            "n": len(records), "calibration": calibration(r_c, r_r), "prompts": len(set(prompts)),
            # 95%: every pair independent / pairs clustered by prompt (a prompt's pairs are alike)
            "interval_pairs": list(wilson_interval(float(right.sum()), len(records))),
            "interval_prompts": list(interval_over_prompts(right.tolist(), prompts))}


def held_out_line(held_out: dict, seen: int, unseen: dict | None, hint: bool) -> str:
    """What the held-out accuracy says, and how far the pairs it is measured on were seen in training:
    'reward model: held-out accuracy 0.86 on 14 pairs of 7 prompts (95% interval 0.60-0.96 over
    pairs, 0.71-1.00 over prompts); all 14 have a prompt it trained on ...'"""
    (lp, hp), (lq, hq) = held_out["interval_pairs"], held_out["interval_prompts"]
    line = (f"reward model: held-out accuracy {held_out['accuracy']:.2f} on {held_out['n']} pairs of "
            f"{held_out['prompts']} prompts (95% interval {lp:.2f}-{hp:.2f} over pairs, {lq:.2f}-{hq:.2f} over prompts)")
    if seen:
        share = f"all {seen}" if seen == held_out["n"] else f"{seen} of them"
        line += f"; {share} have a prompt it trained on, with other pairs of it"
        if unseen is not None:
            line += f" (on the {unseen['n']} others: {unseen['accuracy']:.2f})"
        if hint:
            line += ": reward.split: prompt holds out every pair of a prompt"
    return line


class _Progress(TrainerCallback):
    """The trainer's loss, accuracy and margin to MLflow at each log (every 5 steps), and about 20
    lines of progress to the stage's output, which a round's log relays as they come."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.every = time.monotonic(), max(1, state.max_steps // 20)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:  # the last step's loss too, whatever logging_steps
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if mlflow.active_run() is not None:  # train() outside a stage: logging would start a stray run
            for k in ("loss", "accuracy", "margin"):
                if k in logs:
                    mlflow.log_metric(f"reward/train_{k}", logs[k], step=state.global_step)
        if "loss" in logs and (state.global_step // self.every > (state.global_step - args.logging_steps) // self.every
                               or state.global_step == state.max_steps):
            print(progress_line(state.global_step, state.max_steps, time.monotonic() - self.start, logs), flush=True)


def progress_line(step: int, steps: int, elapsed: float, logs: dict) -> str:
    """'reward step 40/180  loss 0.652  accuracy 0.61  1m10s, about 4m05s left'"""
    shown = "  ".join(f"{k} {logs[k]:.3f}" if k == "loss" else f"{k} {logs[k]:.2f}"
                      for k in ("loss", "accuracy") if k in logs)
    return f"reward step {step}/{steps}  {shown}  {time_left(elapsed, step, steps - step)}"


def fits(tokenizer, record: dict, max_length: int, chat: ChatConfig | None = None) -> bool:
    """Whether RewardTrainer keeps the pair: + 1 for the EOS after the response."""
    return pair_token_length(tokenizer, record["prompt"], record["chosen"], record["rejected"], chat) + 1 <= max_length


def read_eval_file(path: str, mapping: str | None = None) -> tuple[list[dict], Counter]:
    """reward.eval_file's pairs, read as `rlhf import` reads files (reward.eval_map: its columns),
    and its rows that could not be read, counted by reason: scored on fewer pairs than the file
    holds, the accuracy says so. Ties and skips are not pairs. Read before training: a file that
    cannot be read stops the stage before, not after, the training."""
    from tasks.importers import READERS, ImportError_, check_mapping, decompressed, detect_format, parse_mapping
    from tasks.records import BadLine, PreferenceRecord

    if not Path(path).is_file():
        raise StageError(f"reward.eval_file {path} does not exist or is not a file")
    try:
        columns = parse_mapping(mapping)
        with decompressed(Path(path)) as readable:
            fmt = detect_format(readable, columns)
            check_mapping(columns, fmt, Path(path))
            rows = list(READERS[fmt](readable, columns, 0))
    except ImportError_ as e:
        raise StageError(f"reward.eval_file: {e}") from None
    pairs = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
             for r in rows if isinstance(r, PreferenceRecord) and r.label == "pair"]
    return pairs, Counter(r.reason for r in rows if isinstance(r, BadLine))


def accuracy_on_file(model, tokenizer, path: str, pairs: list[dict], set_aside: Counter, max_length: int,
                     chat: ChatConfig | None = None) -> dict:
    """Pairwise accuracy on another preference file's pairs (`read_eval_file`); pairs longer than
    max_length are counted, not scored, as are the rows that could not be read."""
    fit = [r for r in pairs if fits(tokenizer, r, max_length, chat)]
    return {**pairwise_accuracy(model, tokenizer, fit, chat), "file": str(path), "too_long": len(pairs) - len(fit),
            "set_aside": sum(set_aside.values()), "set_aside_reasons": dict(set_aside.most_common())}


def eval_file_line(m: dict) -> str:
    """'eval_file hh.jsonl (md5 5d41402abc4b): accuracy 0.62 on 280 pairs (20 too long; 3 rows
    could not be read: ...)'."""
    line = f"eval_file {m['file']} (md5 {m['md5'][:12]}): " + (
        f"accuracy {m['accuracy']:.2f} on {m['n']} pairs" if m["n"] else "no pair it could score, no accuracy")
    notes = [f"{m['too_long']} too long"] if m["too_long"] else []
    if m["set_aside"]:
        notes.append(f"{m['set_aside']} {'row' if m['set_aside'] == 1 else 'rows'} could not be read: " + "; ".join(
            f"{reason} ({n})" for reason, n in list(m["set_aside_reasons"].items())[:3]))
    return line + (f" ({'; '.join(notes)})" if notes else "")


def train(init_ref: str, tokenizer_ref: str, records: list[dict], cfg: PipelineConfig, out: Path) -> dict:
    # imported here: TRL takes ~3 s to import, and evaluation (which uses score_texts) never trains
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    chat = cfg.chat_format
    eval_file = read_eval_file(cfg.reward.eval_file, cfg.reward.eval_map) if cfg.reward.eval_file else None
    # hashed as it is read, before training (DVC's hash of it): a file changed meanwhile is not the one logged
    eval_md5 = versioning.file_md5(cfg.reward.eval_file) if eval_file is not None else None
    tokenizer = load_tokenizer(tokenizer_ref, chat)
    model = load_reward(init_ref, tokenizer.pad_token_id)
    max_length = reward_max_length(cfg, model.config)
    kept = [r for r in records if fits(tokenizer, r, max_length, chat)]  # each pair tokenized once
    too_long = len(records) - len(kept)
    if too_long:  # RewardTrainer would drop them without a word: say so, loudly
        print(f"warning: {too_long} of the {len(records)} pairs are longer than the {max_length} tokens the reward "
              f"model reads ({'reward.max_length' if cfg.reward.max_length else 'its positions'}) and are neither "
              "trained on nor scored; raise reward.max_length (up to the model's positions), or set "
              f"validate.max_tokens to {max_length - 1} to set them aside at validation, with their reason")
    train_set, held_out = split(kept, cfg.reward.eval_fraction, cfg.reward.split)
    if len(train_set) < 2:
        raise StageError(f"only {len(train_set)} trainable pairs; need more feedback")
    if not held_out:
        raise StageError(f"none of the {len(kept)} trainable pairs is held out (reward.eval_fraction "
                         f"{cfg.reward.eval_fraction:g}, reward.split {cfg.reward.split}): the reward model's "
                         "accuracy, which gates promotion, would be measured on nothing; raise the fraction, give "
                         "feedback on more prompts, or split by pair")
    data = Dataset.from_list([{"chosen_ids": encode_sequence(tokenizer, r["prompt"], r["chosen"], chat),
                               "rejected_ids": encode_sequence(tokenizer, r["prompt"], r["rejected"], chat)}
                              for r in train_set])
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLRewardConfig(
            output_dir=tmp, num_train_epochs=cfg.reward.epochs, per_device_train_batch_size=cfg.reward.batch_size,
            learning_rate=cfg.reward.lr, max_length=max_length, seed=cfg.seed,
            use_cpu=compute_device().type == "cpu", bf16=bf16(cfg), activation_checkpointing=False,
            report_to=[], save_strategy="no", logging_steps=5, disable_tqdm=True, dataset_num_proc=None,
            lr_scheduler_type="linear", warmup_steps=0)
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                callbacks=[_Progress()])
        trainer.train()
    # without the autocast wrapper accelerate puts on forward under mixed precision: the reward
    # model is measured, saved and used in float32
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).float().eval()
    trained_on = {r["prompt"] for r in train_set}
    unseen = [r for r in held_out if r["prompt"] not in trained_on]
    seen = len(held_out) - len(unseen)
    metrics = {"train": pairwise_accuracy(model, tokenizer, train_set, chat),
               "held_out": pairwise_accuracy(model, tokenizer, held_out, chat) | {"split": cfg.reward.split,
                                                                                  "seen_prompt_pairs": seen},
               "too_long": too_long}
    if unseen and seen:  # its accuracy on prompts it never saw, beside the whole's
        metrics["held_out_unseen_prompts"] = pairwise_accuracy(model, tokenizer, unseen, chat)
    # the hint where a split by prompt would hold out about 5 prompts or more (not the scenario's 10)
    hint = cfg.reward.split == "pair" and len({r["prompt"] for r in kept}) * cfg.reward.eval_fraction >= 5
    print(held_out_line(metrics["held_out"], seen, metrics.get("held_out_unseen_prompts"), hint), flush=True)
    if eval_file is not None:
        metrics["eval_file"] = accuracy_on_file(model, tokenizer, cfg.reward.eval_file, *eval_file, max_length,
                                                chat) | {"md5": eval_md5}
        print(eval_file_line(metrics["eval_file"]), flush=True)
    if out.exists():
        shutil.rmtree(out)
    save(model, tokenizer, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def reward_max_length(cfg: PipelineConfig, config) -> int:
    """Tokens of prompt + response + EOS the reward model reads: reward.max_length, else its positions."""
    if cfg.reward.max_length is not None:
        return cfg.reward.max_length
    positions = max_positions(config)
    if positions is None:
        raise StageError("the reward model's config names no positions (max_position_embeddings, n_positions): "
                         "set reward.max_length")
    return positions


def bf16(cfg: PipelineConfig) -> bool:
    """reward.mixed_precision on this machine: whether RewardTrainer trains under bf16 autocast."""
    from tasks.ppo.trainer import autocast_dtype

    return autocast_dtype(cfg.reward.mixed_precision, compute_device()) is not None


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> dict:
    records = [json.loads(line) for line in ws.accepted.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tracking.stage_run(ws, cfg.project, "train_reward", state, data_file=ws.accepted):
        init = tracking.resolve_model(ws, cfg.models.reward) if cfg.models.reward else str(ws.base_model)
        if cfg.models.reward and load_tokenizer(init).get_vocab() != load_tokenizer(ws.base_model).get_vocab():
            # said before training, not after it, when PPO would first read the policy's tokens with it
            base = cfg.models.policy or "the built-in scenario's tiny model"
            raise StageError(f"models.reward {cfg.models.reward} uses another tokenizer than the policy's base model "
                             f"({base}): PPO scores the policy's tokens with it. Leave models.reward empty (the "
                             "reward model starts from the policy) or name a model with the same tokenizer")
        mlflow.log_params({f"reward.{k}": v for k, v in cfg.reward.model_dump().items()}
                          | {"reward.init": init, "reward.autocast": "bfloat16" if bf16(cfg) else "off",
                             **cfg.chat.params()})
        metrics = train(init, init, records, cfg, ws.reward_model)
        mlflow.log_metrics({"reward/accuracy": metrics["held_out"]["accuracy"],
                            "reward/held_out_loss": metrics["held_out"]["loss"],
                            "reward/train_accuracy": metrics["train"]["accuracy"],
                            "reward/pairs_train": metrics["train"]["n"],
                            "reward/pairs_held_out": metrics["held_out"]["n"],
                            "reward/too_long": metrics["too_long"],
                            "reward/held_out_prompts": metrics["held_out"]["prompts"],
                            "reward/held_out_seen_prompt_pairs": metrics["held_out"]["seen_prompt_pairs"]})
        if "held_out_unseen_prompts" in metrics:
            mlflow.log_metrics({"reward/accuracy_unseen_prompts": metrics["held_out_unseen_prompts"]["accuracy"],
                                "reward/pairs_unseen_prompts": metrics["held_out_unseen_prompts"]["n"]})
        if "eval_file" in metrics:  # (the file is not a DVC dependency: its hash says which version was read)
            mlflow.log_param("reward.eval_file_md5", metrics["eval_file"]["md5"])
            mlflow.log_metrics({"reward/eval_file_accuracy": metrics["eval_file"]["accuracy"],
                                "reward/eval_file_pairs": metrics["eval_file"]["n"],
                                "reward/eval_file_too_long": metrics["eval_file"]["too_long"],
                                "reward/eval_file_set_aside": metrics["eval_file"]["set_aside"]})
        for i, bucket in enumerate(metrics["held_out"]["calibration"]):
            mlflow.log_metric("reward/calibration_accuracy", bucket["accuracy"], step=i)
        mlflow.log_dict(metrics, "reward_metrics.json")
    return metrics


if __name__ == "__main__":
    stage_main(run)
