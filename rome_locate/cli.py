"""`rome-locate`: one subcommand per stage (fact-model, trace, locate, hparams, stats, edit, eval, demo)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# Stage modules are imported inside each command so that `--help` stays instant.


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local directory or hub name (loaded with from_pretrained)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--arch", default=None, help="JSON file of module names, for a family the map does not know")
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


def load_model(args: argparse.Namespace, arch=None):
    """The LoadedModel of `--model` on `--device` in `--dtype`, or spread by `--device-map`, its architecture
    resolved once (`arch`: the --arch record read before loading)."""
    from .models import load

    return load(args.model, arch=arch, device=args.device, dtype=args.dtype, device_map=args.device_map,
                max_memory=args.max_memory, offload_folder=args.offload_folder)


def _trace_settings(args: argparse.Namespace, full: bool = False):
    """The one TraceSettings of a command, from its trace flags (validated there: a bad value is a ValueError)."""
    from .trace import TraceSettings

    return TraceSettings(kind=args.kind, samples=args.samples, window=args.window, noise=args.noise,
                         noise_draws=args.noise_draws, answer=args.answer, seed=args.seed, full=full,
                         method=args.method, verify_top=args.verify_top)


def _cmd_fact_model(args: argparse.Namespace) -> int:
    from . import fact_models

    if args.train:
        from .fact_models.train import train

        train(args.family)
    if args.counterfact:
        print(fact_models.counterfact_path(args.family))
    elif args.facts:
        print(fact_models.facts_path(args.family))
    elif args.corpus:
        print(fact_models.corpus_path(args.family))
    elif args.accuracy:
        import json

        from .fact_models.train import accuracy

        model, tok = fact_models.load_fact_model(args.family)
        print(json.dumps(accuracy(model, tok, args.family), indent=2))
    else:
        print(fact_models.fact_model_dir(args.family))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="rome-locate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fact-model", help="paths of the shipped fact models, their facts and corpus")
    p.add_argument("family", choices=["gpt2", "llama"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--path", action="store_true", help="print the model directory (default)")
    g.add_argument("--facts", action="store_true", help="print the known_1000-format facts file")
    g.add_argument("--counterfact", action="store_true", help="print the CounterFact-format facts file")
    g.add_argument("--corpus", action="store_true", help="print the training corpus file")
    g.add_argument("--accuracy", action="store_true", help="measure top-1 accuracy on its facts")
    p.add_argument("--train", action="store_true", help="retrain the model from its seed (slow)")
    p.set_defaults(func=_cmd_fact_model)

    _add_locate_parsers(sub)
    _add_edit_parsers(sub)
    _add_eval_parsers(sub)
    return parser


# ---- trace, locate ---------------------------------------------------------


def _add_locate_parsers(sub) -> None:
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
    p.set_defaults(func=_cmd_trace)

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
    p.set_defaults(func=_cmd_locate)


def _arch_file(args: argparse.Namespace):
    """The --arch file read and checked now (before the model loads), or None."""
    from .arch import read_arch

    return read_arch(args.arch) if args.arch else None


def _merged_pairs(part, pairs: list) -> list | None:
    """Under torchrun, rank 0 gets every rank's (TraceResult, LayerChoice) pairs in fact order (merged into the
    part's --out), the other ranks None; a single process keeps its own."""
    from . import distributed
    from .choose import LayerChoice
    from .locate import record
    from .trace import TraceResult

    if part.rank is None:
        return pairs
    merged = part.gather([record(r, c) for r, c in pairs], distributed.merge_lines)
    return None if merged is None else [(TraceResult.from_json(o), LayerChoice.from_json(o)) for o in merged]


