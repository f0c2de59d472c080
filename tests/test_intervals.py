"""95% bootstrap intervals and the eval report's verdict line, on inputs whose answers are known."""

from __future__ import annotations

import pytest

from rome_locate.summary import verdict
from rome_locate.intervals import Interval, bootstrap, overlap


def test_bootstrap_known_inputs():
    same = bootstrap([1.0, 1.0, 1.0, 1.0])
    assert (same.mean, same.low, same.high, same.n) == (1.0, 1.0, 1.0, 4)
    # Two facts, 0 and 1: a resample is all-0 or all-1 a quarter of the time each, so the 2.5/97.5
    # percentiles of the resampled means are exactly 0 and 1.
    half = bootstrap([0.0, 1.0, None])
    assert (half.mean, half.low, half.high, half.n) == (0.5, 0.0, 1.0, 2)
    wide = bootstrap([0, 1, 1, 1, 0, 1, 1, 1], seed=3)
    assert wide.mean == 0.75 and wide.low < 0.75 < wide.high and wide == bootstrap([0, 1, 1, 1, 0, 1, 1, 1], 3)
    assert bootstrap([]) == Interval(None, None, None, 0) and bootstrap([]).text() == "n/a"
    assert half.text() == "0.50 [0.00, 1.00]"


def test_overlap():
    assert overlap(Interval(0.5, 0.4, 0.6, 5), Interval(0.65, 0.6, 0.7, 5)) is True  # touching counts
    assert overlap(Interval(0.5, 0.4, 0.59, 5), Interval(0.65, 0.6, 0.7, 5)) is False
    assert overlap(Interval(None, None, None, 0), Interval(0.65, 0.6, 0.7, 5)) is None


def _row(mean, low, high, n=10):
    return {"n": n, "score": mean, "intervals": {"score": [low, high]}}


def test_verdict_names_the_best_and_traced_vs_fixed():
    strategies = {"traced": _row(0.9, 0.85, 0.95), "fixed": _row(0.7, 0.6, 0.8), "sweep best": _row(0.99, 0.98, 1.0)}
    line = verdict(strategies)
    assert line.startswith("best layer choice by ROME score: traced 0.90 [0.85, 0.95] (fixed 0.70 [0.60, 0.80])")
    assert "the traced layer beats the fixed one, 95% intervals do not overlap" in line
    assert line.endswith("sweep-best oracle 0.99 [0.98, 1.00].")  # the oracle is shown, never the best choice
    close = verdict({"traced": _row(0.7, 0.5, 0.9), "fixed": _row(0.8, 0.6, 0.95)})
    assert close.startswith("best layer choice by ROME score: fixed 0.80")
    assert "the traced layer trails the fixed one, 95% intervals overlap: not a clear difference" in close
    assert verdict({"validated": _row(0.9, 0.8, 1.0)}) == "best layer choice by ROME score: validated 0.90 [0.80, 1.00]."
    assert verdict({}) is None


def test_rate_interval_is_wilson_and_never_collapses_at_all_or_nothing():
    from rome_locate.intervals import rate

    every = rate([1.0] * 20)
    assert every.mean == 1.0 and every.high == pytest.approx(1.0) and every.low == pytest.approx(0.8389, abs=1e-4)
    half = rate([1, 0] * 5 + [None])
    assert half.n == 10 and half.mean == 0.5 and (half.low, half.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert rate([None]).mean is None
