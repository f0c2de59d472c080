"""The records of the MEMIT/AlphaEdit window search: grid settings, window configurations, test figures of a batch,
and the whole `WindowValidation` that `<stem>.validation.json` beside a MEMIT YAML holds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from .intervals import Interval
from .models import ModelFingerprint
from .records import Record
from .trace import TraceSettings

# EasyEdit's shipped MEMIT window for LLaMA, Qwen and Mistral (GPT-J's, copied), and that YAML's settings
# (hparams/MEMIT/llama-7b.yaml): what a user without a config runs today.
EASYEDIT_WINDOW = (4, 5, 6, 7, 8)
EASYEDIT_SETTINGS = {"mom2_update_weight": 15000.0, "clamp_norm_factor": 4.0, "v_lr": 0.5, "v_num_grad_steps": 25,
                     "kl_factor": 0.0625, "v_weight_decay": 1e-3}


@dataclass(frozen=True)
class WindowSetting(Record):
    """One point of the grid of MEMIT settings (the fields EasyEdit's MEMIT YAML holds besides the window)."""

    mom2_update_weight: float
    clamp_norm_factor: float
    v_lr: float
    v_num_grad_steps: int
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    nullspace_threshold: float | None = None  # AlphaEdit only
    L2: float | None = None  # AlphaEdit only

    def overrides(self) -> dict[str, Any]:
        """The hyperparameter fields this setting sets."""
        return {k: v for k, v in self.to_json().items() if v is not None}

    @property
    def cost(self) -> int:
        """Relative cost of one edit: the gradient steps of each fact's z (ties go to the cheaper)."""
        return self.v_num_grad_steps

    def label(self) -> str:
        """Short text form for tables."""
        ns = "" if self.nullspace_threshold is None else f", null space < {self.nullspace_threshold:g}, L2 {self.L2:g}"
        lam = f"λ {self.mom2_update_weight:g}, " if self.nullspace_threshold is None else ""
        return (f"{lam}clamp {self.clamp_norm_factor:g}, lr {self.v_lr:g}, "
                f"steps {self.v_num_grad_steps}, kl {self.kl_factor:g}, wd {self.v_weight_decay:g}{ns}")


def default_window_grid(alg_name: str = "MEMIT") -> list[WindowSetting]:
    """MEMIT: λ (the weight of the statistics against the batch's keys) over four decades with a stronger
    optimisation of z than EasyEdit's, and EasyEdit's own v settings at λ 100 (5 settings; on the fact models the
    stronger z won every round of a first search of 8). AlphaEdit, which has no λ: both v settings x null-space
    thresholds 1e-2 and 1e-1 x L2 0.1, 1 and 10 (12)."""
    strong, easyedit = (4.0, 1.0, 40, 0.5), (4.0, 0.5, 25, 1e-3)
    if alg_name == "MEMIT":
        rows = [(strong, lam) for lam in (10.0, 100.0, 1000.0, 15000.0)] + [(easyedit, 100.0)]
        return [WindowSetting(lam, clamp, lr, steps, 0.0625, wd) for (clamp, lr, steps, wd), lam in rows]
    return [WindowSetting(15000.0, clamp, lr, steps, 0.0625, wd, t, l2)
            for (clamp, lr, steps, wd), t, l2 in itertools.product((strong, easyedit), (1e-2, 1e-1), (0.1, 1.0, 10.0))]


@dataclass(frozen=True)
class WindowConfig(Record):
    """A window of layers and a grid setting."""

    window: tuple[int, ...]
    setting: WindowSetting

    def label(self) -> str:
        """Short text form for tables."""
        return f"layers {list(self.window)} ({self.setting.label()})"


@dataclass(frozen=True)
class BatchFigures(Record):
    """One configuration measured on the test facts, `batch_size` facts written at once."""

    name: str
    window: tuple[int, ...]
    settings: dict[str, Any]
    batch_size: int
    efficacy: Interval
    paraphrase: Interval
    neighborhood: Interval
    objective: Interval


@dataclass(frozen=True)
class WindowValidation(Record):
    """Everything the window search did and measured; `<stem>.validation.json` beside a MEMIT/AlphaEdit YAML."""

    alg_name: str
    model: str
    facts_file: str
    n_facts: int
    n_known: int
    requests_built: bool
    n_calibration: int
    n_test: int
    dataset_layer: int
    mean_effects: tuple[float, ...]
    windows: tuple[tuple[int, ...], ...]
    grid: tuple[WindowSetting, ...]
    trial_batch: int
    rounds: tuple[dict[str, Any], ...]
    finals: tuple[dict[str, Any], ...]
    search_trials: int
    chosen: WindowConfig
    test: tuple[BatchFigures, ...]
    budget: int
    trials: int
    seconds: float
    seed: int
    test_fraction: float
    mom2: dict[str, Any]
    calibration_ids: tuple[str, ...] = ()
    test_ids: tuple[str, ...] = ()
    trace_settings: TraceSettings | None = None
    model_fingerprint: ModelFingerprint | None = None
    objective_name: str = "counterfact"
