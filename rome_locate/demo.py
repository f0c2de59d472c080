"""The demo: locate → hyperparameters → edit → evaluate → report, on a shipped fact model and a few facts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .evaluate import EvalRecord, EvaluationError, GenerationSettings, evaluate, summarize
from .facts import Fact, load_facts
from .report import run_settings, write_report, write_results_json

DEFAULT_OUT = "rome-locate-demo"
# Trace settings of the demo: ROME's defaults (10 noise samples, 3σ noise), full tables for the heatmaps.
DEMO_TRACE = {"kind": "mlp", "samples": 10, "window": 10, "noise": "3sigma", "noise_draws": "torch", "seed": 0}


def _print(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def run_pipeline(model, tok, facts: Sequence[Fact], hparams: Any, out_dir: str | Path, *, model_name: str,
                 layers: str = "traced", sweep: bool = True, trace_settings: dict[str, Any] | None = None,
                 located: Sequence[tuple[Any, Any]] | None = None, generation: GenerationSettings = GenerationSettings(),
                 editor: str = "builtin", edit_context: Callable | None = None, facts_path: str | None = None,
                 max_neighborhood: int | None = None, progress: bool = True,
                 extra_settings: dict[str, Any] | None = None,
                 started: float | None = None) -> tuple[list[EvalRecord], dict[str, Path]]:
    """Evaluate the facts and write the report; results.json is rewritten after every fact, the report in `finally`.

    On a failure the report covers the finished facts, names the error, and the
    `EvaluationError` is raised again for the caller to report. `started` (a
    `time.perf_counter()` value) is where the reported wall time starts.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter() if started is None else started
    traces = {str(t.fact_id): t for t, _ in (located or ())}

    def settings() -> dict[str, Any]:
        return run_settings(model=model_name, hparams=hparams, trace_settings=trace_settings,
                            seed=(trace_settings or {}).get("seed"), generation=generation, layers=layers,
                            sweep=sweep, editor=editor, facts=facts_path, wall_time_s=time.perf_counter() - t0,
                            **(extra_settings or {}))

    records: list[EvalRecord] = []
    error: str | None = None

    def finished(recs: list[EvalRecord]) -> None:
        records[:] = recs
        write_results_json(recs, out_dir, settings(), complete=False)

    try:
        evaluate(model, tok, facts, hparams, layers=layers, located=located, sweep=sweep, generation=generation,
                 editor=editor, edit_context=edit_context, max_neighborhood=max_neighborhood, progress=progress,
                 on_record=finished)
    except BaseException as exc:  # also Ctrl-C: the report still covers what finished
        error = str(exc) if isinstance(exc, EvaluationError) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        paths = write_report(records, out_dir, settings(), traces=traces, error=error)
    return list(records), paths


def _fixed_hparams(model, family: str, layer: int):
    """ROME hyperparameters for the shipped model at `layer`, with the settings that edit it and its stats."""
    from .fact_model import ROME_OVERRIDES, fact_model_dir
    from .hparams import generate_hparams

    model_dir = fact_model_dir(family)
    return generate_hparams(model, None, layer, model_name=str(model_dir), stats_dir=str(model_dir / "stats"),
                            **ROME_OVERRIDES)


def print_summary(records: Sequence[EvalRecord], quiet: bool = False) -> None:
    """A few lines per fact and the dataset summary, for the terminal."""
    def f(v):
        return "–" if v is None else f"{v:.2f}"

    for r in records:
        m = r.metrics
        gen = next((g for g in r.generations if g.group == "edit"), None)
        _print(f"fact {r.fact_id}: {r.prompt!r} {r.target_true!r} -> {r.target_new!r}: layer {r.layer} ({r.layer_source})"
               + (f", sweep best {r.best_layer}" if r.best_layer is not None else ""), quiet)
        _print(f"  efficacy {f(m.get('efficacy_score_pre'))} -> {f(m.get('efficacy_score'))}, "
               f"paraphrase {f(m.get('paraphrase_score_pre'))} -> {f(m.get('paraphrase_score'))}, "
               f"neighbourhood {f(m.get('neighborhood_score_pre'))} -> {f(m.get('neighborhood_score'))}, "
               f"locality {f(m.get('locality'))}", quiet)
        if gen is not None:
            _print(f"  before: {gen.prompt}{gen.before!r}\n  after:  {gen.prompt}{gen.after!r}", quiet)
    s = summarize(records)
    for name, row in s["strategies"].items():
        _print(f"{name:>10}: efficacy {f(row['efficacy_score'])} paraphrase {f(row['paraphrase_score'])} "
               f"neighbourhood {f(row['neighborhood_score'])} rewrite score {f(row['rewrite_score'])} (n={row['n']})",
               quiet)
    if s["spearman_pooled"] is not None:
        _print(f"Spearman(traced effect, edit success) pooled {f(s['spearman_pooled'])}, "
               f"mean per fact {f(s['spearman_per_fact_mean'])}", quiet)


