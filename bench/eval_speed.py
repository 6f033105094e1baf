"""Evaluation speed: candidate against champion on N held-out prompts, the evaluate stage's own code.

    python bench/eval_speed.py --prompts 1000

Builds the built-in scenario's tiny model once (pre-training is not timed), then times
tasks.evaluate.evaluate: sampling for both policies, reward scoring, log-probs under both
policies and the reference, gold judging. Goal: 1,000 prompts in under a minute on 2 cores.
Prints a table, or one JSON object with --json; writes bench/results/eval_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import scenario  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.modeling import load_tokenizer, save  # noqa: E402
from tasks.pretrain import train_model, train_tokenizer  # noqa: E402
from tasks.stage import quiet_libraries  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1000, help="held-out prompts to evaluate (default 1000)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.prompts < 1:
        raise SystemExit("--prompts must be at least 1")
    quiet_libraries()
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        lines = scenario.corpus(cfg.pretrain.n_sentences, cfg.pretrain.neutral_rate, cfg.seed)
        train_tokenizer(lines, cfg.pretrain.vocab_size).save_pretrained(tmp)
        tokenizer = load_tokenizer(tmp)
        model, _ = train_model(tokenizer, lines, cfg.pretrain, cfg.seed)
        folder = str(save(model, tokenizer, Path(tmp) / "model"))
        held_out = scenario.heldout_prompts()
        prompts = [held_out[i % len(held_out)] for i in range(a.prompts)]
        t0 = time.perf_counter()
        report, _ = evaluate(folder, folder, folder, folder, prompts, 1, 1.0, cfg.ppo.max_new_tokens, seed=0)
        seconds = time.perf_counter() - t0
    result = {"prompts": a.prompts, "seconds": round(seconds, 2), "prompts_per_s": round(a.prompts / seconds, 1),
              "device": f"cpu ({os.cpu_count()} cores)", "goal_seconds": 60, "met": seconds < 60,
              "n_samples": report["n_samples"]}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps(result, indent=2))
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{'prompts':>8}{'seconds':>10}{'prompts/s':>11}{'goal (s)':>10}  device")
        print(f"{a.prompts:>8}{result['seconds']:>10}{result['prompts_per_s']:>11}{60:>10}  {result['device']}")


if __name__ == "__main__":
    main()
