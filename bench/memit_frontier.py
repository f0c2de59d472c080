"""How far MEMIT can go on a fact model: every window x λ, N test facts written at once, and the key space it writes in.

For each window of 1, 2, 3 and 5 consecutive editable layers (any position, not only
around the traced layer) and each λ (`mom2_update_weight`), the validated MEMIT YAML's
other settings (z optimisation, templates: EasyEdit's) write the first N test facts of
its validation record at once (`batches.measure_batch`, the search's own trial edit;
each fact's z computed once per z layer). This is an upper bound, not a choice: the
points are scored on the test facts themselves, so the best of them is what any
search over these windows and λ could at most reach on those facts.

Beside it, the key space each layer's edit is written in: the eigenvalues of the
mom2 statistics C (E[k k^T] of the rewrite module's input, the YAML's statistics):
its effective rank (Σλ)²/Σλ² and the number of eigen-directions that hold 99% of
the keys' energy, against the N facts the edit must keep apart.

Prints a table, writes bench/results/memit_frontier.json;
`python bench/figures.py memit-frontier --from-results` formats the README block.

    OMP_NUM_THREADS=1 python bench/memit_frontier.py [--models gpt2 llama] [--at-once 100]
        [--lambdas 1 10 100 1000 15000] [--sizes 1 2 3 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rome_locate.files import write_json  # noqa: E402
# bench/ is on sys.path when this script runs: the fact models and their validated YAMLs are mass_edit's.
from mass_edit import MODELS  # noqa: E402
OUT = ROOT / "bench" / "results" / "memit_frontier.json"
# The figure the issue asks for: 100 test facts at once.
TARGETS = {"efficacy": 0.90, "paraphrase": 0.80, "neighborhood": 0.85}
METRICS = (("efficacy", "efficacy_score"), ("paraphrase", "paraphrase_score"), ("neighborhood", "neighborhood_score"))


def windows(n_layers: int, sizes: list[int]) -> list[tuple[int, ...]]:
    """Every run of `sizes` consecutive layers that leaves the last layer alone, ordered by its last layer."""
    editable = n_layers - 1
    out = [tuple(range(s, s + size)) for size in sizes for s in range(editable - size + 1)]
    return sorted(out, key=lambda w: (w[-1], len(w)))


def key_space(model, hparams, layers: list[int]) -> dict[str, dict[str, float]]:
    """Per layer: the statistics' effective rank and the eigen-directions holding 99% of the keys' energy."""
    import torch

    from rome_locate.stats import mom2_for

    out = {}
    for layer in layers:
        eig = torch.linalg.eigvalsh(mom2_for(model, hparams, layer).double()).clamp(min=0).flip(0)
        share = eig.cumsum(0) / eig.sum()
        out[str(layer)] = {"dim": int(eig.numel()), "effective_rank": round(float(eig.sum() ** 2 / (eig ** 2).sum()), 1),
                           "dims_99": int((share < 0.99).sum()) + 1}
    return out


def measure(name: str, at_once: int, lambdas: list[float], sizes: list[int]) -> dict:
    """Every (window, λ) point of one model, and its key space."""
    import torch

    # bench/ is on sys.path when this script runs: the test facts as every benchmark of a validated YAML reads them.
    from easyedit_parity import record_test_facts
    from rome_locate.arch import count_layers
    from rome_locate.batches import measure_batch
    from rome_locate.editors import BuiltinEditor
    from rome_locate.hparams import bind_model
    from rome_locate.intervals import bootstrap
    from rome_locate.memit_hparams import load_memit_hparams, with_window
    from rome_locate.models import load

    torch.set_num_threads(1)
    folder, _, yaml_path = (ROOT / p for p in MODELS[name])
    facts = record_test_facts(yaml_path, folder / "counterfact.json", at_once)
    lm = load(str(folder))
    base = bind_model(load_memit_hparams(yaml_path), folder)
    n_layers = count_layers(lm.model, base.layer_module_tmp)
    editor, before, points = BuiltinEditor(reuse_targets=True), {}, []
    t0 = time.perf_counter()
    for window in windows(n_layers, sizes):
        for lam in lambdas:
            hp = with_window(replace(base, mom2_update_weight=float(lam)), window, n_layers)
            recs = measure_batch(lm.model, lm.tok, facts, hp, editor, False, before)
            points.append({"window": list(window), "lambda": lam, **{
                k: bootstrap([r.metrics[m] for r in recs]).to_json() for k, m in METRICS}})
            print(json.dumps({"model": name, **points[-1]}), flush=True)
    return {"model": name, "n_layers": n_layers, "at_once": len(facts), "validated_window": list(base.layers),
            "settings": {k: getattr(base, k) for k in ("clamp_norm_factor", "v_lr", "v_num_grad_steps",
                                                      "v_weight_decay", "kl_factor")},
            "key_space": key_space(lm.model, base, list(range(n_layers - 1))), "points": points,
            "wall_s": round(time.perf_counter() - t0), "torch": torch.__version__}


def frontier(points: list[dict]) -> dict[str, dict | None]:
    """The points a reader asks for: best efficacy with neighbourhood >= its target, best neighbourhood with
    efficacy >= its target, and the best harmonic mean of the three."""
    def m(p, k):
        return p[k]["mean"]

    def best(rows, key):
        return max(rows, key=key, default=None)

    def hmean(p):
        return 3 / sum(1 / max(m(p, k), 1e-9) for k in TARGETS)

    return {
        "best efficacy with neighbourhood >= 0.85": best(
            [p for p in points if m(p, "neighborhood") >= TARGETS["neighborhood"]], lambda p: m(p, "efficacy")),
        "best neighbourhood with efficacy >= 0.90": best(
            [p for p in points if m(p, "efficacy") >= TARGETS["efficacy"]], lambda p: m(p, "neighborhood")),
        "best of all three (harmonic mean)": best(points, hmean),
    }


def table(results: list[dict]) -> str:
    """The Markdown tables of the figure block: the frontier per model, then the key space."""
    def t(iv):
        return f"{iv['mean']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

    lines = ["| model | facts at once | points (windows x λ) | which point | window | λ | efficacy | paraphrase | "
             "neighbourhood |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for what, p in frontier(r["points"]).items():
            row = f"| none of the {len(r['points'])} | – | – | – | – |" if p is None else \
                f"| {p['window']} | {p['lambda']:g} | {t(p['efficacy'])} | {t(p['paraphrase'])} | " \
                f"{t(p['neighborhood'])} |"
            lines.append(f"| {r['model']} ({r['n_layers']} layers) | {r['at_once']} | {len(r['points'])} | {what} "
                         + row)
    lines += ["", "| model | layer | key dimension | effective rank of C | directions holding 99% of the key energy |",
              "|---|---|---|---|---|"]
    for r in results:
        lines += [f"| {r['model']} | {layer} | {k['dim']} | {k['effective_rank']:g} | {k['dims_99']} |"
                  for layer, k in r["key_space"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run, print the table, merge the models into the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["gpt2", "llama"], choices=list(MODELS))
    p.add_argument("--at-once", type=int, default=100)
    p.add_argument("--lambdas", nargs="*", type=float, default=[1.0, 10.0, 100.0, 1000.0, 15000.0])
    p.add_argument("--sizes", nargs="*", type=int, default=[1, 2, 3, 5])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    old = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    new = [measure(m, args.at_once, args.lambdas, args.sizes) for m in args.models]
    keep = [r for r in old if (r["model"], r["at_once"]) not in {(n["model"], n["at_once"]) for n in new}]
    results = keep + new
    write_json(args.out, {"results": results}, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