def _fmt_row(values) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def _cmd_trace(args: argparse.Namespace) -> int:
    from .arch import KINDS
    from .atp import trace_by_method
    from .choose import choose_layer
    from .facts import Fact
    from .files import check_output_dir

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds must name some of {KINDS}, got {args.kinds!r}")
    settings = _trace_settings(args, full=True)
    if settings.noise_draws == "replace":
        raise ValueError("trace: --noise-draws replace needs other subjects; use `locate` on a facts file")
    if args.plots:
        check_output_dir(args.plots, "--plots")
    lm = load_model(args, _arch_file(args))
    model, tok, arch = lm.model, lm.tok, lm.arch
    fact = Fact(prompt=args.prompt, subject=args.subject, target=args.target, id="prompt")
    results = {}
    for kind in kinds:
        results[kind] = trace_by_method(model, tok, fact, dataclasses.replace(settings, kind=kind), arch=arch,
                                        occurrence=args.occurrence)
    r = next(iter(results.values()))
    b, e = r.subject_range
    print(f"tokens: {list(r.tokens)}")
    print(f"subject: {r.subject!r} at tokens [{b}, {e}) (occurrence {r.subject_occurrence}); last subject token "
          f"{e - 1} = {r.tokens[e - 1]!r}")
    print(f"answer: {r.answer!r} ({r.answer_source}); model top-1 {r.top1!r}"
          + ("" if r.known is None else f"; target {r.target!r} {'KNOWN' if r.known else 'NOT known by the model'}"))
    print(f"p_clean {r.high_score:.4f}  p_corrupt {r.low_score:.4f}  noise {r.noise:.4g} ({r.noise_draws}, "
          f"{r.samples} samples)")
    for kind, res in results.items():
        print(f"{kind:>6} p_restored at token {e - 1}, layers 0..{res.n_layers - 1} (window {res.window}): "
              f"{_fmt_row(res.scores)}")
    shown = args.kind if args.kind in results else kinds[0]
    c = choose_layer(results[shown])
    runner = "" if c.runner_up is None else f", runner-up {c.runner_up} (margin {c.margin:.4f})"
    print(f"choice ({shown}): layer {c.layer}, indirect effect {c.effect:.4f}{runner}")
    if args.plots:
        from .plots import heatmap

        for kind, res in results.items():
            for path in heatmap(res, Path(args.plots) / f"trace_{kind}"):
                print(f"wrote {path}")
    return 0


def _cmd_locate(args: argparse.Namespace) -> int:
    import time

    from . import distributed
    from .choose import choose_dataset_layer
    from .facts import check_limit, load_facts
    from .files import check_output_dir
    from .locate import check_out, locate, record, record_line

    settings = _trace_settings(args)
    facts = load_facts(args.facts, limit=check_limit(args.limit, "--limit"))
    if args.batch_facts is not None and args.batch_facts < 1:
        raise ValueError(f"--batch-facts must be >= 1 (facts traced together), got {args.batch_facts}")
    # Every input and output is checked before the model is loaded and long before any tracing.
    if args.out:
        check_out(args.out)
    if args.plots:
        check_output_dir(args.plots, "--plots")
    arch = _arch_file(args)
    part = distributed.part(facts, args.out)  # under torchrun: this rank's block of the facts and its shard file
    lm = load_model(args, arch)
    start = time.perf_counter()
    pairs = locate(lm.model, lm.tok, part.facts, settings, out=part.out, plots_dir=args.plots,
                   progress=not args.quiet, arch=lm.arch, skip_errors=args.skip_errors, dataset=facts, batch_facts=args.batch_facts)
    wall = time.perf_counter() - start
    pairs = _merged_pairs(part, pairs)  # under torchrun: rank 0 reports on every fact, the others stop
    if pairs is None:
        return 0
    if part.rank is not None and args.plots and pairs:  # each rank drew its own facts; rank 0 draws them all
        from .plots import average_effect_plot

        average_effect_plot([r for r, _ in pairs], Path(args.plots) / f"average_effect_{settings.kind}")
    summary = sys.stdout if args.out else sys.stderr
    if not args.out:
        for result, choice in pairs:
            print(record_line(record(result, choice)))
    if not pairs:
        print("no fact could be traced", file=summary)
        return 1
    results = [r for r, _ in pairs]
    d = choose_dataset_layer(results)
    known = [r.known for r in results if r.known is not None]
    print(f"{len(results)} facts traced ({args.kind}) in {wall:.1f} s; noise {results[0].noise:.4g} "
          f"({results[0].noise_draws}), window {results[0].window}, {results[0].samples} samples", file=summary)
    if known:
        print(f"known facts (model top-1 = target's first token): {sum(known)}/{len(known)}", file=summary)
    print(f"dataset layer: {d.layer} (mean indirect effect {d.mean_effects[d.layer]:.4f})", file=summary)
    print("layer  facts  mean_IE", file=summary)
    for layer, (n, m) in enumerate(zip(d.histogram, d.mean_effects)):
        print(f"{layer:5d}  {n:5d}  {m:+.4f}", file=summary)
    if args.out:
        print(f"wrote {args.out}", file=summary)
    if args.plots:
        print(f"plots in {args.plots}", file=summary)
    return 0


