"""Layer choice: the argmax of the indirect effect at the last subject token, per fact and per dataset.

Pure Python: it reads traced scores and never touches a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

from .records import Record


class Traced(Protocol):
    """What the choice needs from a trace (TraceResult satisfies it)."""

    fact_id: str
    kind: str

    @property
    def effects(self) -> Sequence[float]:
        """Indirect effect per layer at the last subject token."""
        ...


@dataclass(frozen=True)
class LayerChoice(Record):
    """One fact's chosen layer: the largest indirect effect, with the runner-up and the margin."""

    fact_id: str
    layer: int
    kind: str
    effect: float  # p_restored - p_corrupt at the chosen layer
    runner_up: int | None  # the second-best layer; None for a one-layer model
    margin: float  # effect(layer) - effect(runner_up); 0.0 without a runner-up


@dataclass(frozen=True)
class DatasetChoice(Record):
    """One layer for a whole dataset: the highest mean indirect effect, and the per-fact histogram."""

    layer: int
    kind: str
    mean_effects: tuple[float, ...]  # mean IE at the last subject token, per layer
    histogram: tuple[int, ...]  # number of facts whose own choice is each layer
    n_facts: int


def _effects(result: Traced) -> list[float]:
    effects = list(result.effects)
    if not effects:
        raise ValueError(f"fact {result.fact_id!r}: no scores to choose a layer from")
    if not all(math.isfinite(v) for v in effects):
        # NaN compares false with everything: an argmax over it would be an arbitrary layer.
        raise ValueError(f"fact {result.fact_id!r}: non-finite indirect effects {effects}; no layer is chosen from "
                         f"NaN (check the model's weights and dtype)")
    return effects


def _argmax(values: Sequence[float], skip: int | None = None) -> int:
    # Ties go to the lowest layer, so the choice never depends on float noise in the order of equal values.
    best = None
    for i, v in enumerate(values):
        if i != skip and (best is None or v > values[best]):
            best = i
    assert best is not None
    return best


def choose_layer(result: Traced) -> LayerChoice:
    """The layer of the largest indirect effect at the last subject token of one traced fact."""
    eff = _effects(result)
    layer = _argmax(eff)
    runner = _argmax(eff, skip=layer) if len(eff) > 1 else None
    margin = eff[layer] - eff[runner] if runner is not None else 0.0
    return LayerChoice(fact_id=str(result.fact_id), layer=layer, kind=str(result.kind), effect=eff[layer],
                       runner_up=runner, margin=margin)


def choose_dataset_layer(results: Sequence[Traced]) -> DatasetChoice:
    """The layer with the highest mean indirect effect over facts, and the histogram of per-fact choices."""
    results = list(results)
    if not results:
        raise ValueError("no traced facts to choose a dataset layer from")
    kinds = {str(r.kind) for r in results}
    if len(kinds) > 1:
        raise ValueError(f"traces of different kinds {sorted(kinds)} cannot share a layer choice")
    depths = {len(r.effects) for r in results}
    if len(depths) > 1:
        raise ValueError(f"traces have different numbers of layers {sorted(depths)}: not one model")
    n_layers = depths.pop()
    sums = [0.0] * n_layers
    hist = [0] * n_layers
    for r in results:
        for i, v in enumerate(_effects(r)):
            sums[i] += v
        hist[choose_layer(r).layer] += 1
    means = tuple(s / len(results) for s in sums)
    return DatasetChoice(layer=_argmax(means), kind=kinds.pop(), mean_effects=means, histogram=tuple(hist),
                         n_facts=len(results))
