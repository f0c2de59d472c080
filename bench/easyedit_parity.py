"""The EasyEdit one-line change against plain EasyEdit at the YAML's layer, on EasyEdit's own post-edit metrics.

For each case, the same model files, tokenizer and requests (test facts of the
YAML's validation record, `test_ids`, never its calibration facts) go through

- plain EasyEdit: `from easyeditor import BaseEditor, ROMEHyperParams`, the YAML
  read by EasyEdit, a preloaded (model, tokenizer) with the tokenizer padding on
  the right (what EasyEdit sets for ROME on the LLaMA paths it loads itself), every
  request at the YAML's layer;
- the one-line change: `from rome_locate.easyedit import BaseEditor, ROMEHyperParams`,
  `ROMEHyperParams.from_hparams(yaml)`, `BaseEditor.from_hparams`, which loads the
  model from the YAML's model_name and edits each request where the layer rule
  (`rome_locate.choose`, the validation record beside the YAML) decides;

and EasyEdit's returned post metrics (rewrite_acc, rephrase_acc, locality) are
averaged over the requests. Cases: the GPT-2 fact model (hparams/ROME/fact-gpt2.yaml);
the LLaMA fact model copied with "padding_side": "left" in its tokenizer_config.json
(hparams/ROME/fact-llama.yaml); the world3 GPT-2 model (trained on demand into
local_fact_models/, ~7 min) with a YAML from `rome-locate hparams` (validated; the
one bench/hparams.py wrote is reused, else it is written into bench/results/easyedit_parity/);
and sequential editing (sequential_edit=True) on the GPT-2 fact model. The
one-line change passes a case when each of its three metrics is at least plain
EasyEdit's minus TOLERANCE. Prints a table, writes bench/results/easyedit_parity.json.

    OMP_NUM_THREADS=1 python bench/easyedit_parity.py [--facts 20] [--sequential-facts 8] [--cases ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = RESULTS / "easyedit_parity"
TOLERANCE = 0.05  # the one-line change may trail plain EasyEdit by this much on each metric, no more
METRICS = ("rewrite_acc", "rephrase_acc", "locality")
CASES = ("gpt2", "llama-left", "world3", "gpt2-sequential")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    vendored = ROOT.parent / "shared" / "vendor" / "EasyEdit"
    if vendored.is_dir():
        env.setdefault("EASYEDIT_PATH", str(vendored))
    return env


def bound_yaml(src: Path, model_dir: Path, dst: Path, **fields) -> Path:
    """`src` with absolute model_name and stats_dir (and `fields`) written to `dst`, its validation record beside."""
    from rome_locate.choose import validation_record_path
    from rome_locate.hparams import bind_model, load_hparams, write_hparams

    h = dataclasses.replace(bind_model(load_hparams(src, easyedit=False), model_dir), **fields)
    dst.parent.mkdir(parents=True, exist_ok=True)
    path = write_hparams(h, dst)
    shutil.copy(validation_record_path(src), validation_record_path(path))
    return path


def record_test_facts(yaml: Path, facts_file: Path, n: int | None = None) -> list:
    """The first `n` (default all) test facts of the YAML's validation record, in the record's order: subjects its
    search never saw. Every benchmark that measures a validated YAML edits these."""
    from rome_locate.choose import validation_record_path
    from rome_locate.facts import load_facts

    record = validation_record_path(yaml)
    if not record.is_file():
        raise FileNotFoundError(f"{yaml}: no validation record {record.name} beside it (its test_ids are needed)")
    ids = [str(i) for i in json.loads(record.read_text(encoding="utf-8"))["test_ids"]][:n]
    by_id = {f.id: f for f in load_facts(facts_file)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{facts_file}: test ids {missing[:5]} of {record} are not in the facts file")
    return [by_id[i] for i in ids]


def record_requests(yaml: Path, facts_file: Path, n: int) -> list[dict]:
    """EasyEdit requests of the first `n` test facts of the YAML's validation record, in the record's order."""
    from rome_locate.easyedit import easyedit_request

    return [easyedit_request(f) for f in record_test_facts(yaml, facts_file, n)]


def plain_easyedit(yaml: Path, model_dir: Path):
    """EasyEdit's own BaseEditor and ROMEHyperParams over a preloaded (model, tokenizer) padding on the right."""
    from rome_locate.easyedit import import_easyedit
    from rome_locate.models import load_model

    import_easyedit()
    from easyeditor import BaseEditor, ROMEHyperParams

    model, tok = load_model(model_dir, device="cpu")
    tok.padding_side = "right"  # EasyEdit's rule for ROME (it applies it to the llama paths it loads itself)
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    hparams = ROMEHyperParams.from_hparams(str(yaml))
    editor = BaseEditor.from_hparams(dataclasses.replace(hparams, model_name=(model, tok)))
    # EasyEdit's evaluation reads model_name as a string ('t5' in model_name.lower()).
    editor.model_name = str(model_dir)
    editor.hparams = dataclasses.replace(hparams, model_name=str(model_dir))
    return editor