# ---- hparams, stats, edit --------------------------------------------------


def _add_edit_parsers(sub) -> None:
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
    v.add_argument("--budget", type=int, default=300, help="most trial edits of the search (default 300)")
    v.add_argument("--grid", default="default", choices=["default", "paper"],
                   help="v* settings searched: 8 around ROME's paper settings, or the paper's alone")
    v.add_argument("--calibration-facts", type=int, default=40, help="most calibration facts (default 40)")
    v.add_argument("--test-facts", type=int, default=40, help="most test facts (default 40)")
    v.add_argument("--stats-dir", default="./data/stats", help="stats_dir field: where mom2 statistics are read "
                   "and, when missing, written (default ./data/stats, EasyEdit's)")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--corpus", default=None, help="text file for the mom2 statistics (mom2_dataset corpus); "
                     "without it, texts sampled from the model are used")
    src.add_argument("--self-sample", type=int, default=3000, metavar="N",
                     help="texts sampled from the model for the mom2 statistics when no corpus (default 3000)")
    _add_trace_args(p)
    p.set_defaults(func=_cmd_hparams)

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
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("edit", help="edit every fact with ROME (one at a time, weights restored) and measure; "
                                    "the eval pipeline without generations and sweep")
    _add_pipeline_args(p)
    p.add_argument("--corpus", default=None,
                   help="text file to compute mom2 statistics missing for a traced layer (into OUT/stats)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pipeline)


def _hparams_device(args: argparse.Namespace):
    if args.hparams_device is not None:
        return int(args.hparams_device) if args.hparams_device.isdigit() else args.hparams_device
    from .models import default_device

    device = args.device or default_device()
    if device.startswith("cuda"):
        return int(device.partition(":")[2] or 0)  # EasyEdit's device field is a CUDA index
    return device


def _cmd_hparams(args: argparse.Namespace) -> int:
    import yaml

    from . import distributed
    from .choose import choose_dataset_layer
    from .facts import check_limit, load_facts
    from .hparams import check_hparams_output, dataset_header, generate_hparams, write_hparams
    from .locate import locate

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--set {item!r}: the value of {key} is not a plain YAML value ({problem}); "
                             f"quote it or write it as e.g. {key}=0.1 or {key}=[5,10]") from None
    settings = _trace_settings(args)
    check_hparams_output(args.output)
    validated = not args.no_validate and args.layer is None
    if validated:  # its own inputs and outputs, also checked before any work
        _check_validation_args(args)
    facts = load_facts(args.facts, limit=check_limit(args.limit, "--limit"))
    arch_file = _arch_file(args)
    # Under torchrun each rank traces its block into a shard beside -o (to resume from); rank 0 writes the YAML.
    part = distributed.part(facts, args.output + ".traces", shards_only=True)
    lm = load_model(args, arch_file)
    if validated:
        return _validated_hparams(args, lm, facts, overrides, settings)
    model, tok, arch = lm.model, lm.tok, lm.arch
    pairs = [] if args.layer is not None else locate(model, tok, part.facts, settings, out=part.out,
                                                     progress=not args.quiet, arch=arch, dataset=facts)
    pairs = _merged_pairs(part, pairs)
    if pairs is None:
        return 0
    if args.layer is not None:
        layer = args.layer
        header = f"Written by `rome-locate hparams` with --layer {layer} (not traced).\nfacts: {args.facts}"
    else:
        if not pairs:
            raise ValueError(f"no fact of {args.facts} could be traced")
        d = choose_dataset_layer([r for r, _ in pairs])
        layer = d.layer
        shown = dict(kind=settings.kind, samples=settings.samples, window=pairs[0][0].window, noise=settings.noise,
                     noise_level=f"{pairs[0][0].noise:.4g}", noise_draws=settings.noise_draws,
                     answer=settings.answer, seed=settings.seed)
        header = dataset_header(args.facts, d.n_facts, shown, d.mean_effects, d.histogram, layer, d.kind)
        print("layer  facts  mean_IE")
        for i, (n, m) in enumerate(zip(d.histogram, d.mean_effects)):
            print(f"{i:5d}  {n:5d}  {m:+.4f}")
    h = generate_hparams(model, arch, layer, args.model_name or args.model, device=_hparams_device(args), **overrides)
    if args.model_name is None:  # an absolute model_name and stats_dir: the YAML works from any folder
        from .hparams import bind_model

        h = bind_model(h, args.model)
    header += f"\nmodel: {args.model} ({arch.n_layers} layers)"
    if overrides:
        header += "\nset by hand (--set): " + " ".join(args.set)
    path = write_hparams(h, args.output, header=header)
    print(f"layer {layer}; wrote {path}")
    return 0


