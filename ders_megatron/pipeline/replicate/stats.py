"""Intervals and verdicts: the rules the report applies, on numbers given to them.

Two kinds of noise, two intervals:

* between seeds (Setting A): each DeRS run is paired with the vanilla (or other) run
  of the same seed — same router seed, same data order — and the per-seed
  differences give a Student-t 95 % interval (:func:`seed_interval`);
* within one model pair on one held-out split (Setting B, compression): the per-window
  loss differences resampled with replacement (:func:`paired_bootstrap`).

The verdict rules are fixed here, before any number is seen, and stated in the
report: a claim is *confirmed* when the interval lies inside what the claim allows,
*not confirmed* when it lies outside, *inconclusive* when it straddles the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE = "confirmed", "not confirmed", "inconclusive"

# Two-sided 95 % Student-t quantiles by degrees of freedom (no scipy here).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("an interval needs at least 2 samples")
    if df in _T975:
        return _T975[df]
    below = max(k for k in _T975 if k <= df)
    return _T975[below] if df <= 30 else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    method: str

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 4) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] (n={self.n}, {self.method})"


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_interval(a, b) -> Interval:
    """95 % t-interval of mean(a_s - b_s) over seeds s (paired)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(diffs)
    half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return Interval(mean, mean - half, mean + half, len(diffs), "paired t over seeds")


def paired_bootstrap(a_W: torch.Tensor, b_W: torch.Tensor, resamples: int, seed: int = 0) -> Interval:
    """95 % percentile interval of mean(a_w - b_w) over held-out windows w."""
    if a_W.shape != b_W.shape:
        raise ValueError(f"paired windows differ: {tuple(a_W.shape)} vs {tuple(b_W.shape)}")
    diffs_W = (a_W - b_W).double()
    generator = torch.Generator().manual_seed(seed)
    picks_RW = torch.randint(0, len(diffs_W), (resamples, len(diffs_W)), generator=generator)
    means_R = diffs_W[picks_RW].mean(dim=1).sort().values
    low, high = means_R[int(0.025 * (resamples - 1))], means_R[int(math.ceil(0.975 * (resamples - 1)))]
    return Interval(float(diffs_W.mean()), float(low), float(high), len(diffs_W), f"paired bootstrap x{resamples}")


# --------------------------------------------------------------------------- #
# Verdict rules
# --------------------------------------------------------------------------- #
def within(diff: Interval, margin: float) -> str:
    """An equivalence claim ("a ≈ b"): the interval of a - b inside ±margin."""
    if -margin <= diff.low and diff.high <= margin:
        return CONFIRMED
    if diff.low > margin or diff.high < -margin:
        return NOT_CONFIRMED
    return INCONCLUSIVE


def not_worse(diff: Interval, margin: float) -> str:
    """"a is no worse than b" (losses, lower is better): a - b below +margin."""
    if diff.high <= margin:
        return CONFIRMED
    if diff.low > margin:
        return NOT_CONFIRMED
    return INCONCLUSIVE


def worse(diff: Interval) -> str:
    """"a is worse than b": a - b > 0 beyond noise."""
    if diff.low > 0:
        return CONFIRMED
    if diff.high < 0:
        return NOT_CONFIRMED
    return INCONCLUSIVE


def better(diff: Interval) -> str:
    """"a is better than b": a - b < 0 beyond noise."""
    if diff.high < 0:
        return CONFIRMED
    if diff.low > 0:
        return NOT_CONFIRMED
    return INCONCLUSIVE
