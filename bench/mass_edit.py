"""Mass and sequential editing on the fact models: ROME, R-ROME, MEMIT at the validated window, MEMIT at EasyEdit's
default window, AlphaEdit; 1, 10 and 100 facts written at once, and 100 edited one after another.

Facts: the test facts of each model's validated MEMIT YAML (`test_ids` of its validation record: subjects the
window search never saw). Every row goes through the pipeline (`rome_locate.pipeline.edit_facts`, the path of
`rome-locate edit --batch-size N [--sequential]`):

- ROME: the model's validated ROME YAML (a batch is written one fact after another, each at that layer);
- R-ROME: that YAML as EasyEdit's R_ROMEHyperParams, through `--editor easyedit` (EasyEdit's R-ROME);
- MEMIT: the validated MEMIT YAML (`rome-locate hparams --alg MEMIT`, `bench/memit_hparams.sh`);
- MEMIT (EasyEdit's batch_edit): that YAML through `--editor easyedit` (one `BaseEditor.batch_edit` a batch):
  the check that EasyEdit reproduces the built-in editor's figures;
- MEMIT, EasyEdit's window: EasyEdit's shipped LLaMA/Qwen/Mistral window 4-8 clipped to the model, with that
  YAML's settings (`rome_locate.window_records.EASYEDIT_SETTINGS`), the same statistics;
- AlphaEdit: the validated MEMIT window and settings, built in, EasyEdit's AlphaEdit defaults (null space below
  2e-2, L2 10);
- AlphaEdit (validated): the model's validated AlphaEdit YAML (`rome-locate hparams --alg AlphaEdit`), built in;
- AlphaEdit (validated, EasyEdit's batch_edit): that YAML through `--editor easyedit`, at once only.

Scenarios: `at-once N` edits the first `--facts-for N` test facts N at a time (each batch restored before the
next); `sequential` keeps 100 edits of one fact each and reports efficacy after 1, 10 and 100 edits (means over
every edit so far, on the model at that moment), retention (the earlier edits' efficacy on the final model) and
neighbourhood after the last. 95% bootstrap intervals over facts. Prints a table, writes
bench/results/mass_edit.json; `python bench/figures.py mass-edit --from-results` formats the README block.

    OMP_NUM_THREADS=1 python bench/mass_edit.py [--models gpt2 llama world3-gpt2 default-gpt2-16l] [--methods ...]
"""

from __future__ import annotations

import argparse
import dataclasses
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
OUT = ROOT / "bench" / "results" / "mass_edit.json"

# model -> (folder, validated ROME YAML, validated MEMIT YAML)
MODELS = {
    "gpt2": ("rome_locate/fact_models/gpt2", "hparams/ROME/fact-gpt2.yaml", "hparams/MEMIT/fact-gpt2.yaml"),
    "llama": ("rome_locate/fact_models/llama", "hparams/ROME/fact-llama.yaml", "hparams/MEMIT/fact-llama.yaml"),
    "world3-gpt2": ("local_fact_models/world3-gpt2", "bench/results/easyedit_parity/world3.yaml",
                    "bench/results/memit/world3-gpt2.yaml"),
    "default-gpt2-16l": ("local_fact_models/default-gpt2-16l", "bench/results/memit/default-gpt2-16l-rome.yaml",
                         "bench/results/memit/default-gpt2-16l.yaml"),
}
METHODS = ("ROME", "R-ROME", "MEMIT", "MEMIT (EasyEdit's batch_edit)", "MEMIT (EasyEdit window)", "AlphaEdit",
           "AlphaEdit (validated)", "AlphaEdit (validated, EasyEdit's batch_edit)")
# EasyEdit's batch_edit of a validated YAML: the parity check of the built-in editor, at once only.
AT_ONCE_ONLY = ("MEMIT (EasyEdit's batch_edit)", "AlphaEdit (validated, EasyEdit's batch_edit)")
FACTS_FOR = {1: 20, 10: 50, 100: 100}


def _alphaedit_yaml(memit_yaml: Path) -> Path:
    """The validated AlphaEdit YAML beside a validated MEMIT one (`bench/memit_hparams.sh AlphaEdit MODEL`)."""
    if memit_yaml.parent.name == "MEMIT":
        return memit_yaml.parent.parent / "AlphaEdit" / memit_yaml.name
    return memit_yaml.with_name(memit_yaml.stem + "-alphaedit.yaml")


def _hparams(method: str, model, rome_yaml: Path, memit_yaml: Path, folder: Path):
    """(hyperparameters, editor name) of a method on one model."""
    from rome_locate.hparams import bind_model, load_hparams
    from rome_locate.memit_hparams import load_memit_hparams, memit_to_dict, with_window
    from rome_locate.validate_window import easyedit_window
    from rome_locate.window_records import EASYEDIT_SETTINGS

    if method == "ROME":
        return bind_model(load_hparams(rome_yaml, easyedit=False), folder), "builtin"
    if method == "R-ROME":
        from rome_locate.easyedit import import_easyedit

        import_easyedit()
        from easyeditor import R_ROMEHyperParams

        rome = bind_model(load_hparams(rome_yaml, easyedit=False), folder)
        return R_ROMEHyperParams(**{**dataclasses.asdict(rome), "alg_name": "R-ROME"}), "easyedit"
    if method.startswith("AlphaEdit (validated"):
        return bind_model(load_memit_hparams(_alphaedit_yaml(memit_yaml)), folder), \
            "easyedit" if "batch_edit" in method else "builtin"
    memit = bind_model(load_memit_hparams(memit_yaml), folder)
    if method == "MEMIT":
        return memit, "builtin"
    if method == "MEMIT (EasyEdit's batch_edit)":
        return memit, "easyedit"
    if method == "MEMIT (EasyEdit window)":
        from rome_locate.arch import arch_for

        n = arch_for(model).n_layers
        return with_window(dataclasses.replace(memit, **EASYEDIT_SETTINGS), easyedit_window(n), n), "builtin"
    if method == "AlphaEdit":
        from rome_locate.memit_hparams import AlphaEditHParams

        return AlphaEditHParams(**{**memit_to_dict(memit), "alg_name": "AlphaEdit"}), "builtin"
    raise ValueError(method)