def _check_validation_args(args: argparse.Namespace) -> None:
    """The validated `hparams`' settings and its two files beside -o, checked before any work."""
    from . import distributed
    from .validate import check_validation_outputs

    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1 trial edit, got {args.budget}")
    if not 0 < args.test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    for flag, n in (("--calibration-facts", args.calibration_facts), ("--test-facts", args.test_facts),
                    ("--self-sample", args.self_sample)):
        if n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    if args.corpus is not None and not Path(args.corpus).is_file():
        raise FileNotFoundError(f"--corpus {args.corpus}: no such file")
    if distributed.current() is not None:
        # The search is sequential (each round depends on the last): one process runs it.
        raise ValueError("the validated search runs in one process: run `hparams` without torchrun, "
                         "or pass --no-validate to trace the facts across the ranks")
    check_validation_outputs(args.output)


def _validated_hparams(args: argparse.Namespace, lm, facts, overrides: dict, settings) -> int:
    """`hparams` with validation: statistics, the search, then the YAML and its validation files."""
    from .hparams import DEFAULTS, bind_model, generate_hparams, with_layer, write_hparams
    from .stats import compute_mom2, ensure_self_sampled, missing_mom2_layers, stats_model_name
    from .validate import GRIDS, header, run_validation, usable_facts, verdict, write_validation

    model, tok, arch = lm.model, lm.tok, lm.arch
    usable_facts(model, tok, facts, args.test_fraction, args.seed, args.facts)  # before any statistics
    mom2 = (dict(mom2_dataset="corpus", mom2_n_samples=DEFAULTS["mom2_n_samples"]) if args.corpus else
            dict(mom2_dataset="self_sample", mom2_n_samples=args.self_sample))
    base = generate_hparams(model, arch, 0, args.model_name or args.model, device=_hparams_device(args),
                            **{"mom2_adjustment": True, "stats_dir": args.stats_dir, **mom2, **overrides})
    if args.model_name is None:
        # Absolute model_name and stats_dir, as the trace-only YAML has (bind_model), so it works from any folder.
        # The statistics still go where --stats-dir (or --set stats_dir) says: bind_model's search next to the
        # weights is for reading a YAML, not for choosing where to write new files.
        base = dataclasses.replace(bind_model(base, args.model),
                                   stats_dir=str(Path(overrides.get("stats_dir", args.stats_dir)).resolve()))
    layers = list(range(arch.n_layers))
    if args.corpus:
        todo = missing_mom2_layers(model, base, layers)
        if todo:
            compute_mom2(model, tok, arch, todo, args.corpus, base.stats_dir,
                         model_name=stats_model_name(model) or Path(args.model).name, mom2_dataset="corpus",
                         n_samples=DEFAULTS["mom2_n_samples"], dtype=base.mom2_dtype, progress=not args.quiet)
    else:
        base = ensure_self_sampled(model, tok, base, layers, n_samples=args.self_sample,
                                   notice=lambda m: print(m, file=sys.stderr), arch=arch)
    v = run_validation(model, tok, facts, base, facts_file=args.facts, model_name=args.model,
                       test_fraction=args.test_fraction, budget=args.budget, n_calibration=args.calibration_facts,
                       n_test=args.test_facts, seed=args.seed, trace_settings=settings, grid=GRIDS[args.grid](),
                       arch=arch,
                       progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    h = with_layer(dataclasses.replace(base, **v.chosen.setting.overrides()), v.chosen.layer)
    text = header(v) + f"\nmodel: {args.model} ({arch.n_layers} layers)"
    if overrides:
        text += "\nset by hand (--set): " + " ".join(args.set)
    path = write_hparams(h, args.output, header=text)
    j, m = write_validation(v, path)
    print(f"verdict: {verdict(v)}")
    for mode in v.test:
        print(f"  {mode.name:34s} efficacy {mode.efficacy.text()}  paraphrase {mode.paraphrase.text()}  "
              f"neighbourhood {mode.neighborhood.text()}")
    print(f"layer {v.chosen.layer}; wrote {path}, {j} and {m} ({v.trials} trial edits, {v.seconds:.0f} s)")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .files import check_output_dir
    from .stats import check_n_samples, compute_mom2, folder_name, self_sample_mom2

    if args.model_name is not None:
        model_name = folder_name(args.model_name, "--model-name")
    else:
        model_name = folder_name(args.model.rstrip("/").rsplit("/")[-1],
                                 "the last component of --model (it names the folder; pass --model-name)")
    folder_name(args.mom2_dataset, "--mom2-dataset")
    check_n_samples(args.n_samples, "--n-samples")
    if args.self_sample is not None and args.self_sample < 1:
        raise ValueError(f"--self-sample must be >= 1 text, got {args.self_sample}")
    check_output_dir(args.stats_dir, "--stats-dir")
    if args.corpus is not None and not Path(args.corpus).is_file():
        raise FileNotFoundError(f"--corpus {args.corpus}: no such file")
    lm = load_model(args, _arch_file(args))
    model, tok, arch = lm.model, lm.tok, lm.arch
    layers = args.layers if args.layers is not None else list(range(arch.n_layers))
    if args.self_sample is not None:
        paths = self_sample_mom2(model, tok, arch, layers, args.stats_dir, n_samples=args.self_sample,
                                 model_name=model_name, dtype=args.mom2_dtype, progress=True)
    else:
        paths = compute_mom2(model, tok, arch, layers, args.corpus, args.stats_dir, model_name=model_name,
                             mom2_dataset=args.mom2_dataset, n_samples=args.n_samples, dtype=args.mom2_dtype,
                             progress=True)
    for path in paths:
        print(path)
    return 0


def _pipeline_inputs(args: argparse.Namespace, lm, corpus: str | None):
    """`edit`/`eval`: (hyperparameters, layer rule). The rule is the pipeline's (`pipeline.resolve_rule`, printed);
    where the statistics are missing and no corpus is given, self-sampled ones are used (a notice on stderr)."""
    from .hparams import bind_model, load_hparams
    from .pipeline import resolve_rule
    from .stats import ensure_self_sampled

    # model_name becomes the real path; a model-relative stats_dir ("stats") is found next to the weights.
    hparams = bind_model(load_hparams(args.hparams, easyedit=False), args.model)
    rule = resolve_rule(hparams, lm.arch.n_layers, args.layers, hparams_path=args.hparams)
    print(f"--layers {args.layers}: {rule.describe()}", file=sys.stderr)
    if corpus is None:  # a given corpus wins (the pipeline computes from it)
        every = rule.mode != "fixed" or getattr(args, "sweep", False)
        layers = list(range(lm.arch.n_layers)) if every else [rule.fallback]
        hparams = ensure_self_sampled(lm.model, lm.tok, hparams, layers, arch=lm.arch,
                                      notice=lambda m: print(m, file=sys.stderr))
    return hparams, rule


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """`edit` and `eval`: one command path; `edit` is the pipeline without generations, sweep and heatmaps."""
    from .facts import check_limit, load_facts
    from .outcome import EvaluationError
    from .pipeline import run_pipeline

    evaluating = args.command == "eval"
    if evaluating and args.max_neighborhood is not None and args.max_neighborhood < 0:
        raise ValueError(f"--max-neighborhood must be >= 0 prompts, got {args.max_neighborhood}")
    generation = _generation_settings(args) if evaluating else None
    facts = load_facts(args.facts, limit=check_limit(args.limit, "--limit"))
    arch_file = _arch_file(args)
    part = _pipeline_part(args, facts)
    records = paths = None
    if not part.finished:  # a rank's shard finished by an earlier run is not edited again
        lm = load_model(args, arch_file)
        corpus = getattr(args, "corpus", None)
        hparams, rule = _pipeline_inputs(args, lm, corpus)
        try:
            records, paths = run_pipeline(
                lm.model, lm.tok, part.facts, hparams, part.out, model_name=args.model, layer_rule=rule,
                layers=rule.mode, sweep=evaluating and args.sweep, generation=generation,
                trace_settings=_trace_settings(args, full=evaluating and not args.no_heatmaps), editor=args.editor,
                seed=args.seed, mom2_corpus=corpus, arch=lm.arch, facts_path=args.facts,
                max_neighborhood=getattr(args, "max_neighborhood", None), skip_errors=args.skip_errors,
                sequential=args.sequential, progress=not _quiet(args), dataset=facts)
        except EvaluationError as exc:
            from . import distributed

            distributed.record_failure(exc)  # under torchrun: named in OUT.incomplete
            print(f"rome-locate {args.command}: error: {exc}", file=sys.stderr)
            print(f"rome-locate {args.command}: the results and report of the {len(exc.records)} finished "
                  f"fact(s) are in {part.out}", file=sys.stderr)
            return 2
    records, paths = _merged_records(part, records, paths)
    if records is None:
        return 0
    _print_pipeline_summary(args, records, paths)
    return 0


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False) or getattr(args, "no_progress", False))


