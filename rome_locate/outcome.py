"""The outcome records of editing: how generations are decoded, what one edit of one fact measured (`EvalRecord`),
one step of the layer sweep, and the error that carries the finished records.

Metric names are documented in `rome_locate.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from .choose import LayerSource
from .records import Record

GenerationMode = Literal["greedy", "beam", "sample"]
# The metrics sequential editing re-measures on every earlier edit at its checkpoints.
SEQUENTIAL_FIELDS = ("success", "efficacy_score", "paraphrase_score", "rephrase_acc", "neighborhood_score",
                     "locality")


@dataclass(frozen=True)
class GenerationSettings(Record):
    """How generations are decoded: greedy (default), beam search or seeded sampling."""

    mode: GenerationMode = "greedy"
    max_new_tokens: int = 12
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("greedy", "beam", "sample"):
            raise ValueError(f"generation mode must be greedy, beam or sample, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mode == "beam" and self.num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {self.num_beams}")
        if self.mode == "sample" and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")


@dataclass(frozen=True)
class Generation(Record):
    """What the model says on one prompt before and after the edit."""

    prompt: str
    group: str  # "edit", "paraphrase" or "neighborhood"
    before: str
    after: str


@dataclass(frozen=True)
class LayerScore(Record):
    """Edit success when the fact is edited at one layer (one step of the sweep)."""

    layer: int
    effect: float | None  # traced indirect effect at this layer (p_restored - p_corrupt), if traced
    efficacy_score: float | None
    efficacy_magnitude: float | None
    paraphrase_score: float | None
    paraphrase_magnitude: float | None
    neighborhood_score: float | None
    neighborhood_magnitude: float | None
    rewrite_score: float | None
    score: float | None


@dataclass(frozen=True)
class EvalRecord(Record):
    """Everything measured for one fact edited at one layer: THE outcome record of `edit`, `eval` and the demo.

    `generations` is empty when generations are switched off (`rome-locate edit`),
    `sweep` when the layer sweep is. `metrics["success"]` is 1.0 when the first
    token of target_new is the top-1 next token after the edit prompt.
    """

    fact_id: str
    prompt: str
    subject: str
    target_true: str | None
    target_new: str
    layer: int  # the layer the main edit was made at
    layer_source: LayerSource  # by which rule: fixed, traced, fallback (the trace did not decide), validated, given
    editor: str
    generations: tuple[Generation, ...]
    metrics: dict[str, float | None]
    sweep: tuple[LayerScore, ...] = ()
    traced_layer: int | None = None  # what the traced layer rule decides for this fact (fallback included)
    fixed_layer: int | None = None  # the hyperparameters' layer
    margin: float | None = None  # traced effect of the best candidate minus the runner-up candidate's
    effects: tuple[float, ...] | None = None  # traced indirect effect per layer
    seconds: float = 0.0
    layer_reason: str = ""  # why this layer, in words (`choose.LayerDecision.reason`)
    # The editor's own report of the edit: EasyEdit's returned pre/post rewrite_acc, rephrase_acc, locality and
    # the layer it edited at (`rome_locate.easyedit.easyedit_metrics`); None for the built-in editor.
    editor_metrics: dict[str, Any] | None = None
    # Sequential editing: the metrics of this fact after the LAST edit, against the unedited model, and, at the
    # checkpoints (1, 2, 5, 10, ... edits and the last), the means over every edit so far, measured after this one.
    final_metrics: dict[str, float | None] | None = None
    after_n_edits: dict[str, float | None] | None = None
    # Mass editing: the window one update wrote (MEMIT, AlphaEdit; None: the one layer `layer`), and how many facts
    # that update (or run of updates, for ROME) held.
    layers: tuple[int, ...] | None = None
    batch_size: int = 1

    @property
    def best_layer(self) -> int | None:
        """The sweep's best layer (highest ROME score, then efficacy magnitude), or None without a sweep."""
        best = best_layer_score(self.sweep)
        return None if best is None else best.layer

    @property
    def success(self) -> bool:
        """The edit made target_new's first token the top-1 next token after the prompt."""
        return bool(self.metrics.get("success"))

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, with the derived `best_layer` (ignored when read back)."""
        return {**super().to_json(), "best_layer": self.best_layer}


class EvaluationError(RuntimeError):
    """Evaluation stopped at one fact; `records` holds the facts that finished before it."""

    def __init__(self, fact_id: str, cause: BaseException, records: list[EvalRecord]):
        super().__init__(f"evaluation failed on fact {fact_id!r} after {len(records)} finished fact(s): "
                         f"{type(cause).__name__}: {cause}")
        self.fact_id = fact_id
        self.cause = cause
        self.records = records


def best_layer_score(sweep: Sequence[LayerScore]) -> LayerScore | None:
    """The sweep step with the highest ROME score, ties broken by efficacy magnitude then lower layer."""
    if not sweep:
        return None
    def key(s: LayerScore):
        return (s.score if s.score is not None else -1.0,
                s.efficacy_magnitude if s.efficacy_magnitude is not None else -2.0, -s.layer)
    return max(sweep, key=key)

