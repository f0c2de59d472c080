"""The demo: the pipeline (locate → hyperparameters → edit → evaluate → report) on a shipped fact model and a few facts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .outcome import GenerationSettings
from .facts import load_facts
from .outdir import check_out_dir, out_lock, remove_own_trace
from .pipeline import run_pipeline
from .report import print_summary, written_summary
from .trace import TraceSettings

DEFAULT_OUT = "rome-locate-demo"
# Trace settings of the demo: ROME's defaults (10 noise samples, 3σ noise), full tables for the heatmaps.
DEMO_TRACE = TraceSettings(kind="mlp", samples=10, window=10, noise="3sigma", noise_draws="torch", seed=0, full=True)


def _print(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def shipped_hparams_path(family: str) -> Path:
    """The validated YAML shipped for a fact model, `hparams/ROME/fact-{family}.yaml` beside the package."""
    import rome_locate

    return Path(rome_locate.__file__).resolve().parents[1] / "hparams" / "ROME" / f"fact-{family}.yaml"


def _validated_hparams(family: str):
    """The shipped validated hyperparameters of `family`, bound to the shipped model and its statistics.

    They live in the repository's hparams/ folder, outside the package: a
    non-editable install has no copy, and the demo stops with a clear message
    rather than run a 15-minute validation or edit with settings nobody tested.
    """
    from .fact_models import fact_model_dir
    from .hparams import bind_model, load_hparams

    path = shipped_hparams_path(family)
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo edits with the validated {path.name}, which is not at {path} (a non-editable install ships "
            f"no hparams/ folder): run it from a source checkout (pip install -e .), or write the file with "
            f"`rome-locate hparams --model {fact_model_dir(family)} --facts "
            f"{fact_model_dir(family) / 'counterfact.json'} -o {path.name}`")
    # Ours, not EasyEdit's class: the demo edits with the built-in editor.
    return bind_model(load_hparams(path, easyedit=False), fact_model_dir(family)), path


def _source_text(path: Path) -> str:
    """Where the demo's settings come from, relative to the repository when they are inside it."""
    root = path.parents[2]
    return (f"{path.relative_to(root).as_posix()} (validated by rome-locate hparams; test figures in its "
            f"{path.stem}.validation.md)")


def run_demo(out_dir: str | Path = DEFAULT_OUT, family: str = "gpt2", n_facts: int = 4, *, sweep: bool = True,
             progress: bool = True, quiet: bool = False, generation: GenerationSettings = GenerationSettings(),
             editor: Any = "builtin", model_and_tok: tuple[Any, Any] | None = None) -> dict[str, Path]:
    """Run the whole pipeline on the shipped fact model of `family` with `n_facts` of its CounterFact cases, read
    from their EasyEdit-shaped export (the same prompts, plus portability probes).

    `model_and_tok` passes the already loaded fact model (tests check its weights afterwards); `editor` is a
    name of the editor registry or an editor object.
    """
    from .choose import choose_dataset_layer
    from .fact_models import easyedit_path, fact_model_dir, load_fact_model
    from .locate import locate

    if n_facts < 1:
        raise ValueError(f"n_facts must be >= 1, got {n_facts}")
    t0 = time.perf_counter()
    hparams, hp_path = _validated_hparams(family)  # before any work: a missing file stops the demo at once
    # Before any work too: the folder is writable, no other run is in it, and it holds nothing foreign.
    out_dir = check_out_dir(out_dir, "--out")
    with out_lock(out_dir, "--out"):
        _print(f"[1/5] loading the shipped {family} fact model from {fact_model_dir(family)}", quiet)
        model, tok = model_and_tok if model_and_tok is not None else load_fact_model(family)
        facts_file = easyedit_path(family)
        every = load_facts(facts_file)
        # Spread over the file, which is grouped by relation, so the demo shows every relation.
        facts = every[:: max(1, len(every) // n_facts)][:n_facts]
        _print(f"[2/5] locating {len(facts)} fact(s) from {facts_file.name} (causal tracing, {DEMO_TRACE.samples} "
               f"noise samples)", quiet)
        # A fresh trace every run (a locate.jsonl left by an earlier run may come from another model), but only
        # of a locate.jsonl rome-locate wrote and no `locate` run is writing.
        remove_own_trace(out_dir, "--out")
        # Full tables for the report's heatmaps (the report draws them; locate need not).
        located = locate(model, tok, facts, DEMO_TRACE, out=out_dir / "locate.jsonl", progress=progress)
        for result, choice in located:
            _print(f"  fact {choice.fact_id}: {result.prompt!r} -> top-1 {result.top1!r} "
                   f"({'known' if result.known else 'not known'}), traced layer {choice.layer} "
                   f"(margin {choice.margin:.3f})", quiet)
        dataset = choose_dataset_layer([r for r, _ in located])
        source = _source_text(hp_path)
        _print(f"[3/5] hyperparameters: {source}; every fact is edited at its layer {hparams.layers[0]} (lr "
               f"{hparams.v_lr:g}, {hparams.v_num_grad_steps} steps, clamp {hparams.clamp_norm_factor:g}, weight "
               f"decay {hparams.v_weight_decay:g}, mom2 {hparams.mom2_dataset}), chosen by trial edits and measured "
               f"on held-out facts; these {len(facts)} fact(s) trace to dataset layer {dataset.layer} (shown, not "
               "used" + ("; the sweep compares both)" if sweep else ")"), quiet)
        _print("[4/5] editing and evaluating" + (" with a sweep over every layer" if sweep else ""), quiet)
        try:
            records, paths = run_pipeline(
                model, tok, facts, hparams, out_dir, model_name=str(fact_model_dir(family)), layers="fixed",
                sweep=sweep, trace_settings=DEMO_TRACE, located=located, generation=generation, editor=editor,
                hparams_path=hp_path, facts_path=str(facts_file), progress=progress,
                extra_settings={"demo": {"family": family, "n_facts": n_facts, "dataset_layer": dataset.layer,
                                         "hparams_source": source}},
                started=t0)
        finally:
            _print(f"      ({time.perf_counter() - t0:.1f} s so far)", quiet)
    print_summary(records, quiet, summary=written_summary(paths["json"]))  # the report's, not a second bootstrap
    _print(f"[5/5] wrote {paths['html']}, {paths['md']} and {paths['json']} in {time.perf_counter() - t0:.1f} s",
           quiet)
    return paths