def _print_pipeline_summary(args: argparse.Namespace, records, paths) -> None:
    from .report import edit_summary_line, print_summary
    from .summary import summarize

    if args.command == "eval":
        print_summary(records)
        print(f"wrote {paths['html']}, {paths['md']} and {paths['json']}")
    else:
        print(edit_summary_line(summarize(records), args.editor, args.layers))
        print(f"wrote {paths['json']}")


def _pipeline_part(args: argparse.Namespace, facts):
    """This process's part of `edit`/`eval`: under torchrun its block of the facts and OUT/shards/rankR-of-N."""
    from . import distributed

    part = distributed.part(facts, args.out, directory=True)
    if part.rank is not None and args.sequential:
        raise ValueError("--sequential keeps every edit in one model: run it in one process, not under torchrun")
    return part


def _merged_records(part, records, paths):
    """Under torchrun, rank 0 merges every rank's shard into --out (results.json, locate.jsonl, report) and gets
    (all records, paths), the other ranks (None, None); a single process keeps its own."""
    from . import distributed

    if part.rank is None:
        return records, paths
    merged = part.gather(distributed.read_dir_payload(part.out), distributed.merge_eval)
    return (None, None) if merged is None else (merged["records"], merged["paths"])


# ---- eval, demo ------------------------------------------------------------


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
                   help="warn and skip a fact that cannot be an edit (no target_new, or target_new equal to the "
                        "true answer) instead of stopping")
    p.add_argument("--sequential", action="store_true",
                   help="keep every edit (each fact at its own layer) instead of restoring the weights in between; "
                        "reports retention of earlier edits, paraphrase and locality after the last edit, and "
                        "efficacy after 1, 10 and all edits")
    _add_trace_args(p)