def one_line_change(yaml: Path):
    """The user's script after the one-line change: our ROMEHyperParams and BaseEditor, the model from the YAML."""
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams

    return BaseEditor.from_hparams(ROMEHyperParams.from_hparams(str(yaml)))


def post_means(metrics: list[dict]) -> dict[str, float | None]:
    """EasyEdit's post rewrite_acc, rephrase_acc and locality, each the mean over the requests that have it."""
    from rome_locate.easyedit import easyedit_metrics

    rows = [easyedit_metrics(m)["post"] for m in metrics]
    out = {}
    for key in METRICS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def run_case(name: str, yaml: Path, model_dir: Path, requests: list[dict], sequential: bool) -> dict:
    """Both editors on the same requests: EasyEdit's post means, the layers used, and the verdict."""
    from rome_locate.easyedit import import_easyedit

    import_easyedit()
    from easyeditor.models.rome import rome_main

    rome_main.CONTEXT_TEMPLATES_CACHE = None  # the case's own model writes the templates both editors share
    row: dict = {"case": name, "yaml": str(yaml), "model": str(model_dir), "n": len(requests),
                 "sequential": sequential}
    sides = (("easyedit", lambda: plain_easyedit(yaml, model_dir)), ("one-line", lambda: one_line_change(yaml)))
    for side, make in sides:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # EasyEdit prints every optimisation step
            editor = make()
            metrics, _, _ = editor.edit_requests([dict(r) for r in requests], sequential_edit=sequential,
                                                 verbose=False)
        layers = [m.get("layer", editor.hparams.layers[0]) for m in metrics]
        sources = [(m.get("layer_decision") or {}).get("source", "yaml") for m in metrics]
        row[side] = {**post_means(metrics), "layers": layers,
                     "sources": {s: sources.count(s) for s in sorted(set(sources))},
                     "seconds": round(time.perf_counter() - t0, 1)}
        if getattr(editor, "layer_rule", None) is not None:
            row["rule"] = editor.layer_rule.describe()
    row["difference"] = {k: None if None in (row["one-line"][k], row["easyedit"][k])
                         else row["one-line"][k] - row["easyedit"][k] for k in METRICS}
    row["within_tolerance"] = all(d is None or d >= -TOLERANCE - 1e-9 for d in row["difference"].values())
    return row


