"""The records of the validated search: grid settings, configurations, trial scores, test figures by layer
mode, and the whole `Validation` that `<stem>.validation.json` holds."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .intervals import Interval
from .models import ModelFingerprint
from .records import Record
from .trace import TraceSettings

PAPER_CONTEXT = ((5, 10), (10, 10))  # ROME's context templates: 10 of 5 tokens, 10 of 10 tokens


@dataclass(frozen=True)
class Setting(Record):
    """One point of the grid of v* optimisation settings."""

    v_lr: float
    v_num_grad_steps: int
    clamp_norm_factor: float
    v_weight_decay: float
    kl_factor: float
    context_template_length_params: tuple[tuple[int, int], ...]

    def overrides(self) -> dict[str, Any]:
        """The ROME hyperparameter fields this setting sets."""
        out = asdict(self)
        out["context_template_length_params"] = [list(p) for p in self.context_template_length_params]
        return out

    @property
    def cost(self) -> int:
        """Relative cost of one edit: gradient steps x prompts optimised (ties go to the cheaper)."""
        return self.v_num_grad_steps * (1 + sum(n for _, n in self.context_template_length_params))

    def label(self) -> str:
        """Short text form for tables."""
        ctx = "paper" if self.context_template_length_params else "none"
        return (f"lr {self.v_lr:g}, steps {self.v_num_grad_steps}, clamp {self.clamp_norm_factor:g}, "
                f"wd {self.v_weight_decay:g}, kl {self.kl_factor:g}, ctx {ctx}")


def default_grid() -> list[Setting]:
    """ROME's paper settings and the variations that matter on small models (2 x 2 x 1 x 2 = 8).

    Step size and length move together (the paper's 0.5 x 20, or 1.0 x 60), and
    so do the two norm bounds (the paper's clamp 4 with decay 0.5, or clamp 100
    with no decay: the paper's bounds are relative to GPT-2 XL's large MLP
    outputs); context templates are the paper's or none; kl_factor stays the paper's.
    """
    return [Setting(lr, steps, clamp, wd, kl, ctx) for (lr, steps), (clamp, wd), kl, ctx in itertools.product(
        ((0.5, 20), (1.0, 60)), ((4.0, 0.5), (100.0, 0.0)), (0.0625,), (PAPER_CONTEXT, ()))]


def paper_grid() -> list[Setting]:
    """ROME's paper settings only (the search then chooses the layer alone)."""
    return [Setting(0.5, 20, 4.0, 0.5, 0.0625, PAPER_CONTEXT)]


GRIDS = {"default": default_grid, "paper": paper_grid}


@dataclass(frozen=True)
class Config(Record):
    """A candidate configuration: an edit layer and a grid setting."""

    layer: int
    setting: Setting

    def label(self) -> str:
        return f"layer {self.layer}, {self.setting.label()}"


@dataclass(frozen=True)
class TrialScores(Record):
    """CounterFact success rates and the generation metrics of one trial edit (None where the fact has no such
    prompts)."""

    efficacy: float | None
    paraphrase: float | None
    neighborhood: float | None
    efficacy_magnitude: float | None
    gen_efficacy: float | None = None
    gen_paraphrase: float | None = None


# What the validated search optimises (`rome-locate hparams --objective`), as validation.json states it.
OBJECTIVES = {
    "counterfact": "CounterFact score: harmonic mean of the mean efficacy, paraphrase and neighbourhood success "
                   "rates; ties go to the cheaper setting (gradient steps x prompts)",
    "generation": "generation score: harmonic mean of the mean generation efficacy, generation paraphrase "
                  "(greedy continuations that start with target_new) and neighbourhood success rates; ties go to "
                  "the cheaper setting (gradient steps x prompts)",
}


def _json_threshold(threshold: float) -> float | None:
    # An infinite threshold (every fact at the fallback layer) is not JSON: null stands for it.
    return None if math.isinf(threshold) else threshold


@dataclass(frozen=True)
class Mode(Record):
    """Test-set figures of one way of choosing the layer."""

    name: str
    efficacy: Interval
    paraphrase: Interval
    neighborhood: Interval
    score: Interval  # the counterfact objective
    layers: dict[str, int] = field(default_factory=dict)  # layer -> number of facts
    # The generation metrics and the generation objective (None in records written before they existed).
    gen_efficacy: Interval | None = None
    gen_paraphrase: Interval | None = None
    gen_score: Interval | None = None


@dataclass(frozen=True)
class Validation(Record):
    """Everything the validated search did and found; `validation.json` is its `to_json`."""

    model: str
    facts_file: str
    n_facts: int
    n_known: int
    requests_built: bool
    n_calibration: int
    n_test: int
    dataset_layer: int
    mean_effects: tuple[float, ...]
    candidates: tuple[int, ...]
    grid: tuple[Setting, ...]
    rounds: tuple[dict[str, Any], ...]
    search_trials: int
    chosen: Config
    threshold: float
    test: tuple[Mode, ...]
    budget: int
    trials: int
    seconds: float
    seed: int
    test_fraction: float
    mom2: dict[str, Any]
    calibration_ids: tuple[str, ...] = ()
    test_ids: tuple[str, ...] = ()
    # How the calibration and test facts were traced, and the model traced and edited (as locate records them).
    trace_settings: TraceSettings | None = None
    model_fingerprint: ModelFingerprint | None = None
    objective_name: str = "counterfact"  # the key of OBJECTIVES the search optimised

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form; an infinite threshold (every fact at the chosen layer) is written as null."""
        out = super().to_json()
        out["threshold"] = _json_threshold(self.threshold)
        out["objective"] = OBJECTIVES[self.objective_name]
        return out

    def mode(self, name: str) -> Mode:
        return next(m for m in self.test if m.name == name)


