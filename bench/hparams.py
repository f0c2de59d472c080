"""Time `rome-locate hparams` (validated, default settings) and collect its test-set figures on three fact models.

The shipped GPT-2 and LLaMA fact models, and a third one trained here on a
separate world (`world3`: other names, relations, templates and seed; trained
on demand into the git-ignored local_fact_models/ when missing, ~7 min), each
get the command as a user runs it, on their CounterFact-format facts:

    python -m rome_locate.cli hparams --model M --facts M/counterfact.json -o OUT.yaml --stats-dir STATS

One thread, one run at a time. Prints a table and writes bench/results/hparams.json.
`--write-shipped` writes the GPT-2 and LLaMA YAMLs to hparams/ROME/fact-{gpt2,llama}.yaml (with the
statistics next to the models), which is how those files are regenerated.

    OMP_NUM_THREADS=1 python bench/hparams.py [--models gpt2 llama world3] [--write-shipped]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LIMIT_S = 15 * 60


def _model_dir(name: str) -> Path:
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.fact_models.train import local_model_dir

    if name in ("gpt2", "llama"):
        return fact_model_dir(name)
    family = "gpt2"
    path = ROOT / local_model_dir(name, family)
    if not (path / "model.safetensors").is_file():
        print(f"training the {name} fact model into {path} (one thread, several minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "rome_locate.fact_models.train", "train", family, "--world", name,
                        "--out", str(path)], check=True, cwd=ROOT, env=_env())
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(name: str, write_shipped: bool, extra: list[str]) -> dict:
    """One `hparams` run: wall and CPU seconds, and the test figures from its validation JSON."""
    model = _model_dir(name)
    shipped = write_shipped and name in ("gpt2", "llama")
    if shipped:
        rel = model.relative_to(ROOT)
        out = ROOT / "hparams" / "ROME" / f"fact-{name}.yaml"
        where = ["--model-name", f"./{rel}", "--stats-dir", f"./{rel}/stats"]
    else:
        out = RESULTS / "hparams" / f"{name}.yaml"
        where = ["--stats-dir", str(RESULTS / "hparams" / "stats")]
    cmd = [sys.executable, "-m", "rome_locate.cli", "hparams", "--model", str(model.relative_to(ROOT)
                                                                             if model.is_relative_to(ROOT) else model),
           "--facts", str((model / "counterfact.json").relative_to(ROOT) if model.is_relative_to(ROOT)
                          else model / "counterfact.json"),
           "-o", str(out.relative_to(ROOT)), "--device", "cpu", "--quiet", *where, *extra]
    print("$ " + " ".join(cmd[1:]).replace("-m rome_locate.cli", "python -m rome_locate.cli"), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: hparams failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout, flush=True)
    v = json.loads(out.with_suffix("").with_name(out.stem + ".validation.json").read_text())
    modes = {m["name"].split(" ")[0]: {k: m[k] for k in ("efficacy", "paraphrase", "neighborhood", "score", "layers")}
             for m in v["test"]}
    return {"model": name, "command": " ".join(cmd[1:]), "yaml": str(out.relative_to(ROOT)), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "within_15_min": wall <= LIMIT_S, "chosen": v["chosen"], "n_test": v["n_test"],
            "n_calibration": v["n_calibration"], "trials": v["trials"], "search_trials": v["search_trials"],
            "candidates": v["candidates"], "dataset_layer": v["dataset_layer"], "test": modes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama", "world3"])
    ap.add_argument("--write-shipped", action="store_true",
                    help="write hparams/ROME/fact-{gpt2,llama}.yaml and their statistics next to the models")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more hparams arguments")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    rows = []
    for name in args.models:
        rows.append(run(name, args.write_shipped, args.extra))
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "hparams.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update({r["model"]: r for r in rows})
        path.write_text(json.dumps(old, indent=1) + "\n")
    print(f"{'model':8} {'wall s':>7} {'cpu s':>7} {'layer':>5}  mode       efficacy          paraphrase        "
          f"neighbourhood")
    for r in rows:
        for mode, m in r["test"].items():
            def f(k):
                x = m[k]
                return "n/a" if x["mean"] is None else f"{x['mean']:.2f} [{x['low']:.2f},{x['high']:.2f}]"
            print(f"{r['model']:8} {r['wall_s']:7.0f} {r['cpu_s']:7.0f} {r['chosen']['layer']:5d}  {mode:10} "
                  f"{f('efficacy'):17} {f('paraphrase'):17} {f('neighborhood')}")
    print(f"wrote {RESULTS / 'hparams.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