def _add_eval_parsers(sub) -> None:
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
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("demo", help="locate → hyperparameters → edit → evaluate on a shipped fact model, "
                                    "and write report.html, report.md and results.json")
    p.add_argument("--out", default="rome-locate-demo", help="output directory (default ./rome-locate-demo)")
    p.add_argument("--family", default="gpt2", choices=["gpt2", "llama"], help="which shipped fact model")
    p.add_argument("--n-facts", type=int, default=4, help="how many CounterFact facts to edit")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep over every layer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    generation_args(p)
    p.set_defaults(func=_cmd_demo)


def _generation_settings(args: argparse.Namespace):
    from .outcome import GenerationSettings

    return GenerationSettings(mode=args.generation, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.generation_seed)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .outcome import EvaluationError

    if args.n_facts < 1:
        raise ValueError(f"--n-facts must be >= 1, got {args.n_facts}")
    import torch

    # The fact models are tiny (d64): one thread is as fast as several, and OpenMP workers
    # spinning on a busy machine made the demo many times slower (measured: 9.7 min vs 1.1 min).
    torch.set_num_threads(1)
    try:
        run_demo(args.out, family=args.family, n_facts=args.n_facts, sweep=not args.no_sweep,
                 progress=not args.no_progress, generation=_generation_settings(args))
    except EvaluationError as exc:
        print(f"rome-locate demo: error: {exc}", file=sys.stderr)
        print(f"rome-locate demo: the report of the {len(exc.records)} finished fact(s) is in {args.out}",
              file=sys.stderr)
        return 2
    return 0


