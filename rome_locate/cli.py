"""`rome-locate`: one subcommand per stage (fact-model, trace, locate, hparams, stats, edit, eval, demo)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
from pathlib import Path

from .cli_args import build_parser, hparams_job
from .process import Terminated, run_rank_process, sigterm_raises, under_torchrun

# Stage modules are imported inside each command so that `--help` stays instant.


def load_model(args: argparse.Namespace, arch=None):
    """The LoadedModel of `--model` on `--device` in `--dtype`, or spread by `--device-map`, its architecture
    resolved once (`arch`: the --arch record read before loading)."""
    from .models import load
    from .prompts import check_chat_template

    lm = load(args.model, arch=arch, device=args.device, dtype=args.dtype, device_map=args.device_map,
              max_memory=args.max_memory, offload_folder=args.offload_folder,
              trust_remote_code=args.trust_remote_code)
    if args.chat_template:
        check_chat_template(lm.tok)  # before any work, not at the first prompt
    return lm


def _trace_settings(args: argparse.Namespace, full: bool = False):
    """The one TraceSettings of a command, from its trace flags (validated there: a bad value is a ValueError)."""
    from .trace import TraceSettings

    return TraceSettings(kind=args.kind, samples=args.samples, window=args.window, noise=args.noise,
                         noise_draws=args.noise_draws, answer=args.answer, seed=args.seed, full=full,
                         method=args.method, verify_top=args.verify_top, chat_template=args.chat_template)


def _cmd_fact_model(args: argparse.Namespace) -> int:
    from . import fact_models

    if args.train:
        from .fact_models.train import train

        train(args.family)
    if args.counterfact:
        print(fact_models.counterfact_path(args.family))
    elif args.easyedit:
        print(fact_models.easyedit_path(args.family))
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


# ---- trace, locate ---------------------------------------------------------


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
    from .facts import check_limit, load_facts
    from .locate import check_out, locate, record, record_line, summary_lines
    from .plots import check_plots_dir

    settings = _trace_settings(args)
    facts = load_facts(args.facts, limit=check_limit(args.limit, "--limit"))
    if args.batch_facts is not None and args.batch_facts < 1:
        raise ValueError(f"--batch-facts must be >= 1 (facts traced together), got {args.batch_facts}")
    # Every input and output is checked before the model is loaded and long before any tracing.
    if args.out:
        check_out(args.out)
    if args.plots:
        check_plots_dir(args.plots, "--plots")
    arch = _arch_file(args)
    part = distributed.part(facts, args.out)  # under torchrun: this rank's block of the facts and its shard file
    lm = load_model(args, arch)
    start = time.perf_counter()
    pairs = locate(lm.model, lm.tok, part.facts, settings, out=part.out, plots_dir=args.plots,
                   progress=not args.quiet, arch=lm.arch, skip_errors=args.skip_errors, dataset=facts,
                   batch_facts=args.batch_facts)
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
    for line in summary_lines([r for r, _ in pairs], wall):
        print(line, file=summary)
    if args.out:
        print(f"wrote {args.out}", file=summary)
    if args.plots:
        print(f"plots in {args.plots}", file=summary)
    return 0


# ---- hparams, stats, edit --------------------------------------------------


def _cmd_hparams(args: argparse.Namespace) -> int:
    from . import distributed
    from .configure import check_job, write_traced
    from .configure_window import VALIDATED_WRITERS
    from .facts import check_limit, load_facts
    from .files import output_lock
    from .locate import locate

    job = hparams_job(args)
    settings = _trace_settings(args)
    rank = distributed.current()
    check_job(job, torchrun=rank is not None)  # every input and output, before any work
    facts = load_facts(args.facts, limit=check_limit(args.limit, "--limit"))
    arch_file = _arch_file(args)
    # One run at a time writes -o and its validation files: the process that writes them holds -o.lock throughout.
    writer = rank is None or rank.rank == 0
    with output_lock(job.output, "-o") if writer else contextlib.nullcontext():
        # Under torchrun each rank traces its block into a shard beside -o (to resume from); rank 0 writes the YAML.
        part = distributed.part(facts, args.output + ".traces", shards_only=True)
        lm = load_model(args, arch_file)
        if job.validate:
            VALIDATED_WRITERS[job.alg](job, lm, facts, settings)
            return 0
        pairs = [] if args.layer is not None else locate(lm.model, lm.tok, part.facts, settings, out=part.out,
                                                         progress=not args.quiet, arch=lm.arch, dataset=facts)
        pairs = _merged_pairs(part, pairs)
        if pairs is not None:  # under torchrun, rank 0 writes the YAML from every rank's traces
            write_traced(job, lm, pairs, settings)
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
    if args.corpus is not None and args.chat_template:
        raise ValueError("--chat-template applies to --self-sample (texts the model samples itself); a --corpus is "
                         "read as plain text: leave --chat-template out")
    lm = load_model(args, _arch_file(args))
    model, tok, arch = lm.model, lm.tok, lm.arch
    layers = args.layers if args.layers is not None else list(range(arch.n_layers))
    if args.self_sample is not None:
        paths = self_sample_mom2(model, tok, arch, layers, args.stats_dir, n_samples=args.self_sample,
                                 model_name=model_name, dtype=args.mom2_dtype, progress=True,
                                 chat_template=args.chat_template)
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
    from .algorithms import is_window, load_any_hparams
    from .hparams import bind_model
    from .pipeline import resolve_rule
    from .stats import ensure_self_sampled

    # model_name becomes the real path; a model-relative stats_dir ("stats") is found next to the weights.
    hparams = bind_model(load_any_hparams(args.hparams), args.model)
    rule = resolve_rule(hparams, lm.arch.n_layers, args.layers, hparams_path=args.hparams)
    print(f"--layers {args.layers}: {rule.describe()}", file=sys.stderr)
    if corpus is None:  # a given corpus wins (the pipeline computes from it)
        every = rule.mode != "fixed" or getattr(args, "sweep", False)
        layers = list(range(lm.arch.n_layers)) if every else list(hparams.layers) if is_window(hparams) else \
            [rule.fallback]
        hparams = ensure_self_sampled(lm.model, lm.tok, hparams, layers, arch=lm.arch,
                                      notice=lambda m: print(m, file=sys.stderr), chat_template=args.chat_template)
    return hparams, rule


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """`edit` and `eval`: one command path; `edit` is the pipeline without generations, sweep and heatmaps."""
    from . import distributed
    from .editors import check_editor
    from .facts import check_limit, load_facts
    from .outcome import EvaluationError
    from .outdir import check_out_dir
    from .pipeline import run_pipeline

    check_editor(args.editor, args.chat_template)  # EasyEdit importable: said now, not after the model has loaded
    evaluating = args.command == "eval"
    if evaluating and args.max_neighborhood is not None and args.max_neighborhood < 0:
        raise ValueError(f"--max-neighborhood must be >= 0 prompts, got {args.max_neighborhood}")
    generation = _generation_settings(args) if evaluating else None
    facts = load_facts(args.facts, limit=check_limit(args.limit, "--limit"))
    arch_file = _arch_file(args)
    # Before the model loads: writable, no other run in it (rank 0 takes the lock for torchrun), nothing foreign.
    rank = distributed.current()
    check_out_dir(args.out, "--out", lock=rank is None or rank.rank == 0)
    with contextlib.ExitStack() as locks:  # held for the whole run
        part = _pipeline_part(args, facts, locks)
        records = paths = None
        if not part.finished:  # a rank's shard finished by an earlier run is not edited again
            lm = load_model(args, arch_file)
            corpus = getattr(args, "corpus", None)
            hparams, rule = _pipeline_inputs(args, lm, corpus)
            try:
                records, paths = run_pipeline(
                    lm.model, lm.tok, part.facts, hparams, part.out, model_name=args.model, layer_rule=rule,
                    layers=rule.mode, sweep=evaluating and args.sweep, generation=generation,
                    trace_settings=_trace_settings(args, full=evaluating and not args.no_heatmaps),
                    editor=args.editor, seed=args.seed, mom2_corpus=corpus, arch=lm.arch, facts_path=args.facts,
                    max_neighborhood=getattr(args, "max_neighborhood", None), skip_errors=args.skip_errors,
                    sequential=args.sequential, progress=not _quiet(args), dataset=facts,
                    chat_template=args.chat_template, batch_size=args.batch_size)
            except EvaluationError as exc:
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
    """The terminal lines of `edit`/`eval`, from the summary results.json holds (computed once, when written)."""
    from .report import edit_summary_line, print_summary, written_summary

    summary = written_summary(paths["json"])
    if args.command == "eval":
        print_summary(records, summary=summary)
        print(f"wrote {paths['html']}, {paths['md']} and {paths['json']}")
    else:
        print(edit_summary_line(summary, args.editor, args.layers))
        print(f"wrote {paths['json']}")


def _pipeline_part(args: argparse.Namespace, facts, locks: contextlib.ExitStack):
    """This process's part of `edit`/`eval`: under torchrun its block of the facts and OUT/shards/rankR-of-N;
    the locks of what it writes (--out in one process and on rank 0, a rank's shard) are entered in `locks`."""
    from . import distributed
    from .outdir import out_lock

    rank = distributed.current()
    if rank is not None and args.sequential:
        raise ValueError("--sequential keeps every edit in one model: run it in one process, not under torchrun")
    if rank is None or rank.rank == 0:
        locks.enter_context(out_lock(args.out, "--out"))  # before part() marks --out as running under torchrun
    part = distributed.part(facts, args.out, directory=True)
    if part.rank is not None:
        locks.enter_context(out_lock(part.out, "--out"))
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
    """Entry point of the `rome-locate` console script; a torchrun rank's process ends in it
    (`process.run_rank_process`: once its work is written, without the interpreter's teardown)."""
    if argv is None and under_torchrun():
        run_rank_process(lambda: _run(None))  # never returns
    return _run(argv)


def _run(argv: list[str] | None) -> int:
    from . import distributed

    parser = build_parser({"fact_model": _cmd_fact_model, "trace": _cmd_trace, "locate": _cmd_locate,
                           "hparams": _cmd_hparams, "stats": _cmd_stats, "pipeline": _cmd_pipeline,
                           "demo": _cmd_demo})
    args = parser.parse_args(argv)
    try:
        # Under torchrun: join the ranks (NCCL on cuda:LOCAL_RANK, gloo on CPU); nothing happens in one process.
        with sigterm_raises(), distributed.session(args.command, getattr(args, "device", None),
                                                   argv=sys.argv[1:] if argv is None else argv) as rank:
            if rank is not None:
                _for_rank(args, rank)
            return int(args.func(args) or 0)
    except _user_errors() as exc:
        # Bad input: one line naming it. Anything else (a bug, CUDA out of memory) keeps its traceback.
        print(f"rome-locate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"rome-locate {args.command}: error: {exc}: the locks are removed and what finished is kept; "
              f"run the same command again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM


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
