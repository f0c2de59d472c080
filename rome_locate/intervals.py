"""95% intervals over facts: the bootstrap of a mean every report and the validation use, and the Wilson interval of
a success rate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .records import Record

# Percentile bootstrap resamples per interval.
N_BOOTSTRAP = 2000


@dataclass(frozen=True)
class Interval(Record):
    """A mean over facts and its 95% bootstrap interval."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def text(self) -> str:
        """`mean [low, high]` to two decimals, or n/a."""
        if self.mean is None:
            return "n/a"
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def bootstrap(values: Sequence[float | None], seed: int = 0, n: int = N_BOOTSTRAP) -> Interval:
    """Mean and 95% percentile bootstrap interval over facts (None values left out)."""
    vals = np.array([v for v in values if v is not None], dtype=float)
    if not len(vals):
        return Interval(None, None, None, 0)
    rng = np.random.default_rng(seed)
    means = vals[rng.integers(0, len(vals), size=(n, len(vals)))].mean(1)
    return Interval(float(vals.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)),
                    len(vals))


def rate(successes: Sequence[float | None], z: float = 1.96) -> Interval:
    """A success rate over facts (0/1 outcomes, None left out) and its 95% Wilson score interval.

    Unlike the bootstrap, it does not collapse to a point when every fact
    succeeds or fails (20/20 gives [0.84, 1.00], not [1.00, 1.00]).
    """
    vals = [float(v) for v in successes if v is not None]
    if not vals:
        return Interval(None, None, None, 0)
    n, p = len(vals), sum(vals) / len(vals)
    centre, half = p + z * z / (2 * n), z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))
    return Interval(p, (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n), n)


def overlap(a: Interval, b: Interval) -> bool | None:
    """Whether two intervals share a point (None when either has no values)."""
    if a.mean is None or b.mean is None:
        return None
    return a.low <= b.high and b.low <= a.high
