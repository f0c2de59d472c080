"""The demo: the pipeline (locate → hyperparameters → edit → evaluate → report) on a shipped fact model and a few facts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .evaluate import GenerationSettings
from .facts import load_facts
from .pipeline import run_pipeline
from .report import print_summary
from .trace import TraceSettings

DEFAULT_OUT = "rome-locate-demo"
# Trace settings of the demo: ROME's defaults (10 noise samples, 3σ noise), full tables for the heatmaps.
DEMO_TRACE = TraceSettings(kind="mlp", samples=10, window=10, noise="3sigma", noise_draws="torch", seed=0, full=True)


def _print(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _fixed_hparams(model, family: str, layer: int):
    """ROME hyperparameters for the shipped model at `layer`, with the settings that edit it and its stats."""
    from .fact_models import ROME_OVERRIDES, fact_model_dir
    from .hparams import generate_hparams

    model_dir = fact_model_dir(family)
    return generate_hparams(model, None, layer, model_name=str(model_dir), stats_dir=str(model_dir / "stats"),
                            **ROME_OVERRIDES)


def run_demo(out_dir: str | Path = DEFAULT_OUT, family: str = "gpt2", n_facts: int = 4, *, sweep: bool = True,
             progress: bool = True, quiet: bool = False, generation: GenerationSettings = GenerationSettings(),
             edit_context: Callable | None = None, model_and_tok: tuple[Any, Any] | None = None) -> dict[str, Path]:
    """Run the whole pipeline on the shipped fact model of `family` with its first `n_facts` CounterFact facts.

    `model_and_tok` passes the already loaded fact model (tests check its weights afterwards).
    """
    from .choose import choose_dataset_layer
    from .fact_models import counterfact_path, fact_model_dir, load_fact_model
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
    _print(f"[2/5] locating {len(facts)} fact(s) from {facts_file.name} (causal tracing, {DEMO_TRACE.samples} "
           f"noise samples)", quiet)
    # A fresh trace every run: a locate.jsonl left by an earlier run may come from another model.
    (out_dir / "locate.jsonl").unlink(missing_ok=True)
    # Full tables for the report's heatmaps (the report draws them; locate need not).
    located = locate(model, tok, facts, DEMO_TRACE, out=out_dir / "locate.jsonl", progress=progress)
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
