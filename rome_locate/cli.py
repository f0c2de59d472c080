"""`rome-locate`: one subcommand per stage (fact-model, trace, locate, hparams, stats, edit, eval, demo)."""

from __future__ import annotations

import argparse
import sys

# Stage modules are imported inside each command so that `--help` stays instant.


def _device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local directory or hub name (loaded with from_pretrained)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--arch", default=None, help="JSON file of module names, for a family the map does not know")


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


def load_model(args: argparse.Namespace):
    """Load (model, tokenizer) from `--model` with from_pretrained, on `--device` in `--dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or _device_default()
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    return model, tok


def _cmd_fact_model(args: argparse.Namespace) -> int:
    from . import fact_model

    if args.train:
        fact_model.train(args.family)
    if args.counterfact:
        print(fact_model.counterfact_path(args.family))
    elif args.facts:
        print(fact_model.facts_path(args.family))
    elif args.corpus:
        print(fact_model.corpus_path(args.family))
    elif args.accuracy:
        import json

        model, tok = fact_model.load_fact_model(args.family)
        print(json.dumps(fact_model.accuracy(model, tok, args.family), indent=2))
    else:
        print(fact_model.fact_model_dir(args.family))
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


# ---- hparams, stats, edit --------------------------------------------------


def _add_edit_parsers(sub) -> None:
    """Register `hparams`, `stats` and `edit`."""


# ---- eval, demo ------------------------------------------------------------


def _add_eval_parsers(sub) -> None:
    """Register `eval` and `demo`."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rome-locate` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, LookupError, RuntimeError) as exc:
        print(f"rome-locate {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