def _world3() -> tuple[Path, Path]:
    """(model dir, validated YAML) of the world3 GPT-2 model: trained and written on demand."""
    from rome_locate.fact_models.train import local_model_dir

    model = ROOT / local_model_dir("world3", "gpt2")
    if not (model / "model.safetensors").is_file():
        print(f"training the world3 fact model into {model} (one thread, ~7 min)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "rome_locate.fact_models.train", "train", "gpt2", "--world", "world3",
                        "--out", str(model)], check=True, cwd=ROOT, env=_env())
    for yaml in (RESULTS / "hparams" / "world3.yaml", WORK / "world3.yaml"):  # bench/hparams.py's, else ours
        if yaml.is_file() and yaml.with_name("world3.validation.json").is_file():
            return model, yaml
    yaml = WORK / "world3.yaml"
    print(f"writing {yaml} with rome-locate hparams (validated; several minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "rome_locate.cli", "hparams", "--model", str(model), "--facts",
                    str(model / "counterfact.json"), "-o", str(yaml), "--device", "cpu", "--quiet",
                    "--stats-dir", str(WORK / "stats")], check=True, cwd=ROOT, env=_env(), stdout=sys.stderr)
    return model, yaml


def cases(names: list[str], n: int, n_sequential: int, tmp: Path) -> list[dict]:
    """Run the named cases in order."""
    from rome_locate.fact_models import counterfact_path, fact_model_dir

    shipped = ROOT / "hparams" / "ROME"
    rows = []
    for name in names:
        if name in ("gpt2", "gpt2-sequential"):
            model = fact_model_dir("gpt2")
            yaml = bound_yaml(shipped / "fact-gpt2.yaml", model, tmp / name / "fact-gpt2.yaml")
            facts, k = counterfact_path("gpt2"), n_sequential if name == "gpt2-sequential" else n
        elif name == "llama-left":
            model = tmp / name / "llama"  # the folder name the shipped statistics are filed under
            shutil.copytree(fact_model_dir("llama"), model, ignore=shutil.ignore_patterns("stats"))
            config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
            (model / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
            yaml = bound_yaml(shipped / "fact-llama.yaml", fact_model_dir("llama"), tmp / name / "fact-llama.yaml",
                              model_name=str(model))
            facts, k = counterfact_path("llama"), n
        elif name == "world3":
            model, yaml = _world3()
            facts, k = model / "counterfact.json", n
        else:
            raise ValueError(f"unknown case {name!r}; known: {CASES}")
        print(f"[{name}] {k} requests", file=sys.stderr, flush=True)
        rows.append(run_case(name, yaml, model, record_requests(yaml, facts, k), name.endswith("sequential")))
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table: both editors per case and the difference."""
    def f(v):
        return "–" if v is None else f"{v:.2f}"

    lines = ["| case | editor | layers used (requests) | rewrite_acc | rephrase_acc | locality |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for side, label in (("easyedit", "plain EasyEdit (YAML's layer)"),
                            ("one-line", "one-line change (layer rule)")):
            s = r[side]
            used = ", ".join(f"{l}: {s['layers'].count(l)}" for l in sorted(set(s["layers"])))
            if side == "one-line":  # the rule's sources: traced, fallback (to the YAML's layer), given
                used += " (" + ", ".join(f"{k} {v}" for k, v in s["sources"].items()) + ")"
            lines.append(f"| {r['case']} ({r['n']}{', sequential' if r['sequential'] else ''}) | {label} | {used} | "
                         + " | ".join(f(s[k]) for k in METRICS) + " |")
        d = r["difference"]
        lines.append(f"| {r['case']} | difference {'(ok)' if r['within_tolerance'] else '(WORSE)'} | | "
                     + " | ".join("–" if d[k] is None else f"{d[k]:+.2f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print the table, write the JSON; exit 1 when a case trails plain EasyEdit."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=20, help="test facts per case (default 20)")
    ap.add_argument("--sequential-facts", type=int, default=8, help="test facts of the sequential case (default 8)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--out", default=str(RESULTS / "easyedit_parity.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("EASYEDIT_PATH", _env().get("EASYEDIT_PATH", ""))
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="easyedit-parity-") as tmp, contextlib.chdir(tmp):  # EasyEdit's logs/
        rows = cases(args.cases, args.facts, args.sequential_facts, Path(tmp))
    out = {"torch": torch.__version__, "threads": 1, "tolerance": TOLERANCE, "wall_s": round(time.perf_counter() - t0),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"wrote {args.out}")
    return 0 if all(r["within_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
