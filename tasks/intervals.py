"""95% intervals of a proportion: over independent samples (Wilson's) and over samples clustered
by prompt. Pure functions, shared by the reward model's accuracy and the evaluation's win-rates."""
from __future__ import annotations

import math


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties counted as half a win)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def prompt_interval(values: list[float], prompts: list[str]) -> tuple[float, float]:
    """95% interval of the mean of `values` whose samples are clustered by prompt: the cluster-robust
    standard error (sum over prompts of the squared sum of their deviations from the mean, over n^2,
    times k/(k-1); for equal samples a prompt, the spread of the k prompts' means) with Student's t
    at k-1 degrees of freedom, clipped to [0, 1]. One prompt says nothing of others: (0, 1)."""
    from scipy.stats import t

    n, mean = len(values), sum(values) / len(values)
    deviations: dict[str, float] = {}
    for v, p in zip(values, prompts):
        deviations[p] = deviations.get(p, 0.0) + v - mean
    k = len(deviations)
    if k < 2:
        return (0.0, 1.0)
    se = math.sqrt(k / (k - 1) * sum(d * d for d in deviations.values())) / n
    half = float(t.ppf(0.975, k - 1)) * se
    return (max(0.0, mean - half), min(1.0, mean + half))


def interval_over_prompts(values: list[float], prompts: list[str]) -> tuple[float, float]:
    """prompt_interval, never narrower than Wilson's over the samples: values all alike (a reward
    model right on every held-out pair) have no spread over prompts, and the cluster-robust interval
    alone would read 1.00-1.00 however few the samples."""
    pairs, clustered = wilson_interval(sum(values), len(values)), prompt_interval(values, prompts)
    return (min(pairs[0], clustered[0]), max(pairs[1], clustered[1]))