def run_demo(out_dir: str | Path = DEFAULT_OUT, family: str = "gpt2", n_facts: int = 4, *, sweep: bool = True,
             progress: bool = True, quiet: bool = False, generation: GenerationSettings = GenerationSettings(),
             edit_context: Callable | None = None, model_and_tok: tuple[Any, Any] | None = None) -> dict[str, Path]:
    """Run the whole pipeline on the shipped fact model of `family` with its first `n_facts` CounterFact facts.

    `model_and_tok` passes the already loaded fact model (tests check its weights afterwards).
    """
    from .choose import choose_dataset_layer
    from .fact_model import counterfact_path, fact_model_dir, load_fact_model
    from .locate import locate

    if n_facts < 1:
        raise ValueError(f"n_facts must be >= 1, got {n_facts}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _print(f"[1/5] loading the shipped {family} fact model from {fact_model_dir(family)}", quiet)
    model, tok = model_and_tok if model_and_tok is not None else load_fact_model(family)
    facts_file = counterfact_path(family)
    every = load_facts(facts_file)
    # Spread over the file, which is grouped by relation, so the demo shows every relation.
    facts = every[:: max(1, len(every) // n_facts)][:n_facts]
    _print(f"[2/5] locating {len(facts)} fact(s) from {facts_file.name} (causal tracing, {DEMO_TRACE['samples']} "
           f"noise samples)", quiet)
    trace = {k: v for k, v in DEMO_TRACE.items() if k != "noise"}
    # A fresh trace every run: a locate.jsonl left by an earlier run may come from another model.
    (out_dir / "locate.jsonl").unlink(missing_ok=True)
    # Full tables for the report's heatmaps (the report draws them; locate need not).
    located = locate(model, tok, facts, out=out_dir / "locate.jsonl", progress=progress,
                     noise=DEMO_TRACE["noise"], full=True, **trace)
    for result, choice in located:
        _print(f"  fact {choice.fact_id}: {result.prompt!r} -> top-1 {result.top1!r} "
               f"({'known' if result.known else 'not known'}), traced layer {choice.layer} "
               f"(margin {choice.margin:.3f})", quiet)
    dataset = choose_dataset_layer([r for r, _ in located])
    hparams = _fixed_hparams(model, family, dataset.layer)
    _print(f"[3/5] hyperparameters: fixed layer {dataset.layer} (largest mean effect over the facts); "
           f"each fact is edited at its own traced layer", quiet)
    _print("[4/5] editing and evaluating" + (" with a sweep over every layer" if sweep else ""), quiet)
    try:
        records, paths = run_pipeline(
            model, tok, facts, hparams, out_dir, model_name=str(fact_model_dir(family)), layers="traced",
            sweep=sweep, trace_settings=DEMO_TRACE, located=located, generation=generation, editor="builtin",
            edit_context=edit_context, facts_path=str(facts_file), progress=progress,
            extra_settings={"demo": {"family": family, "n_facts": n_facts, "dataset_layer": dataset.layer}},
            started=t0)
    finally:
        _print(f"      ({time.perf_counter() - t0:.1f} s so far)", quiet)
    print_summary(records, quiet)
    _print(f"[5/5] wrote {paths['html']}, {paths['md']} and {paths['json']} in {time.perf_counter() - t0:.1f} s", quiet)
    return paths
