"""Held-out accuracy with its uncertainty: pass@k, bootstrap intervals, and verdicts between models.

An evaluation samples k responses for each of n problems; problem i gets c_i correct. pass@1 is the
mean of c_i / k. Its uncertainty has two sources, which problems were drawn and which samples came
out, and resampling whole problems (the bootstrap over problems) covers both: each resample draws n
problems with replacement and recomputes the mean.

Two models evaluated on the same problems are compared *paired*: the per-problem differences
d_i = c_i/k (model B) - c_i/k (model A) are resampled together, which removes the spread of problem
difficulty that both share. A difference is called "above" or "below" only when its 95 % interval
excludes zero; otherwise "no significant change", whatever the sign of the point estimate.

pass@k uses the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained
on Code"): for a problem with n samples of which c are correct, 1 - C(n-c, k) / C(n, k), averaged
over problems. It shows the ceiling that sharpening alone (what RL mostly does) can reach.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the stable form of 1 - C(n-c, k) / C(n, k)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(correct: Sequence[int], n: int) -> dict[int, float]:
    """{k: mean pass@k over problems} for k = 1..n; `correct` holds c_i per problem."""
    if not correct:
        return {}
    return {k: sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)}


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its standard error and bootstrap interval."""

    mean: float
    se: float
    lo: float
    hi: float
    n: int

    def verdict(self) -> str:
        """For a difference: 'above' / 'below' when the interval excludes zero, else no change."""
        if self.lo > 0:
            return "above"
        if self.hi < 0:
            return "below"
        return "no significant change"


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("a mean needs at least one value")
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0


def bootstrap_mean(
    values: Sequence[float], resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> Estimate:
    """Mean of per-problem values, its standard error, and the percentile bootstrap interval."""
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    mean, se = mean_and_se(values)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    alpha = (1.0 - confidence) / 2
    return Estimate(mean=mean, se=se, lo=_percentile(means, alpha), hi=_percentile(means, 1 - alpha), n=n)


def paired_difference(
    base: Sequence[float], other: Sequence[float], resamples: int = 2000, seed: int = 0
) -> Estimate:
    """`other` minus `base`, problem by problem (same problems, same order)."""
    if len(base) != len(other):
        raise ValueError(f"paired comparison needs the same problems: {len(base)} vs {len(other)} values")
    return bootstrap_mean([b - a for a, b in zip(base, other)], resamples=resamples, seed=seed)
