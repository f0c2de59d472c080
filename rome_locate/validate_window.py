"""Validated MEMIT and AlphaEdit hyperparameters: choose the layer window and the settings by trial edits of batches.

`rome-locate hparams --alg MEMIT` (or AlphaEdit) runs this search:

1. keep the facts the model knows, build counterfactual requests where needed,
   and split them by subject into calibration and test facts (as ROME's
   search, `validate._prepare`);
2. trace the calibration facts; propose contiguous windows of 1 to
   `max_window` layers that hold the dataset layer (the largest mean indirect
   effect of the MLPs at the subject's last token, as MEMIT's authors chose
   their window), never the last layer;
3. trial-edit every (window, grid setting) on batches of `trial_batch`
   calibration facts written at once, by successive halving within `budget`
   facts edited (`validate.schedule`, in batches); the best `ETA` go on to one
   batch of all calibration facts (up to `max_batch`), where the winner is
   chosen: a MEMIT YAML is for mass editing;
4. measure on the test facts only (never seen by a choice): the chosen
   configuration with every test fact in one batch and in batches of
   `trial_batch`, and EasyEdit's default window (4-8, clipped to the model)
   with its shipped settings, with 95% bootstrap intervals.

Every trial edit is `batches.measure_batch`, the pipeline's own batch step, with a
built-in editor that keeps each fact's z across trials (z depends on the z layer and
the v settings only, not on the window's start or on λ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from .batches import measure_batch
from .choose import dataset_edit_layer, editable_layers
from .editors import BuiltinEditor
from .facts import Fact
from .intervals import bootstrap
from .memit_hparams import with_window
from .trace import TraceSettings
from .validate import ETA, ValidationError, check_objective, objective, prepare_traced, schedule, score_interval
from .validation_records import TrialScores
from .window_records import (EASYEDIT_SETTINGS, EASYEDIT_WINDOW, BatchFigures, WindowConfig, WindowSetting,
                             WindowValidation, default_window_grid)

MAX_WINDOW = 5  # MEMIT's published windows hold 5 layers


def propose_windows(mean_effects: Sequence[float], n_layers: int, max_size: int = MAX_WINDOW
                    ) -> tuple[int, list[tuple[int, ...]]]:
    """(dataset layer, windows): every contiguous window of 1..`max_size` editable layers holding the dataset
    layer, smallest first."""
    centre = dataset_edit_layer(mean_effects)
    editable = set(editable_layers(n_layers))
    out = []
    for size in range(1, max_size + 1):
        for start in range(centre - size + 1, centre + 1):
            window = tuple(range(start, start + size))
            if all(l in editable for l in window):
                out.append(window)
    return centre, out


def easyedit_window(n_layers: int) -> tuple[int, ...]:
    """EasyEdit's shipped window (4-8) clipped to the model's layers; the earliest 5 layers where it has no
    layer 4 or more."""
    window = tuple(l for l in EASYEDIT_WINDOW if l < n_layers)
    return window or tuple(range(min(MAX_WINDOW, n_layers)))


def _scores(records: Sequence[Any]) -> list[TrialScores]:
    return [TrialScores(r.metrics["efficacy_score"], r.metrics["paraphrase_score"], r.metrics["neighborhood_score"],
                        r.metrics["efficacy_magnitude"], r.metrics.get("gen_efficacy"),
                        r.metrics.get("gen_paraphrase")) for r in records]


@dataclass
class _BatchTrials:
    """Trial edits of batches with a cache: a configuration writes one batch once, whatever asks for it."""

    model: Any
    tok: Any
    base: Any
    n_layers: int
    bar: Any
    chat_template: bool = False
    editor: BuiltinEditor = field(default_factory=lambda: BuiltinEditor(reuse_targets=True))
    cache: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)  # each fact measured once on the unedited model, for every trial
    count: int = 0

    def hparams(self, window: Sequence[int], overrides: dict[str, Any]) -> Any:
        return with_window(replace(self.base, **overrides), window, self.n_layers)

    def run(self, config: WindowConfig, facts: Sequence[Fact]) -> list[TrialScores]:
        key = (config, tuple((f.id, f.prompt) for f in facts))
        if key not in self.cache:
            hp = self.hparams(config.window, config.setting.overrides())
            self.cache[key] = _scores(measure_batch(self.model, self.tok, facts, hp, self.editor,
                                                    self.chat_template, self.before))
            self.count += len(facts)
            self.bar.update(len(facts))
        return self.cache[key]


def _batches(facts: Sequence[Fact], size: int) -> list[list[Fact]]:
    return [list(facts[i:i + size]) for i in range(0, len(facts), size)]


def _search(trials: _BatchTrials, configs: list[WindowConfig], calib: list[Fact], trial_batch: int, budget: int,
            dataset_layer: int, kind: str) -> tuple[list[WindowConfig], list[dict[str, Any]]]:
    """Successive halving over batches of calibration facts; (the survivors best first, the log of each round)."""
    batches = _batches(calib, trial_batch)
    try:
        rounds = schedule(len(configs), len(batches), max(1, budget // trial_batch))
    except ValidationError:
        raise ValidationError(f"--budget {budget} facts edited is too small for one batch of {trial_batch} facts "
                              f"per configuration ({len(configs)} configurations, successive halving): raise "
                              f"--budget or narrow the grid") from None
    alive, log = configs, []

    def order(c: WindowConfig, values: dict) -> tuple:
        # Best first; ties go to the cheaper setting, the smaller window, then the one nearest the dataset layer.
        return (-round(values[c], 9), c.setting.cost, len(c.window), abs(c.window[-1] - dataset_layer), c.window)

    for r, (k, n) in enumerate(rounds):
        alive = alive[:k]
        values = {c: objective([s for b in batches[:n] for s in trials.run(c, b)], kind) for c in alive}
        alive = sorted(alive, key=lambda c: order(c, values))
        log.append({"round": r, "configurations": len(values), "batches": n, "facts": sum(map(len, batches[:n])),
                    "best": [{"config": c.label(), "objective": values[c]} for c in alive[:5]]})
    return alive, log


def _figures(name: str, config: WindowConfig, batch_size: int, scores: Sequence[TrialScores], seed: int,
             kind: str) -> BatchFigures:
    return BatchFigures(name, config.window, config.setting.overrides(), batch_size,
                        bootstrap([s.efficacy for s in scores], seed), bootstrap([s.paraphrase for s in scores], seed),
                        bootstrap([s.neighborhood for s in scores], seed), score_interval(scores, seed, kind=kind))


def _test(trials: _BatchTrials, chosen: WindowConfig, test: list[Fact], trial_batch: int, max_batch: int,
          seed: int, kind: str) -> tuple[BatchFigures, ...]:
    """The chosen configuration on the test facts (all at once, and in trial batches) and EasyEdit's default."""
    at_once = test[:max_batch]
    alpha = {} if chosen.setting.nullspace_threshold is None else dict(nullspace_threshold=2e-2, L2=10.0)
    default = WindowConfig(easyedit_window(trials.n_layers), WindowSetting(**EASYEDIT_SETTINGS, **alpha))
    rows = [("validated window", chosen, at_once, len(at_once)),
            ("validated window", chosen, test, trial_batch),
            ("EasyEdit's default window", default, at_once, len(at_once))]
    out = []
    for name, config, facts, size in rows:
        scores = [s for b in _batches(facts, size) for s in trials.run(config, b)]
        out.append(_figures(name, config, size, scores, seed, kind))
    return tuple(out)


