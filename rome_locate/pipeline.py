"""The general pipeline: locate if needed → hyperparameters' statistics → edit → evaluate → report.

`rome-locate edit`, `rome-locate eval` and the demo all run `run_pipeline`;
`edit` is the pipeline with generations and the layer sweep switched off.
results.json is rewritten after every fact, so a later failure loses nothing
finished, and the report is written in `finally`.
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .arch import Arch, arch_for, check_layer
from .edit import EDITORS, edited, ensure_stats
from .evaluate import (LAYER_MODES, EvalRecord, EvaluationError, GenerationSettings, check_editable, evaluate,
                       evaluate_sequential, place)
from .facts import Fact
from .locate import locate
from .models import fingerprint
from .report import run_settings, write_report, write_results_json
from .trace import TraceSettings


def editable(facts: Sequence[Fact], located: Sequence[Any] | None = None, *,
             skip_errors: bool = False) -> tuple[list[Fact], list[Any] | None]:
    """The facts that can be edited (and their layer choices, kept aligned); the others are an error, or skipped
    with a warning under `skip_errors` (no target_new; target_new equal to the true answer)."""
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to edit")
    if located is not None:
        located = list(located)
        if len(located) != len(facts):
            raise ValueError(f"{len(located)} layer choices for {len(facts)} facts (they are matched by position)")
    keep = []
    for i, fact in enumerate(facts):
        try:
            check_editable(fact)
        except ValueError as exc:
            if not skip_errors:
                raise
            warnings.warn(f"skipped: {exc}", stacklevel=3)
            continue
        keep.append(i)
    if not keep:
        raise ValueError("no fact can be edited (every one was skipped)")
    return [facts[i] for i in keep], None if located is None else [located[i] for i in keep]


def run_pipeline(model, tok, facts: Sequence[Fact], hparams: Any, out_dir: str | Path | None = None, *,
                 model_name: str | None = None, layers: str = "fixed", sweep: bool | Sequence[int] = False,
                 trace_settings: TraceSettings | None = None, located: Sequence[Any] | None = None,
                 generation: GenerationSettings | None = GenerationSettings(), editor: str = "builtin",
                 edit_context: Callable | None = None, seed: int = 0, mom2_corpus: str | Path | None = None,
                 arch: Arch | str | Path | dict | None = None, facts_path: str | None = None,
                 max_neighborhood: int | None = None, skip_errors: bool = False, sequential: bool = False,
                 progress: bool = True, extra_settings: dict[str, Any] | None = None,
                 started: float | None = None, dataset: Sequence[Fact] | None = None,
                 layer_rule: Any = None) -> tuple[list[EvalRecord], dict[str, Path]]:
    """Edit and evaluate every fact; with `out_dir`, results.json after every fact and the report at the end.

    Layers: `layers="traced"` edits each fact at its traced layer (with
    `layer_rule`, a `validate.LayerRule`: its best validated candidate, or the
    hyperparameters' layer when the trace margin is below the calibrated
    threshold), "validated" at the best of `layer_rule`'s tries for it by trial
    edits (the same edit-and-measure step as the pipeline's, `validate.trial_edit`;
    without a rule, every editable layer is a candidate), "fixed" at the
    hyperparameters'. `located` (locate()'s pairs, LayerChoices or ints) is aligned
    with `facts` by position; without it, the facts are traced with
    `trace_settings` when the layers or the sweep need a trace (into
    OUT/locate.jsonl, resumable). Every layer is checked against the model
    before any work. `generation=None` and `sweep=False` is `rome-locate edit`.
    `edit_context` replaces the editor (tests); the built-in editor is seeded
    with `seed`; EasyEdit's runs through one BaseEditor over the loaded model
    (`rome_locate.easyedit.EasyEditSession`, its logs in OUT/easyedit). With
    `sequential`, edits accumulate (each fact still at its own layer) and the
    summary reports retention; the model is restored at the end. With mom2_adjustment on, statistics missing for a layer are
    computed from `mom2_corpus` into OUT/stats. On a failure the report covers
    the finished facts, names the error, and the `EvaluationError` is raised
    again. `started` (a `time.perf_counter()` value) is where the wall time starts.
    `dataset`, when `facts` is a torchrun rank's block of it, is what the
    noise level of the traces comes from (locate's `dataset`).
    """
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if editor not in EDITORS and edit_context is None:
        raise ValueError(f"editor must be one of {EDITORS}, got {editor!r}")
    if sequential and sweep:
        raise ValueError("the layer sweep edits one fact at a time: it cannot run with sequential editing")
    t0 = time.perf_counter() if started is None else started
    facts, located = editable(facts, located, skip_errors=skip_errors)
    arch = arch_for(model, arch)
    n_layers = arch.n_layers
    sweep_layers = list(range(n_layers)) if sweep is True else [int(x) for x in (sweep or ())]
    out = Path(out_dir) if out_dir is not None else None
    # Every layer is checked before any tracing or editing.
    placements = place(facts, hparams, "fixed" if located is None or layers == "validated" else layers, located,
                       n_layers=n_layers, rule=layer_rule)
    for layer in sweep_layers:
        check_layer(layer, n_layers, "sweep layer")
    if layers == "validated" and layer_rule is None:
        from .validate import plain_rule

        layer_rule = plain_rule(placements[0].layer if placements else int(hparams.layers[0]), n_layers)
    for layer in getattr(layer_rule, "candidates", ()):
        check_layer(layer, n_layers, f"candidate layer of the layer rule ({layer_rule.source})")
    if located is None and (layers != "fixed" or sweep_layers):
        # The sweep compares edit success with the traced effect, so it traces too.
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        if dataset is not None:  # the noise level one process gets: over every editable fact
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = editable(dataset, skip_errors=True)[0]
        located = locate(model, tok, facts, trace_settings or TraceSettings(), arch=arch, progress=progress,
                         out=None if out is None else out / "locate.jsonl", dataset=dataset)
        placements = place(facts, hparams, "fixed" if layers == "validated" else layers, located,
                           n_layers=n_layers, rule=layer_rule)
    if trace_settings is None and located:
        trace_settings = getattr(_trace_of(located[0]), "settings", None)
    used = {p.layer for p in placements} | set(sweep_layers)
    if layers == "validated":  # the trial edits need the statistics of every layer they try
        used |= {l for p in placements if p.trace is not None for l in layer_rule.tries(p.trace.effects)}
    hparams = ensure_stats(model, tok, hparams, used, mom2_corpus, None if out is None else out / "stats")
    scratch = None  # EasyEdit's logs/ without an OUT: a temporary folder, removed at the end
    if edit_context is None and editor == "easyedit":
        from .easyedit import EasyEditSession

        if out is None:
            scratch = tempfile.TemporaryDirectory(prefix="rome-locate-easyedit-")
        workdir = Path(scratch.name if scratch is not None else out) / "easyedit"
        edit_context = EasyEditSession(model, tok, hparams, str(model_name or getattr(hparams, "model_name", "model")),
                                       workdir).edited
    elif edit_context is None:
        edit_context = functools.partial(edited, seed=seed)
    model_id = fingerprint(model)

    def settings() -> dict[str, Any]:
        return run_settings(model=model_name, model_fingerprint=model_id, hparams=hparams,
                            trace_settings=trace_settings, seed=seed, generation=generation, layers=layers,
                            sweep=bool(sweep_layers), sequential=sequential, editor=editor, facts=facts_path,
                            wall_time_s=time.perf_counter() - t0,
                            **({} if layer_rule is None else {"layer_rule": layer_rule}), **(extra_settings or {}))

    records: list[EvalRecord] = []
    error: str | None = None

    def finished(recs: list[EvalRecord]) -> None:
        records[:] = recs
        if out is not None:
            write_results_json(recs, out, settings(), complete=False)

    paths: dict[str, Path] = {}
    try:
        if layers == "validated":  # trial edits with the editor the edits use (the scratch folder is cleaned up)
            from .validate import validated_layers

            picks = validated_layers(model, tok, facts, hparams, [p.trace for p in placements], layer_rule,
                                     editor=editor, edit_context=edit_context, progress=progress)
            placements = place(facts, hparams, layers, located, n_layers=n_layers, picks=picks)
        if sequential:
            evaluate_sequential(model, tok, facts, hparams, placements=placements, generation=generation,
                                editor=editor, edit_context=edit_context, max_neighborhood=max_neighborhood,
                                progress=progress, on_record=finished)
        else:
            evaluate(model, tok, facts, hparams, placements=placements, sweep=sweep_layers or False,
                     generation=generation, editor=editor, edit_context=edit_context,
                     max_neighborhood=max_neighborhood, progress=progress, on_record=finished)
    except BaseException as exc:  # also Ctrl-C: the report still covers what finished
        error = str(exc) if isinstance(exc, EvaluationError) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()
        if out is not None:
            paths = write_report(records, out, settings(), traces=[p.trace for p in placements], error=error)
    return list(records), paths


def _trace_of(entry: Any) -> Any:
    return entry[0] if isinstance(entry, tuple) else None


def edit_facts(model, tok, facts: Sequence[Fact], hparams: Any, *, layers: str = "fixed",
               located: Sequence[Any] | None = None, out_dir: str | Path | None = None,
               **kwargs: Any) -> list[EvalRecord]:
    """`rome-locate edit` from Python: the pipeline with generations and the sweep off; returns the records."""
    records, _ = run_pipeline(model, tok, facts, hparams, out_dir, layers=layers, located=located,
                              generation=None, sweep=False, **kwargs)
    return records
