"""How sure a difference between two models is, on the same test examples.

Both methods of the project report their comparisons (RECO against the mean of its neighbours,
µ-VLA against no pre-training) as a paired difference: per-example scores of two models on the
same examples, their mean difference, its standard error, and a seeded bootstrap interval.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over n examples, with its standard error and bootstrap 95 % interval."""

    difference: float
    standard_error: float
    ci_low: float
    ci_high: float
    n: int
    disagree: float  # share of examples where a and b score differently

    def describe(self, scale: float = 100.0, unit: str = " points") -> str:
        s = scale
        return (f"{self.difference * s:+.1f}{unit} (paired SE {self.standard_error * s:.1f}; bootstrap 95% CI "
                f"[{self.ci_low * s:+.1f}, {self.ci_high * s:+.1f}]; n = {self.n}, they differ on "
                f"{self.disagree:.1%})")


def paired_difference(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """a, b [n]: per-example scores (e.g. top-1 hits as 0/1) of two models on the same n examples.

    The standard error is std(a - b, ddof=1) / sqrt(n); the interval is the 2.5th and 97.5th
    percentile of the mean difference over `resamples` resamples of the examples (seeded).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"paired_difference: need two [n] arrays of one shape with n >= 2, got {a.shape}, {b.shape}")
    d = a - b
    n = len(d)
    means = d[np.random.default_rng(seed).integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(float(d.mean()), float(d.std(ddof=1) / np.sqrt(n)), float(low), float(high), n,
                            float(np.mean(d != 0)))