def _iv(values) -> dict:
    from rome_locate.intervals import bootstrap

    return bootstrap([v for v in values if v is not None]).to_json()


def _at_once(model, tok, facts, hp, editor, n: int) -> dict:
    from rome_locate.pipeline import edit_facts

    recs = edit_facts(model, tok, facts, hp, batch_size=n, editor=editor, progress=False)
    m = lambda k: _iv(r.metrics.get(k) for r in recs)  # noqa: E731
    return {"n_facts": len(recs), "efficacy": m("efficacy_score"), "paraphrase": m("paraphrase_score"),
            "neighborhood": m("neighborhood_score")}


def _sequential(model, tok, facts, hp, editor) -> dict:
    from rome_locate.pipeline import edit_facts

    recs = edit_facts(model, tok, facts, hp, sequential=True, batch_size=1, editor=editor, progress=False)
    marks = {int(r.after_n_edits["n_edits"]): r.after_n_edits for r in recs if r.after_n_edits}
    final = [r.final_metrics for r in recs]
    return {"n_facts": len(recs),
            "efficacy_after": {str(k): marks[k].get("efficacy_score") for k in (1, 10, len(recs)) if k in marks},
            "retention": _iv(f.get("efficacy_score") for f in final[:-1]),
            "neighborhood_last": _iv(f.get("neighborhood_score") for f in final),
            "paraphrase_last": _iv(f.get("paraphrase_score") for f in final)}


def run_model(name: str, methods, at_once, sequential: int) -> dict:
    """Every method and scenario on one model."""
    import torch

    # bench/ is on sys.path when this script runs: the test facts as every benchmark of a validated YAML reads them.
    from easyedit_parity import record_test_facts
    from rome_locate.models import load

    folder, rome_yaml, memit_yaml = (ROOT / p for p in MODELS[name])
    test = record_test_facts(memit_yaml, folder / "counterfact.json")
    lm = load(str(folder))
    out = {"model": name, "n_layers": lm.arch.n_layers, "test_facts": len(test), "memit_window": None, "rows": []}
    for method in methods:
        hp, editor = _hparams(method, lm.model, rome_yaml, memit_yaml, folder)
        t0 = time.perf_counter()
        row = {"method": method, "layers": list(hp.layers), "editor": editor}
        for n in at_once:
            row[f"at_once_{n}"] = _at_once(lm.model, lm.tok, test[:FACTS_FOR.get(n, n)], hp, editor, n)
        if sequential and method not in AT_ONCE_ONLY:
            row["sequential"] = _sequential(lm.model, lm.tok, test[:sequential], hp, editor)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["torch"] = torch.__version__
    return out


def table(results: list[dict]) -> str:
    """The Markdown table of the figure block."""
    def t(iv):
        return "–" if not iv or iv.get("mean") is None else f"{iv['mean']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

    lines = ["| model | method | layers | 1 at once: eff | 10 at once: eff / para / nbhd | 100 at once: eff / para / "
             "nbhd | sequential 100: eff after 1 / 10 / 100 | retention | nbhd after last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            a1, a10, a100, s = (r.get("at_once_1", {}), r.get("at_once_10", {}), r.get("at_once_100", {}),
                                r.get("sequential", {}))
            after = s.get("efficacy_after", {})
            seq = " / ".join("–" if after.get(k) is None else f"{after[k]:.2f}" for k in sorted(after, key=int))
            lines.append(
                f"| {res['model']} ({res['n_layers']} layers) | {r['method']} | {r['layers']} | {t(a1.get('efficacy'))}"
                f" | {t(a10.get('efficacy'))} / {t(a10.get('paraphrase'))} / {t(a10.get('neighborhood'))}"
                f" | {t(a100.get('efficacy'))} / {t(a100.get('paraphrase'))} / {t(a100.get('neighborhood'))}"
                f" | {seq or '–'} | {t(s.get('retention'))} | {t(s.get('neighborhood_last'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the benchmark, print the table, write the JSON (merged with earlier models' rows)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--at-once", nargs="*", type=int, default=[1, 10, 100])
    p.add_argument("--sequential", type=int, default=100, help="edits kept one after another (0: none)")
    p.add_argument("--out", type=Path, default=OUT, help="the JSON (default bench/results/mass_edit.json)")
    args = p.parse_args(argv)
    out = args.out
    import torch

    torch.set_num_threads(1)
    old = json.loads(out.read_text()) if out.is_file() else {"results": []}
    results = {r["model"]: r for r in old["results"]}
    for name in args.models:
        t0 = time.perf_counter()
        results[name] = run_model(name, args.methods, args.at_once, args.sequential)
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(out, {"results": [results[m] for m in MODELS if m in results], "threads": 1}, indent=1)
    print(table([results[m] for m in MODELS if m in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
