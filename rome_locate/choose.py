"""Layer choice, the one home of it: the traced argmax per fact and per dataset, and the layer policy
(`LayerRule`) that every entrance applies to decide where a fact is edited.

Pure Python: it reads traced scores (and a validation record's JSON) and never touches a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence

from .arch import check_layer
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


# ---- the layer policy: which layer a fact is edited at, at every entrance ------------------------------------
#
# One rule, built once from the hyperparameters (their layer is the fallback) and the validation record written
# beside them by `rome-locate hparams`, decides the edit layer of every fact in the CLI (`edit`, `eval`), the
# Python API (`pipeline.run_pipeline`, `edit_facts`), the EasyEdit one-line change (every request) and the
# report's verdict. Nothing else chooses a layer.

LayerMode = Literal["fixed", "traced", "validated"]
# Why a fact got its layer: the hyperparameters' layer (fixed), its traced candidate (traced), the hyperparameters'
# layer because the trace did not decide (fallback), trial edits (validated), or a layer given by hand (given).
LayerSource = Literal["fixed", "traced", "fallback", "validated", "given"]
LAYER_MODES: tuple[str, ...] = ("fixed", "traced", "validated")
VALIDATED_TOP_K = 2  # `validated` trial-edits the fallback layer and this many minus one traced candidates
VALIDATION_SUFFIX = ".validation.json"


@dataclass(frozen=True)
class LayerDecision(Record):
    """One fact's edit layer, the rule's source for it, and why, in words."""

    layer: int
    source: LayerSource
    reason: str
    best: int | None = None  # the candidate of largest traced effect (what the trace alone would pick)
    margin: float | None = None  # its effect minus the runner-up candidate's; None without a trace


@dataclass(frozen=True)
class LayerRule(Record):
    """How every fact's edit layer is chosen: the mode, the traced candidates, the fallback layer, the threshold.

    `traced`: the candidate with the largest indirect effect at the last subject
    token, unless that effect is not positive or its margin over the runner-up
    candidate is below `threshold` (then `fallback`, the hyperparameters' layer).
    `validated`: trial edits at `tries(effects)`, the best kept (`pick`).
    `fixed`: always `fallback`.
    """

    mode: LayerMode
    fallback: int
    candidates: tuple[int, ...]
    threshold: float  # inf: every traced fact goes to the fallback layer
    source: str  # the validation record it came from, or why there was none

    def __post_init__(self) -> None:
        if self.mode not in LAYER_MODES:
            raise ValueError(f"layers must be one of {LAYER_MODES}, got {self.mode!r}")
        if not self.candidates:
            raise ValueError(f"the layer rule ({self.source}) has no candidate layer")
        if not (self.threshold >= 0):  # also refuses NaN
            raise ValueError(f"the layer rule's margin threshold must be >= 0, got {self.threshold}")

    def traced(self, effects: Sequence[float]) -> LayerDecision:
        """The `traced` decision for a fact with these indirect effects per layer (whatever the rule's mode)."""
        effects = _checked_effects(effects, self.candidates)
        ranked = sorted(self.candidates, key=lambda l: (-effects[l], l))
        best = ranked[0]
        margin = effects[best] - effects[ranked[1]] if len(ranked) > 1 else math.inf
        if effects[best] <= 0:
            return LayerDecision(self.fallback, "fallback", f"no candidate layer has a positive effect (best: layer "
                                 f"{best}, {effects[best]:+.4f}); the hyperparameters' layer {self.fallback}",
                                 best, margin)
        if margin < self.threshold:
            return LayerDecision(self.fallback, "fallback", f"margin {margin:.4f} of layer {best} is below the "
                                 f"threshold {self.threshold:.4g}; the hyperparameters' layer {self.fallback}",
                                 best, margin)
        return LayerDecision(best, "traced", f"largest effect among candidates {list(self.candidates)} "
                             f"({effects[best]:+.4f}, margin {margin:.4f} >= threshold {self.threshold:.4g})",
                             best, margin)

    def decide(self, effects: Sequence[float] | None) -> LayerDecision:
        """The decision of the rule's mode for one fact (`validated` needs trial edits: use `tries` and `pick`)."""
        if self.mode == "fixed":
            return LayerDecision(self.fallback, "fixed", self.source if self.source.startswith(WINDOW) else
                                 "the hyperparameters' layer")
        if self.mode == "validated":
            raise ValueError("layers='validated' is decided by trial edits: LayerRule.tries, then LayerRule.pick")
        if effects is None:
            raise ValueError("layers='traced' needs the fact's trace")
        return self.traced(effects)

    def tries(self, effects: Sequence[float]) -> list[int]:
        """The layers `validated` trial-edits: the fallback layer, then the best traced other candidates."""
        effects = _checked_effects(effects, self.candidates)
        others = sorted((l for l in self.candidates if l != self.fallback), key=lambda l: (-effects[l], l))
        return [self.fallback] + others[:VALIDATED_TOP_K - 1]

    def pick(self, results: Mapping[int, Any]) -> LayerDecision:
        """The `validated` decision from trial edits {layer: scores with efficacy, neighborhood, efficacy_magnitude}:
        the best on the edit prompt and its neighbourhood (paraphrases are held apart); ties go to the fallback."""
        def key(layer: int):
            s = results[layer]
            return ((s.efficacy or 0.0) + (s.neighborhood if s.neighborhood is not None else 1.0),
                    s.efficacy_magnitude or 0.0, layer == self.fallback, -layer)
        layer = max(results, key=key)
        return LayerDecision(int(layer), "validated", f"best trial edit of layers {sorted(results)} on the edit "
                             f"prompt and its neighbourhood")

    def describe(self) -> str:
        """One line for the user: mode, candidates, fallback layer, threshold and where they came from."""
        if self.mode == "fixed":
            if self.source.startswith(WINDOW):
                return f"every fact in {self.source}"
            return f"every fact at the hyperparameters' layer {self.fallback}"
        return (f"{self.mode}: candidates {list(self.candidates)}, fallback layer {self.fallback}, "
                f"margin threshold {self.threshold:.4g} ({self.source})")

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form; an infinite threshold (every traced fact at the fallback layer) is written as null."""
        out = super().to_json()
        out["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, strict: bool = False) -> "LayerRule":
        """Inverse of `to_json` (a null threshold is infinite)."""
        obj = dict(obj)
        if obj.get("threshold", 0.0) is None:
            obj["threshold"] = math.inf
        return super().from_json(obj, strict=strict)


def _checked_effects(effects: Sequence[float], candidates: Sequence[int]) -> list[float]:
    effects = [float(e) for e in effects]
    if max(candidates) >= len(effects):
        raise ValueError(f"candidate layer {max(candidates)} but the trace has {len(effects)} layers: "
                         f"the rule and the trace are of different models")
    if not all(math.isfinite(effects[l]) for l in candidates):
        raise ValueError(f"non-finite indirect effects {effects}; no layer is chosen from NaN "
                         f"(check the model's weights and dtype)")
    return effects


def editable_layers(n_layers: int) -> tuple[int, ...]:
    """Every layer ROME can edit: all but the last (its MLP output reaches the logits through no later block)."""
    return tuple(range(max(1, n_layers - 1)))


def dataset_edit_layer(mean_effects: Sequence[float]) -> int:
    """The dataset's edit layer: the editable layer (never the last) of largest mean indirect effect."""
    editable = editable_layers(len(mean_effects))
    return max(editable, key=lambda l: (mean_effects[l], -l))


def validation_record_path(hparams_path: str | Path) -> Path:
    """Where `rome-locate hparams` writes the validation record of a YAML: `<stem>.validation.json`."""
    return Path(f"{Path(hparams_path).with_suffix('')}{VALIDATION_SUFFIX}")


def layer_rule(mode: str, fallback: int, n_layers: int, hparams_path: str | Path | None = None) -> LayerRule:
    """THE layer rule: from the validation record beside `hparams_path` when there is one, else the defaults.

    Defaults (no record: a hand-written or trace-only YAML): every editable layer
    is a candidate and the threshold is 0, so a fact goes to its largest positive
    traced effect below the last layer, or to `fallback` when it has none.
    """
    fallback = check_layer(int(fallback), n_layers, "the hyperparameters' layer")
    path = None if hparams_path is None else validation_record_path(hparams_path)
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            candidates = tuple(int(l) for l in data["candidates"])
            threshold = math.inf if data.get("threshold") is None else float(data["threshold"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a validation record of rome-locate hparams ({exc})") from None
        for layer in candidates:
            check_layer(layer, n_layers, f"candidate layer of {path}")
        return LayerRule(mode, fallback, candidates, threshold, str(path))  # type: ignore[arg-type]
    why = "no validation record" if path is None else f"no {path.name}"
    return LayerRule(mode, fallback, editable_layers(n_layers), 0.0,  # type: ignore[arg-type]
                     f"{why}: the largest positive traced effect below the last layer")


WINDOW = "the hyperparameters' window"  # a window rule's source starts so


def window_rule(window: Sequence[int], n_layers: int, mode: str = "fixed") -> LayerRule:
    """The rule of a window algorithm (MEMIT, AlphaEdit): every fact in the YAML's window, no per-fact choice; the
    record keeps the window's last layer (where MEMIT's z is read). Other modes are an error naming --layers."""
    window = [check_layer(int(l), n_layers, f"layer of the hyperparameters' window {list(window)}:") for l in window]
    if mode != "fixed":
        raise ValueError(f"--layers {mode} chooses ROME's one layer per fact; a MEMIT or AlphaEdit window is the "
                         f"YAML's layers {window} (validated by `rome-locate hparams --alg MEMIT`): use --layers "
                         f"fixed")
    return LayerRule("fixed", window[-1], (window[-1],), 0.0, f"{WINDOW} {window}")  # type: ignore[arg-type]


@dataclass(frozen=True)
class Placement:
    """Where one fact is edited (the rule's decision), what the traced rule would decide, and the trace behind it."""

    decision: LayerDecision
    traced: LayerDecision | None = None  # the rule's traced decision for this fact, for the report; None untraced
    trace: Any = None  # the TraceResult (anything with `effects`), for the sweep's effects and the report
    fallback: int | None = None  # the hyperparameters' layer, for the report's fixed strategy

    @property
    def layer(self) -> int:
        """The layer the fact is edited at."""
        return self.decision.layer

    @property
    def source(self) -> LayerSource:
        """Why: fixed, traced, fallback, validated or given."""
        return self.decision.source


def place(facts: Sequence[Any], rule: LayerRule, located: Sequence[Any] | None = None, *,
          picks: Sequence[LayerDecision] | None = None) -> list[Placement]:
    """Every fact's placement by `rule`; `located` is aligned with `facts` BY POSITION (ids only cross-check it).

    An entry of `located` is locate()'s `(TraceResult, LayerChoice)` pair, a
    TraceResult, or an int (a layer given by hand, used whatever the mode).
    `validated` takes its decisions from `picks` (trial edits, aligned by position).
    """
    n = len(facts)
    if located is None:
        if rule.mode != "fixed":
            raise ValueError(f"layers={rule.mode!r} needs the facts' traces (locate()'s (TraceResult, LayerChoice) "
                             f"pairs)")
        return [Placement(rule.decide(None), fallback=rule.fallback) for _ in range(n)]
    located = list(located)
    if len(located) != n:
        raise ValueError(f"{len(located)} layer choices for {n} facts (they are matched by position)")
    if rule.mode == "validated" and (picks is None or len(picks) != n):
        raise ValueError("layers='validated' needs one trial-edit pick per fact (validate.validated_layers)")
    out = []
    for i, (fact, entry) in enumerate(zip(facts, located)):
        if isinstance(entry, int) and not isinstance(entry, bool):
            out.append(Placement(LayerDecision(int(entry), "given", "a layer given by hand"), fallback=rule.fallback))
            continue
        trace = entry[0] if isinstance(entry, tuple) else entry
        fact_id = getattr(trace, "fact_id", None)
        if fact_id is not None and str(fact_id) != str(fact.id):
            raise ValueError(f"layer choice {i} is for fact {fact_id!r} but fact {i} is {fact.id!r}; "
                             f"the choices must be in the order of the facts")
        if getattr(trace, "effects", None) is None and rule.mode == "fixed":
            out.append(Placement(rule.decide(None), fallback=rule.fallback))  # the fixed layer needs no trace
            continue
        if getattr(trace, "effects", None) is None:
            raise ValueError(f"layer choice {i} (fact {fact.id!r}) carries no trace: the layer rule reads the "
                             f"traced effects; pass locate()'s (TraceResult, LayerChoice) pairs, or ints for layers "
                             f"given by hand")
        traced = rule.traced(trace.effects)
        decision = picks[i] if rule.mode == "validated" else traced if rule.mode == "traced" else rule.decide(None)
        out.append(Placement(decision, traced, trace, rule.fallback))
    return out
