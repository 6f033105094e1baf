"""How often the win-rate gate promotes a candidate no better than the champion, and how often one
that is better: the interval over pairs against the one over prompts, by simulation.

    python bench/win_rate_interval.py [--repeats 400] [--json]

Each repeat draws held-out prompts, each with its own effect (the candidate better on some
prompts, worse on others: a normal spread `tau` on the score-difference scale around `mu`), and
`samples` responses a prompt whose score differences scatter around it (normal, `sigma`). The
reward model's preference probability and both intervals come from tasks.evaluate.preference_rate,
the gate's own code; the gate passes when the lower end reaches 0.5. With mu = 0 the candidate is
no better over prompts like these (its true win-rate is 0.5), so a 95% interval should pass it
2.5% of the time. Prints a table, or one JSON object with --json; writes
bench/results/win_rate_interval.json.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.evaluate import preference_rate  # noqa: E402

# (held-out prompts, samples a prompt): the scenario's shape, and shapes of your own prompts
SHAPES = [(6, 32), (64, 32), (256, 32), (256, 4)]
TAU, SIGMA = 0.7, 1.0  # spread of the prompts' effects, and of samples around them (logit scale)
MU_BETTER = 0.25  # a better candidate: true win-rate about 0.55


def icc(probs: list[float], prompts: int, samples: int) -> float:
    """The prompts' share of the variance of the probabilities (one-way ANOVA estimate)."""
    groups = [probs[i * samples:(i + 1) * samples] for i in range(prompts)]
    mean = sum(probs) / len(probs)
    means = [sum(g) / samples for g in groups]
    msb = samples * sum((m - mean) ** 2 for m in means) / (prompts - 1)
    msw = sum((p - m) ** 2 for g, m in zip(groups, means) for p in g) / (prompts * (samples - 1))
    return max(0.0, (msb - msw) / (msb + (samples - 1) * msw))


def simulate(prompts: int, samples: int, mu: float, repeats: int, rng: random.Random) -> dict:
    passed = {"pairs": 0, "prompts": 0}
    iccs, rates = [], []
    names = [f"p{i}" for i in range(prompts) for _ in range(samples)]
    for _ in range(repeats):
        effects = [rng.gauss(mu, TAU) for _ in range(prompts)]
        diffs = [e + rng.gauss(0.0, SIGMA) for e in effects for _ in range(samples)]
        zeros = [0.0] * len(diffs)
        over_pairs = preference_rate(diffs, zeros, names)
        over_prompts = preference_rate(diffs, zeros, names, over_prompts=True)
        passed["pairs"] += over_pairs["low"] >= 0.5
        passed["prompts"] += over_prompts["low"] >= 0.5
        rates.append(over_pairs["rate"])
        if len(iccs) < 50:
            iccs.append(icc([0.5 * (1 + math.tanh(d / 2)) for d in diffs], prompts, samples))
    return {"prompts": prompts, "samples": samples, "mu": mu, "repeats": repeats,
            "mean_rate": sum(rates) / repeats, "icc": sum(iccs) / len(iccs),
            "passed_over_pairs": passed["pairs"] / repeats, "passed_over_prompts": passed["prompts"] / repeats}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=400, help="simulated evaluations per row (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for win_rate_interval.json (default bench/results)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file, not a folder")
    rng = random.Random(a.seed)
    start = time.perf_counter()
    rows = [simulate(k, m, mu, a.repeats, rng) for mu in (0.0, MU_BETTER) for k, m in SHAPES]
    out = {"tau": TAU, "sigma": SIGMA, "seed": a.seed, "rows": rows, "seconds": time.perf_counter() - start}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "win_rate_interval.json").write_text(json.dumps(out, indent=2) + "\n")
    if a.json:
        print(json.dumps(out))
        return
    print(f"effects over prompts N(mu, {TAU}), samples around them N(0, {SIGMA}), {a.repeats} repeats a row")
    print(f"{'candidate':<22}{'prompts':>8}{'samples':>8}{'win-rate':>10}{'ICC':>7}{'passed (pairs)':>16}"
          f"{'passed (prompts)':>18}")
    for r in rows:
        who = "no better (mu 0)" if r["mu"] == 0 else f"better (mu {r['mu']:g})"
        print(f"{who:<22}{r['prompts']:>8}{r['samples']:>8}{r['mean_rate']:>10.3f}{r['icc']:>7.2f}"
              f"{r['passed_over_pairs']:>16.1%}{r['passed_over_prompts']:>18.1%}")
    print(f"({out['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
