"""The argument parsers of every `rome-locate` subcommand; `rome_locate.cli` runs what they parse."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

Command = Callable[[argparse.Namespace], int]
DESCRIPTION = "`rome-locate`: one subcommand per stage (fact-model, trace, locate, hparams, stats, edit, eval, demo)."


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local directory or hub name (loaded with from_pretrained)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--arch", default=None, help="JSON file of module names, for a family the map does not know")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the Python code the model directory's config names (auto_map); never "
                        "on by default: give it only for a model whose code you trust")
    p.add_argument("--chat-template", action="store_true",
                   help="read every prompt as a user turn of the tokenizer's chat template, answers after its "
                        "generation prompt (chat models): tracing, edits, scores, generations, self-sampled mom2 texts")
    g = p.add_argument_group("models larger than one device (accelerate)")
    g.add_argument("--device-map", default=None,
                   help="auto|balanced|sequential, or a JSON file {module name: GPU index|cpu|disk} (instead of --device)")
    g.add_argument("--max-memory", default=None, help="per-device limits for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    g.add_argument("--offload-folder", default=None, help="directory for the weights a --device-map puts on disk")


def _add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="mlp", choices=["hidden", "mlp", "attn"], help="what is restored")
    p.add_argument("--samples", type=int, default=10, help="noise samples S")
    p.add_argument("--window", type=int, default=10, help="restoration window w (clipped for shallow models)")
    p.add_argument("--noise", default="3sigma", help="noise level: '3sigma' (or 'Ksigma') or a number")
    p.add_argument("--noise-draws", default="torch", choices=["torch", "rome", "replace"],
                   help="seeded torch noise, ROME's numpy draws, or subject token replacement")
    p.add_argument("--answer", default="top1", choices=["top1", "target"],
                   help="measure p(model's clean top-1) as ROME does, or p(first token of the target)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise generator")
    p.add_argument("--method", default="exact", choices=["exact", "atp"],
                   help="exact restored runs, or attribution patching: one forward and backward estimate the table")
    p.add_argument("--verify-top", type=int, default=0, metavar="K",
                   help="with --method atp: re-check with exact runs the K largest estimated effects at the "
                        "last subject token (the row the layer choice reads)")


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The argument parser of every subcommand; `commands` maps each subcommand to the function that runs it."""
    parser = argparse.ArgumentParser(prog="rome-locate", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fact-model", help="paths of the shipped fact models, their facts and corpus")
    p.add_argument("family", choices=["gpt2", "llama"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--path", action="store_true", help="print the model directory (default)")
    g.add_argument("--facts", action="store_true", help="print the known_1000-format facts file")
    g.add_argument("--counterfact", action="store_true", help="print the CounterFact-format facts file")
    g.add_argument("--easyedit", action="store_true",
                   help="print the CounterFact cases in EasyEdit's KnowEdit shape, with portability probes")
    g.add_argument("--corpus", action="store_true", help="print the training corpus file")
    g.add_argument("--accuracy", action="store_true", help="measure top-1 accuracy on its facts")
    p.add_argument("--train", action="store_true", help="retrain the model from its seed (slow)")
    p.set_defaults(func=commands["fact_model"])

    _add_locate_parsers(sub, commands)
    _add_edit_parsers(sub, commands)
    _add_eval_parsers(sub, commands)
    return parser


def _add_locate_parsers(sub, commands: Mapping[str, Command]) -> None:
    """Register `trace` and `locate`."""
    p = sub.add_parser("trace", help="full tokens × layers causal traces of one prompt, with heatmaps")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt, ending where the answer starts (no trailing space)")
    p.add_argument("--subject", required=True, help="the subject, as it appears in the prompt")
    p.add_argument("--target", default=None, help="the true answer (to check the model knows it; --answer target)")
    p.add_argument("--occurrence", type=int, default=0,
                   help="which occurrence of a repeated subject (0 = first, as ROME; -1 = last)")
    p.add_argument("--kinds", default="hidden,mlp,attn", help="comma-separated kinds to trace")
    p.add_argument("--plots", default=None, help="directory for the heatmaps (PNG and PDF)")
    _add_trace_args(p)
    p.set_defaults(func=commands["trace"])

    p = sub.add_parser("locate", help="trace every fact of a dataset and choose its ROME edit layer")
    _add_model_args(p)
    p.add_argument("--facts", required=True, help="facts file: known_1000, CounterFact or EasyEdit JSON/JSONL")
    p.add_argument("--limit", type=int, default=None, help="only the first N facts")
    p.add_argument("--out", default=None,
                   help="JSON Lines output, one line per fact, flushed as it finishes; a rerun resumes "
                        "(default: print the lines on stdout)")
    p.add_argument("--plots", default=None,
                   help="directory for a heatmap per fact and the average-effect plot; traces every token "
                        "(about T times slower than the default last-subject-token row)")
    p.add_argument("--skip-errors", action="store_true", help="warn and go on when a fact cannot be traced")
    p.add_argument("--batch-facts", type=int, default=None, metavar="N",
                   help="facts of one prompt length traced together, N at most (default: as many as fill a "
                        "forward; 1 traces each fact alone)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_trace_args(p)
    p.set_defaults(func=commands["locate"])


def _add_edit_parsers(sub, commands: Mapping[str, Command]) -> None:
    """Register `hparams`, `stats` and `edit`."""
    p = sub.add_parser("hparams", help="choose the ROME layer by causal tracing and write EasyEdit ROME hyperparameters")
    _add_model_args(p)
    p.add_argument("--facts", required=True, help="facts file: known_1000, CounterFact or EasyEdit JSON/JSONL")
    p.add_argument("--limit", type=int, default=None, help="only the first N facts")
    p.add_argument("-o", "--output", required=True, help="YAML to write, e.g. hparams/ROME/NAME.yaml")
    p.add_argument("--layer", type=int, default=None, help="skip tracing and write this layer")
    p.add_argument("--model-name", default=None, help="model_name field (default: --model)")
    p.add_argument("--hparams-device", default=None,
                   help="device field: 'cpu' or a CUDA index as EasyEdit expects (default: from --device)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override other fields, YAML values (e.g. v_lr=0.1 mom2_adjustment=true)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    v = p.add_argument_group("validation (default: choose layer and v* settings by trial edits on held-out facts)")
    v.add_argument("--no-validate", action="store_true",
                   help="trace only: write the dataset layer with ROME's default settings (no trial edits)")
    v.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of the subjects kept for the test facts (default 0.5)")
    v.add_argument("--alg", default="ROME", choices=["ROME", "MEMIT", "AlphaEdit"],
                   help="ROME (one layer, the default), or MEMIT / AlphaEdit: a window of layers and MEMIT's "
                        "settings chosen by trial edits of batches, written as EasyEdit's MEMIT/AlphaEdit YAML")
    v.add_argument("--budget", type=int, default=None,
                   help="most trial edits of the search (default 300; MEMIT/AlphaEdit: facts edited, 3000)")
    v.add_argument("--trial-batch", type=int, default=10,
                   help="MEMIT/AlphaEdit: calibration facts written at once in the search's rounds (default 10)")
    v.add_argument("--max-window", type=int, default=5,
                   help="MEMIT/AlphaEdit: the largest window tried, in layers (default 5, MEMIT's published size)")
    v.add_argument("--max-batch", type=int, default=100,
                   help="MEMIT/AlphaEdit: facts written at once in the finals and the test (default 100)")
    v.add_argument("--objective", default="counterfact", choices=["counterfact", "generation"],
                   help="what the search optimises: CounterFact's score (teacher-forced efficacy, paraphrase and "
                        "neighbourhood success, the default) or the generation score (greedy continuations that "
                        "start with target_new in place of efficacy and paraphrase); the report shows both")
    v.add_argument("--grid", default="default", choices=["default", "paper"],
                   help="v* settings searched: 8 around ROME's paper settings, or the paper's alone")
    v.add_argument("--calibration-facts", type=int, default=None,
                   help="most calibration facts (default 40; MEMIT/AlphaEdit 100)")
    v.add_argument("--test-facts", type=int, default=None, help="most test facts (default 40; MEMIT/AlphaEdit 100)")
    v.add_argument("--stats-dir", default="./data/stats", help="stats_dir field: where mom2 statistics are read "
                   "and, when missing, written (default ./data/stats, EasyEdit's)")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--corpus", default=None, help="text file for the mom2 statistics (mom2_dataset corpus); "
                     "without it, texts sampled from the model are used")
    src.add_argument("--self-sample", type=int, default=3000, metavar="N",
                     help="texts sampled from the model for the mom2 statistics when no corpus (default 3000)")
    _add_trace_args(p)
    p.set_defaults(func=commands["hparams"])

    p = sub.add_parser("stats", help="offline mom2 statistics of the rewrite modules, in EasyEdit's cache format")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", default=None, help="text file, one text a line")
    src.add_argument("--self-sample", type=int, default=None, metavar="N",
                     help="no corpus: sample N texts from the model itself (seeded, 24 new tokens each, plain "
                          "sampling; settings in a JSON beside each npz; mom2_dataset self_sample)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to compute (default: all)")
    p.add_argument("--stats-dir", required=True, help="EasyEdit's stats_dir")
    p.add_argument("--mom2-dataset", default="wikipedia", help="mom2_dataset field the file is named after")
    p.add_argument("--n-samples", type=int, default=100000,
                   help="lines used and mom2_n_samples the file is named after (EasyEdit's default 100000)")
    p.add_argument("--mom2-dtype", default="float32", choices=["float16", "float32", "float64"],
                   help="mom2_dtype the file is stored in and named after (--dtype is the model's dtype; "
                        "keep float32 for EasyEdit on CPU, where it cannot invert float16)")
    p.add_argument("--model-name", default=None,
                   help="folder name under stats-dir (default: last component of --model, as EasyEdit does)")
    p.set_defaults(func=commands["stats"])

    p = sub.add_parser("edit", help="edit every fact with ROME (one at a time, weights restored) and measure; "
                                    "the eval pipeline without generations and sweep")
    _add_pipeline_args(p)
    p.add_argument("--corpus", default=None,
                   help="text file to compute mom2 statistics missing for a traced layer (into OUT/stats)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=commands["pipeline"])


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The arguments `edit` and `eval` share: they run the same pipeline."""
    _add_model_args(p)
    p.add_argument("--facts", required=True, help="facts with target_new: CounterFact, EasyEdit or rome-locate JSON/JSONL")
    p.add_argument("--hparams", required=True, help="ROME hyperparameters YAML (EasyEdit format)")
    p.add_argument("--editor", default="builtin", choices=["builtin", "easyedit"],
                   help="the built-in ROME or EasyEdit's (needs EASYEDIT_PATH or easyeditor importable)")
    p.add_argument("--layers", default="fixed", choices=["fixed", "traced", "validated"],
                   help="the hyperparameters' layer; each fact's traced layer among the validated candidates "
                        "(the hyperparameters' layer when its trace margin is below the calibrated threshold; "
                        "without a validation file, the traced argmax below the last layer); or the best of its "
                        "top traced candidates by trial edits")
    p.add_argument("--limit", type=int, default=None, help="only the first N facts")
    p.add_argument("--out", required=True,
                   help="output directory: results.json (rewritten after every fact), report.md, report.html, "
                        "locate.jsonl (resumable)")
    p.add_argument("--skip-errors", action="store_true",
                   help="warn and skip a fact that cannot be an edit (no target_new, target_new equal to the "
                        "true answer, or no target and target_new already the model's answer) instead of stopping")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="edit N facts at once and measure each on the model holding its batch (mass editing: "
                        "MEMIT/AlphaEdit write a batch in one update over the YAML's window, ROME one fact after "
                        "another); with --sequential the batches accumulate. MEMIT/AlphaEdit default: 1")
    p.add_argument("--sequential", action="store_true",
                   help="keep every edit (each fact at its own layer) instead of restoring the weights in between; "
                        "reports retention of earlier edits, paraphrase and locality after the last edit, and "
                        "efficacy after 1, 10 and all edits")
    _add_trace_args(p)


def _add_eval_parsers(sub, commands: Mapping[str, Command]) -> None:
    """Register `eval` and `demo`."""
    def generation_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("generation (before/after texts)")
        g.add_argument("--generation", default="greedy", choices=["greedy", "beam", "sample"], help="decoding")
        g.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per prompt")
        g.add_argument("--num-beams", type=int, default=4, help="beams for --generation beam")
        g.add_argument("--temperature", type=float, default=1.0, help="for --generation sample")
        g.add_argument("--top-k", type=int, default=50, help="for --generation sample")
        g.add_argument("--top-p", type=float, default=1.0, help="for --generation sample")
        g.add_argument("--generation-seed", type=int, default=0, help="seed of sampling (same before and after)")

    p = sub.add_parser("eval", help="edit every fact, evaluate it (generations, CounterFact and EasyEdit metrics), "
                                    "optionally sweep every layer, and write a report")
    _add_pipeline_args(p)
    p.add_argument("--sweep", action="store_true", help="also edit at every layer and compare with the trace")
    p.add_argument("--max-neighborhood", type=int, default=None, help="generate on at most N neighbourhood prompts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-heatmaps", action="store_true",
                   help="trace only the last subject token (T times less work; the cards show effect bars)")
    generation_args(p)
    p.set_defaults(func=commands["pipeline"])

    p = sub.add_parser("demo", help="locate → hyperparameters → edit → evaluate on a shipped fact model, "
                                    "and write report.html, report.md and results.json")
    p.add_argument("--out", default="rome-locate-demo", help="output directory (default ./rome-locate-demo)")
    p.add_argument("--family", default="gpt2", choices=["gpt2", "llama"], help="which shipped fact model")
    p.add_argument("--n-facts", type=int, default=4, help="how many CounterFact facts to edit")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep over every layer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    generation_args(p)
    p.set_defaults(func=commands["demo"])


def hparams_job(args: argparse.Namespace):
    """The `hparams` command's flags as one HParamsJob record (configure.py does the work)."""
    from .configure import HParamsJob, hparams_device, parse_overrides

    window = args.alg != "ROME"
    return HParamsJob(
        facts_file=args.facts, output=args.output, model_path=args.model, model_name=args.model_name,
        device_field=hparams_device(args.hparams_device, args.device), overrides=parse_overrides(args.set),
        set_items=tuple(args.set), layer=args.layer, validate=not args.no_validate and args.layer is None,
        test_fraction=args.test_fraction, budget=args.budget if args.budget is not None else 3000 if window else 300,
        grid=args.grid, n_calibration=_or(args.calibration_facts, 100 if window else 40),
        n_test=_or(args.test_facts, 100 if window else 40), stats_dir=args.stats_dir, corpus=args.corpus,
        self_sample=args.self_sample, seed=args.seed, quiet=args.quiet, objective=args.objective, alg=args.alg,
        trial_batch=args.trial_batch, max_batch=args.max_batch, max_window=args.max_window)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
