"""What limits MEMIT on the fact models: its context templates, and the number of facts written at once.

The validated MEMIT (or `--alg AlphaEdit`) YAML of a fact model (its window and settings) edits the test
facts of its validation record N at a time (N = 1, 10, 100) with

- EasyEdit's MEMIT context templates ("{}" and five sampled ten-token texts put
  before the prompt: what EasyEdit's MEMIT always uses, and the built-in editor too);
- the bare prompt only (no template), which EasyEdit's MEMIT cannot be told to use;

and, with `--seeds`, EasyEdit's templates sampled with other seeds: how far the
figures move when only the five sampled texts change (EasyEdit's `batch_edit`
samples its own, so this is the spread its parity with the built-in editor sits in).

The fact models learnt every fact at the start of a sentence, so a prompt behind a
sampled text is off their training distribution; z (the residual the edit must
reach) is optimised over all six prompts. Prints a table, writes
bench/results/memit_limits.json.

    OMP_NUM_THREADS=1 python bench/memit_limits.py [--model gpt2] [--sizes 1 10 100] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rome_locate.files import write_json  # noqa: E402


def measure(model_name: str, sizes: list[int], seeds: list[int] = (0,), alg: str = "MEMIT") -> dict:
    """Efficacy, paraphrase, neighbourhood (95% intervals) per template choice and batch size."""
    import torch

    # bench/ is on sys.path when this script runs: the test facts as every benchmark of a validated YAML reads them.
    from easyedit_parity import record_test_facts
    from rome_locate import memit
    from rome_locate.hparams import bind_model
    from rome_locate.intervals import bootstrap
    from rome_locate.memit_hparams import load_memit_hparams
    from rome_locate.models import load
    from rome_locate.pipeline import edit_facts

    torch.set_num_threads(1)
    folder = ROOT / "rome_locate" / "fact_models" / model_name
    yaml_path = ROOT / "hparams" / alg / f"fact-{model_name}.yaml"
    test = record_test_facts(yaml_path, folder / "counterfact.json")
    lm = load(str(folder))
    hp = bind_model(load_memit_hparams(yaml_path), folder)
    real = memit.template_groups
    rows = []
    cases = [("EasyEdit's (prompt + 5 sampled prefixes)", real, s) for s in seeds] + \
        [("bare prompt only", lambda *a, **k: [["{}"]], 0)]
    for templates, groups, seed in cases:
        memit.template_groups = groups
        try:
            for n in sizes:
                t0 = time.perf_counter()
                recs = edit_facts(lm.model, lm.tok, test[:max(n, min(len(test), 50))], hp, batch_size=n,
                                  progress=False, seed=seed)
                rows.append({"templates": templates, "seed": seed, "at_once": n, "n_facts": len(recs),
                             "seconds": round(time.perf_counter() - t0, 1),
                             **{k: bootstrap([r.metrics[m] for r in recs]).to_json() for k, m in (
                                 ("efficacy", "efficacy_score"), ("paraphrase", "paraphrase_score"),
                                 ("neighborhood", "neighborhood_score"))}})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            memit.template_groups = real
    return {"model": model_name, "alg": alg, "window": list(hp.layers), "rows": rows}


def main(argv=None) -> int:
    """Run, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--sizes", nargs="*", type=int, default=[1, 10, 100])
    p.add_argument("--alg", default="MEMIT", choices=["MEMIT", "AlphaEdit"], help="whose validated YAML")
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="seeds of EasyEdit's sampled templates")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memit_limits.json")
    args = p.parse_args(argv)
    d = measure(args.model, args.sizes, args.seeds, args.alg)
    write_json(args.out, d, indent=1)
    print(table(d))
    return 0


def table(d: dict) -> str:
    """The Markdown table of the figure block."""
    def t(iv):
        return f"{iv['mean']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

    lines = [f"{d.get('alg', 'MEMIT')}, {d['model']} fact model, layers {d['window']}:", "",
             "| context templates | seed | facts at once | facts | efficacy | paraphrase | neighbourhood |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['templates']} | {r.get('seed', 0)} | {r['at_once']} | {r['n_facts']} | {t(r['efficacy'])} | {t(r['paraphrase'])} | "
              f"{t(r['neighborhood'])} |" for r in d["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
