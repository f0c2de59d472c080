"""The general pipeline: the layer rule → locate if needed → hyperparameters' statistics → edit → evaluate → report.

`rome-locate edit`, `rome-locate eval`, the demo and the Python API all run `run_pipeline`, and every one of
them gets its layers from one `choose.LayerRule`; `edit` is the pipeline with generations and the layer sweep
switched off.
results.json is rewritten after every fact, so a later failure loses nothing
finished, and the report is written in `finally`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .arch import Arch, arch_for, check_layer
from .algorithms import is_window
from .batches import check_batch_size, evaluate_batches
from .choose import LayerRule, Placement, layer_rule, place, window_rule
from .edit import ensure_stats
from .editors import Editor, check_editor, make_editor
from .evaluate import already_predicted, check_editable, evaluate, evaluate_sequential
from .facts import Fact
from .hparams import fixed_layer
from .locate import locate
from .models import fingerprint
from .outcome import EvalRecord, EvaluationError, GenerationSettings
from .outdir import check_report_files
from .report import run_settings, write_report, write_results_json
from .trace import TraceSettings


def editable(facts: Sequence[Fact], located: Sequence[Any] | None = None, *, skip_errors: bool = False,
             model: Any = None, tok: Any = None) -> tuple[list[Fact], list[Any] | None]:
    """The facts that can be edited (and their layer choices, kept aligned); the others are an error, or skipped
    with a warning under `skip_errors` (no target_new; target_new equal to the true answer; with `model`, no
    target and target_new already the model's prediction)."""
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to edit")
    if located is not None:
        located = list(located)
        if len(located) != len(facts):
            raise ValueError(f"{len(located)} layer choices for {len(facts)} facts (they are matched by position)")
    predicted = already_predicted(model, tok, facts) if model is not None else [None] * len(facts)
    keep = []
    for i, fact in enumerate(facts):
        try:
            check_editable(fact)
            if predicted[i] is not None:
                raise predicted[i]
        except ValueError as exc:
            if not skip_errors:
                raise
            warnings.warn(f"skipped: {exc}", stacklevel=3)
            continue
        keep.append(i)
    if not keep:
        raise ValueError("no fact can be edited (every one was skipped)")
    return [facts[i] for i in keep], None if located is None else [located[i] for i in keep]


def resolve_rule(hparams: Any, n_layers: int, layers: str = "fixed", rule: LayerRule | None = None,
                 hparams_path: str | Path | None = None) -> LayerRule:
    """The run's layer rule: `rule` in the mode `layers`, else the one `choose.layer_rule` builds from the
    hyperparameters' layer and the validation record beside `hparams_path`. Every layer is checked against the
    model here, before any work."""
    if is_window(hparams):
        return window_rule(hparams.layers, n_layers, layers if rule is None else rule.mode)
    if rule is None:
        return layer_rule(layers, fixed_layer(hparams), n_layers, hparams_path)
    for layer in (rule.fallback, *rule.candidates):
        check_layer(layer, n_layers, f"layer of the layer rule ({rule.source})")
    return rule if rule.mode == layers else replace(rule, mode=layers)


def _needs_trace(rule: LayerRule, sweep_layers: Sequence[int], located: Sequence[Any] | None) -> bool:
    # The sweep compares edit success with the traced effect, so it traces too; given ints need no trace.
    if located is not None:
        return False
    return rule.mode != "fixed" or bool(sweep_layers)


def _check_prompts(chat_template: bool, trace_settings: TraceSettings | None, located: Sequence[Any] | None) -> None:
    """A ValueError when the given trace settings or traces read the prompts otherwise than the run does."""
    given = [("trace_settings", trace_settings)] + [
        (f"the trace of fact {entry[0].fact_id!r}", entry[0].settings) for entry in located or ()
        if isinstance(entry, tuple) and isinstance(getattr(entry[0], "settings", None), TraceSettings)]
    for what, settings in given:
        if settings is not None and settings.chat_template != chat_template:
            raise ValueError(f"{what} has chat_template={settings.chat_template}, the run chat_template="
                             f"{chat_template}: traces and edits must read the prompts alike")


def _trace(model, tok, facts: list[Fact], settings: TraceSettings | None, arch: Arch, out: Path | None,
           dataset: Sequence[Fact] | None, progress: bool, chat_template: bool) -> list[Any]:
    """locate() of the facts, resumable in OUT/locate.jsonl; the noise level from `dataset` (a torchrun rank's
    whole facts) when given."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if dataset is not None:  # the noise level one process gets: over every editable fact
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = editable(dataset, skip_errors=True)[0]
    return locate(model, tok, facts, settings or TraceSettings(chat_template=chat_template), arch=arch,
                  progress=progress, out=None if out is None else out / "locate.jsonl", dataset=dataset)


def _provisional(rule: LayerRule) -> LayerRule:
    # `validated` is decided by trial edits; until then each fact stands where the traced rule puts it.
    return replace(rule, mode="traced") if rule.mode == "validated" else rule


def _stats_layers(rule: LayerRule, placements: Sequence[Placement], sweep_layers: Sequence[int]) -> set[int]:
    """Every layer an edit of this run may touch: what the rule can decide, the validated trials, the sweep."""
    used = {p.layer for p in placements} | set(sweep_layers)
    if rule.mode == "validated":
        used |= {l for p in placements if p.trace is not None for l in rule.tries(p.trace.effects)}
    return used


def _check_run(editor: Any, chat_template: bool, trace_settings: TraceSettings | None, located: Any,
               out_dir: Any, sequential: bool, sweep: Any, batch_size: int | None, hparams: Any) -> None:
    """The run's inputs that contradict each other or the output folder: a ValueError before any work."""
    check_editor(editor, chat_template)
    _check_prompts(chat_template, trace_settings, located)
    if out_dir is not None:
        check_report_files(out_dir)  # before any work: a report file someone else wrote is never written over
    if sequential and sweep:
        raise ValueError("the layer sweep edits one fact at a time: it cannot run with sequential editing")
    if batch_size is not None:
        check_batch_size(batch_size)
    if (batch_size is not None or is_window(hparams)) and sweep:
        raise ValueError("the layer sweep edits one fact at one layer: it cannot run with --batch-size or a "
                         "MEMIT/AlphaEdit window")


def run_pipeline(model, tok, facts: Sequence[Fact], hparams: Any, out_dir: str | Path | None = None, *,
                 layers: str = "fixed", layer_rule: LayerRule | None = None, hparams_path: str | Path | None = None,
                 located: Sequence[Any] | None = None, sweep: bool | Sequence[int] = False,
                 trace_settings: TraceSettings | None = None,
                 generation: GenerationSettings | None = GenerationSettings(), editor: str | Editor = "builtin",
                 seed: int = 0, mom2_corpus: str | Path | None = None, arch: Arch | str | Path | dict | None = None,
                 model_name: str | None = None, facts_path: str | None = None, max_neighborhood: int | None = None,
                 skip_errors: bool = False, sequential: bool = False, progress: bool = True,
                 extra_settings: dict[str, Any] | None = None, started: float | None = None,
                 dataset: Sequence[Fact] | None = None, chat_template: bool = False,
                 batch_size: int | None = None) -> tuple[list[EvalRecord], dict[str, Path]]:
    """Edit and evaluate every fact; with `out_dir`, results.json after every fact and the report at the end.

    Layers: the run's `choose.LayerRule` (`resolve_rule`: `layer_rule`, or the
    one built from the hyperparameters' layer and the validation record beside
    `hparams_path`) in the mode `layers` decides every fact (`choose.place`).
    `located` (locate()'s pairs, or ints for layers given by hand) is aligned
    with `facts` by position; without it the facts are traced when the mode or
    the sweep needs it (OUT/locate.jsonl, resumable). `editor` is a name of the
    registry (`editors.EDITORS`) or an editor object. With `sequential`, edits
    accumulate and the summary reports retention. With mom2_adjustment on,
    statistics missing for a layer are computed from `mom2_corpus` into
    OUT/stats. On a failure the report covers the finished facts, names the
    error, and the `EvaluationError` is raised again. A results.json or report in
    `out_dir` that rome-locate did not write is an error before any work (the
    caller holds the folder's lock, `outdir.out_lock`). `dataset`, when `facts`
    is a torchrun rank's block, is what the noise level of the traces comes from.
    `chat_template` reads every prompt (traced, edited, scored, generated from) as a user turn of the
    tokenizer's chat template; `trace_settings`, `located` traces and an editor object must agree with it.
    `batch_size` edits that many facts at once (`batches.evaluate_batches`; with `sequential`, the batches
    accumulate); MEMIT and AlphaEdit hyperparameters always edit in batches (default 1), in their window.
    """
    _check_run(editor, chat_template, trace_settings, located, out_dir, sequential, sweep, batch_size, hparams)
    t0 = time.perf_counter() if started is None else started
    facts, located = editable(facts, located, skip_errors=skip_errors, model=model, tok=tok)
    arch = arch_for(model, arch)
    rule = resolve_rule(hparams, arch.n_layers, layers, layer_rule, hparams_path)
    sweep_layers = list(range(arch.n_layers)) if sweep is True else [int(x) for x in (sweep or ())]
    for layer in sweep_layers:
        check_layer(layer, arch.n_layers, "sweep layer")
    out = Path(out_dir) if out_dir is not None else None
    if _needs_trace(rule, sweep_layers, located):
        located = _trace(model, tok, facts, trace_settings, arch, out, dataset, progress, chat_template)
    # Before any edit (and, for choices the caller gave, before any tracing, since none was needed).
    placements = place(facts, _provisional(rule), located)
    for fact, entry in zip(facts, located or ()):
        if isinstance(entry, int):
            check_layer(entry, arch.n_layers, f"the layer given for fact {fact.id!r}:")
    if trace_settings is None and located and isinstance(located[0], tuple):
        trace_settings = getattr(located[0][0], "settings", None)
    stats_layers = _stats_layers(rule, placements, sweep_layers) | (set(hparams.layers) if is_window(hparams) else set())
    hparams = ensure_stats(model, tok, hparams, stats_layers, mom2_corpus,
                           None if out is None else out / "stats", arch=arch)
    run = _Run(model, tok, facts, hparams, rule, located, placements, out, sweep_layers, generation,
               max_neighborhood, sequential, progress, arch.n_layers, chat_template,
               batch_size if batch_size is not None or not is_window(hparams) else 1)
    editor_obj = make_editor(editor, model, tok, hparams, model_name=str(model_name or getattr(hparams, "model_name",
                             "model")), workdir=None if out is None else out / "easyedit", seed=seed,
                             chat_template=chat_template)
    model_id = fingerprint(model)

    def settings() -> dict[str, Any]:
        return run_settings(model=model_name, model_fingerprint=model_id, hparams=hparams,
                            trace_settings=trace_settings, seed=seed, generation=generation, layers=rule.mode,
                            sweep=bool(sweep_layers), sequential=sequential, editor=editor_obj.name,
                            facts=facts_path, wall_time_s=time.perf_counter() - t0, layer_rule=rule,
                            chat_template=chat_template, trust_remote_code=model_id.remote_code, batch_size=run.batch_size,
                            **(extra_settings or {}))

    try:
        return run.execute(editor_obj, settings)
    finally:
        close = getattr(editor_obj, "close", None)
        if close is not None and editor_obj is not editor:  # an editor object the caller passed is the caller's
            close()


@dataclass
class _Run:
    """One pipeline run once its rule, traces and statistics are settled: place, edit, measure, write."""

    model: Any
    tok: Any
    facts: list[Fact]
    hparams: Any
    rule: LayerRule
    located: Sequence[Any] | None
    provisional: list[Placement]  # `place` under the rule (traced for `validated`, before its trial edits)
    out: Path | None
    sweep_layers: list[int]
    generation: GenerationSettings | None
    max_neighborhood: int | None
    sequential: bool
    progress: bool
    n_layers: int
    chat_template: bool = False
    batch_size: int | None = None  # facts per update (`batches`); None: one at a time (`evaluate`)
    records: list[EvalRecord] = field(default_factory=list)

    def placements(self, editor: Editor) -> list[Placement]:
        """Every fact's placement; `validated` first trial-edits its tries with the run's editor."""
        if self.rule.mode != "validated":
            return self.provisional
        from .validate import validated_layers

        traces = [p.trace for p in self.provisional]
        picks = validated_layers(self.model, self.tok, self.facts, self.hparams, traces, self.rule,
                                 editor=editor, progress=self.progress, chat_template=self.chat_template)
        return place(self.facts, self.rule, self.located, picks=picks)

    def execute(self, editor: Editor, settings: Callable[[], dict[str, Any]]) -> tuple[list[EvalRecord],
                                                                                         dict[str, Path]]:
        """Edit and measure every fact; results.json after each, the report at the end (also on a failure)."""
        def finished(recs: list[EvalRecord]) -> None:
            self.records[:] = recs
            if self.out is not None:
                write_results_json(recs, self.out, settings(), complete=False)

        error: str | None = None
        placements: list[Placement] = []
        paths: dict[str, Path] = {}
        try:
            placements = self.placements(editor)
            common = dict(generation=self.generation, editor=editor, max_neighborhood=self.max_neighborhood,
                          progress=self.progress, on_record=finished, chat_template=self.chat_template)
            if self.batch_size is not None:
                evaluate_batches(self.model, self.tok, self.facts, self.hparams, placements,
                                 batch_size=self.batch_size, keep_edits=self.sequential, **common)
            elif self.sequential:
                evaluate_sequential(self.model, self.tok, self.facts, self.hparams, placements, **common)
            else:
                evaluate(self.model, self.tok, self.facts, self.hparams, placements, n_layers=self.n_layers,
                         sweep=self.sweep_layers or False, **common)
        except BaseException as exc:  # also Ctrl-C: the report still covers what finished
            error = str(exc) if isinstance(exc, EvaluationError) else f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if self.out is not None:
                paths = write_report(self.records, self.out, settings(), traces=[p.trace for p in placements],
                                     error=error)
        return list(self.records), paths


def edit_facts(model, tok, facts: Sequence[Fact], hparams: Any, *, layers: str = "fixed",
               located: Sequence[Any] | None = None, out_dir: str | Path | None = None,
               **kwargs: Any) -> list[EvalRecord]:
    """`rome-locate edit` from Python: the pipeline with generations and the sweep off; returns the records."""
    records, _ = run_pipeline(model, tok, facts, hparams, out_dir, layers=layers, located=located,
                              generation=None, sweep=False, **kwargs)
    return records