def _for_rank(args: argparse.Namespace, rank) -> None:
    """A torchrun rank's settings: its own device, or its own share of the node's GPUs for a device map, and
    progress on rank 0 only."""
    if getattr(args, "device_map", None) is None:
        args.device = rank.device
    elif rank.backend == "nccl":
        from .distributed import rank_max_memory
        from .models import parse_max_memory

        args.max_memory = rank_max_memory(rank, parse_max_memory(args.max_memory))
    if rank.rank:
        args.quiet = args.no_progress = True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rome-locate` console script."""
    from . import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Under torchrun: join the ranks (NCCL on cuda:LOCAL_RANK, gloo on CPU); nothing happens in one process.
        with distributed.session(args.command, getattr(args, "device", None),
                                 argv=sys.argv[1:] if argv is None else argv) as rank:
            if rank is not None:
                _for_rank(args, rank)
            return int(args.func(args) or 0)
    except _user_errors() as exc:
        # Bad input: one line naming it. Anything else (a bug, CUDA out of memory) keeps its traceback.
        print(f"rome-locate {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input: plain file and value errors, the package's own lookup errors, a failed rank."""
    from .arch import UnknownArchitectureError
    from .distributed import RankFailure
    from .hooks import UnknownModuleError

    # RankFailure: another torchrun rank failed (that rank reports its own error).
    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError, ValueError,
            UnknownArchitectureError, UnknownModuleError, RankFailure)


if __name__ == "__main__":
    sys.exit(main())