def run_window_validation(model, tok, facts: Sequence[Fact], base_hparams, *, facts_file: str = "",
                          model_name: str = "", test_fraction: float = 0.5, budget: int = 3000,
                          n_calibration: int = 100, n_test: int = 100, trial_batch: int = 10, max_batch: int = 100,
                          grid: Sequence[WindowSetting] | None = None, seed: int = 0,
                          trace_settings: TraceSettings = TraceSettings(), arch: Any = None, progress: bool = True,
                          log: Callable[[str], None] = print, objective_name: str = "counterfact",
                          max_window: int = MAX_WINDOW) -> WindowValidation:
    """The window search (module docstring); `base_hparams` (MEMIT or AlphaEdit) supplies every field the search
    does not set."""
    from tqdm.auto import tqdm

    from .arch import arch_for
    from .models import fingerprint

    t0 = time.perf_counter()
    kind = check_objective(objective_name)
    if trial_batch < 1 or max_batch < trial_batch:
        raise ValidationError(f"trial batches need 1 <= trial_batch <= max_batch, got {trial_batch} and {max_batch}")
    grid = list(grid or default_window_grid(base_hparams.alg_name))
    arch = arch_for(model, arch)
    chat = trace_settings.chat_template
    facts = list(facts)
    known, calib, test, built, _, d = prepare_traced(model, tok, facts, test_fraction, seed, facts_file,
                                                     n_calibration, n_test, log, trace_settings, arch, progress)
    dataset_layer, windows = propose_windows(d.mean_effects, arch.n_layers, max_window)
    log(f"traced: dataset layer {dataset_layer}; {len(windows)} windows of 1 to {max_window} layers around it")
    configs = [WindowConfig(w, s) for w in windows for s in grid]
    bar = tqdm(desc=f"validate {base_hparams.alg_name}", unit="fact", disable=not progress)
    trials = _BatchTrials(model, tok, base_hparams, arch.n_layers, bar, chat)
    try:
        alive, rounds = _search(trials, configs, calib, trial_batch, budget, dataset_layer, kind)
        finals_batch = calib[:max_batch]
        finals = {c: objective(trials.run(c, finals_batch), kind) for c in alive[:ETA]}
        chosen = max(finals, key=lambda c: (round(finals[c], 9), -c.setting.cost, -len(c.window)))
        search_trials = trials.count
        figures = _test(trials, chosen, test, trial_batch, max_batch, seed, kind)
    finally:
        bar.close()
    return WindowValidation(
        alg_name=base_hparams.alg_name, model=model_name, facts_file=str(facts_file), n_facts=len(facts),
        n_known=len(known), requests_built=built, n_calibration=len(calib), n_test=len(test),
        dataset_layer=dataset_layer, mean_effects=tuple(float(x) for x in d.mean_effects), windows=tuple(windows),
        grid=tuple(grid), trial_batch=trial_batch, rounds=tuple(rounds),
        finals=tuple({"config": c.label(), "batch": len(finals_batch), "objective": v} for c, v in finals.items()),
        search_trials=search_trials, chosen=chosen, test=figures, budget=budget, trials=trials.count,
        seconds=time.perf_counter() - t0, seed=seed, test_fraction=test_fraction,
        mom2={"mom2_adjustment": base_hparams.mom2_adjustment, "mom2_dataset": base_hparams.mom2_dataset,
              "mom2_n_samples": base_hparams.mom2_n_samples},
        calibration_ids=tuple(f.id for f in calib), test_ids=tuple(f.id for f in test),
        trace_settings=trace_settings, model_fingerprint=fingerprint(model), objective_name=kind)


def chosen_hparams(v: WindowValidation, base_hparams: Any, n_layers: int) -> Any:
    """The hyperparameters the search chose: `base_hparams` with its window and setting."""
    return with_window(replace(base_hparams, **v.chosen.setting.overrides()), v.chosen.window, n_layers)

