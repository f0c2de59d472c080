"""Regenerate the figures quoted in the docs: `python bench/figures.py [NAME ...]` recomputes and rewrites them.

Every table or number the README, a fact model's NOTES.md or integration/README.md
quotes sits between two markers,

    <!-- figure: NAME -->
    ...
    <!-- /figure -->

and the text beside it names `python bench/figures.py NAME`. Nothing between the
markers is written by hand: this script recomputes it and replaces the block in
every doc that holds it. `--list` names the figures; `--check` recomputes and
fails (exit 1) when a doc differs from what the code gives now.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "integration/README.md", "rome_locate/fact_models/gpt2/NOTES.md",
        "rome_locate/fact_models/llama/NOTES.md")
_BLOCK = re.compile(r"(<!-- figure: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /figure -->)", re.DOTALL)

FIGURES: dict[str, Callable[[], str]] = {}
_RAN: set[str] = set()
FROM_RESULTS = False  # --from-results: format the JSON a benchmark last wrote instead of rerunning it
RESULTS = ROOT / "bench" / "results"


def figure(name: str):
    """Register a function that returns the Markdown of the figure `name`."""
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        FIGURES[name] = fn
        return fn
    return register


def blocks(text: str) -> list[str]:
    """Names of the figure blocks in a doc, in order."""
    return [m.group("name") for m in _BLOCK.finditer(text)]


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block `name` holding `body` (which ends with a newline)."""
    body = body if body.endswith("\n") else body + "\n"
    return _BLOCK.sub(lambda m: m.group(1) + body + m.group(4) if m.group("name") == name else m.group(0), text)


def _setup_torch() -> None:
    import torch

    torch.set_num_threads(1)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows]) + "\n"


def bench_results(script: str, name: str, *args: str, python: str | None = None) -> dict:
    """The JSON of `python bench/SCRIPT --out bench/results/NAME.json ARGS`: rerun, or read (--from-results)."""
    import json
    import subprocess

    out = RESULTS / f"{name}.json"
    if not ((FROM_RESULTS or name in _RAN) and out.is_file()):
        _RAN.add(name)  # one run serves every figure made from it in this process
        subprocess.run([python or sys.executable, str(ROOT / "bench" / script), "--out", str(out), *args],
                       check=True, cwd=ROOT)
    return json.loads(out.read_text(encoding="utf-8"))


def _hours(h: float) -> str:
    """A duration given in hours, in the unit a reader wants (s, min or h)."""
    s = h * 3600
    return f"{s:.2g} s" if s < 60 else f"{s / 60:.2g} min" if s < 3600 else f"{h:.3g} h"


# ---- benchmarks (README) -------------------------------------------------------------

@figure("throughput-measured")
def _throughput_measured() -> str:
    d = bench_results("throughput.py", "throughput")
    rows = [[r["model"], r["what"], r["layers"], f"{r['tokens']:.1f}", f"{r['s_per_fact']:.3g}",
             f"{r['gflop_per_fact']:.3g}", f"{r['achieved_gflops']:.3g}"] for r in d["measured"]]
    return (f"torch {d['torch']}, {d['threads']} thread, {d['note']}.\n\n"
            + _table(["model", "what", "L", "T", "s/fact", "GFLOP/fact", "GFLOP/s"], rows))


@figure("throughput-projection")
def _throughput_projection() -> str:
    d = bench_results("throughput.py", "throughput")
    a = d["assumptions"]
    counts = sorted({int(k[len("known1000_trace_h_"):-3]) for r in d["projection"] for k in r
                     if k.startswith("known1000_trace_h_")})
    rows = []
    for r in d["projection"]:
        rows.append([r["model"], r["gpu"], r["gpus_per_replica"], f"{r['tflop_trace']:.3g} / {r['tflop_edit']:.3g}",
                     f"{r['s_trace']:.2g} / {r['s_edit']:.2g}",
                     " / ".join(_hours(r[f"known1000_trace_h_{n}gpu"]) if n >= r["gpus_per_replica"] else "–"
                                for n in counts),
                     " / ".join(_hours(r[f"counterfact_edit_h_{n}gpu"]) if n >= r["gpus_per_replica"] else "–"
                                for n in counts)])
    n = " / ".join(str(c) for c in counts)
    return (f"Assumed: {a['utilisation']:.0%} of the dense bf16 peak, prompts of {a['prompt_tokens']} tokens, "
            f"S = {a['samples']}, w = {a['window']}, backward = {a['backward_cost']}, {a['device_map']}.\n\n"
            + _table(["model", "GPU", "GPUs per replica", "TFLOP/fact trace / edit", "s/fact trace / edit",
                      f"known_1000 tracing ({a['known_1000']:,} facts) on {n} GPUs",
                      f"CounterFact edits ({a['counterfact']:,}) on {n} GPUs"], rows))


# The peers (nnsight, TransformerLens, pyvene) live in their own environment (the `bench` extra, installed next
# to torch 2.13 with a constraints file); its interpreter is $ROME_LOCATE_BENCH_PYTHON.
PEERS = ("nnsight", "nnsight-batched", "transformer_lens", "pyvene")
PEER_RUNS = {  # results name -> bench/peers.py arguments
    "peers-fact": ("--models", "fact-gpt2,fact-llama", "--modes", "row,full", "--facts", "24"),
    "peers-medium-row": ("--models", "medium", "--modes", "row", "--facts", "3"),
    "peers-medium-full": ("--models", "medium", "--modes", "full", "--facts", "2"),
}
_MODEL_NAMES = {"fact-gpt2": "GPT-2 fact model (L8 d64)", "fact-llama": "LLaMA fact model (L8 d64)",
                "medium": "random GPT-2-medium shape (L24 d1024)"}


def _peer_rows() -> list[tuple[str, dict]]:
    python = os.environ.get("ROME_LOCATE_BENCH_PYTHON")
    return [(name, r) for name, args in PEER_RUNS.items()
            for r in bench_results("peers.py", name, *args, python=python)["rows"]]


@figure("peers")
def _peers() -> str:
    rows = []
    for name, r in _peer_rows():
        t = r["median_s"]
        cells = [f"{t[p]:.3g}" if p in t else "–" for p in PEERS]
        rows.append([_MODEL_NAMES.get(r["model"], r["model"]), f"{r['mode']} (T={r['tokens']:.1f}, {r['facts']} facts)",
                     name, f"{t['rome-locate']:.3g}", f"{t['rome-locate batched']:.3g}", *cells,
                     f"{r['speedup_vs_fastest_peer']:.2f}x / {r['batched_speedup_vs_fastest_peer']:.2f}x",
                     "yes" if r["numbers_equal"] else "NO"])
    return _table(["model", "mode", "run (bench/results/)", "rome-locate, one fact per call",
                   "rome-locate, facts batched", *PEERS, "vs fastest peer: per call / batched",
                   "numbers equal (1e-4)"], rows)


@figure("peers-atp")
def _peers_atp() -> str:
    rows = []
    for _, r in _peer_rows():
        if "atp_speedup_vs_exact_full" not in r:
            continue
        t = r["median_s"]
        rows.append([_MODEL_NAMES.get(r["model"], r["model"]),
                     f"{t['rome-locate atp']:.3g} / {t['rome-locate atp batched']:.3g}",
                     f"{r['atp_speedup_vs_exact_full']:.1f}x / {r['atp_batched_speedup_vs_exact_full']:.1f}x",
                     f"{r['atp_spearman_median']:.2f}", f"{r['atp_top1_layer_agreement']:.0%}",
                     f"{t['rome-locate atp+verify 3']:.3g}, {r['atp_verified_speedup_vs_exact_full']:.1f}x, "
                     f"{r['atp_verified_top1_layer_agreement']:.0%}"])
    return _table(["model", "atp s/fact: per call / batched", "faster than the exact full table: per call / "
                   "batched", "Spearman with the exact table (median)", "top-1 layer agrees",
                   "atp + top 3 of the row re-checked (per call): s/fact, speed-up, top-1 agrees"], rows)


@figure("demo")
def _demo() -> str:
    import json
    import subprocess
    import tempfile
    import time

    out = Path(tempfile.mkdtemp(prefix="figures-demo-")) / "demo"
    env = {**_env(), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rome_locate", "demo", "--out", str(out), "--no-progress"], check=True,
                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    d = json.loads((out / "results.json").read_text(encoding="utf-8"))
    s = d["summary"]
    return (f"{s['n_facts']} facts, sweep on, one thread: {wall:.0f} s wall on the machine that ran "
            f"`python bench/figures.py demo`; efficacy {s['means'].get('efficacy_score', float('nan')):.2f}, "
            f"neighbourhood {s['means'].get('neighborhood_score', float('nan')):.2f}, generation efficacy "
            f"{s['means'].get('gen_efficacy', float('nan')):.2f}, generation paraphrase "
            f"{s['means'].get('gen_paraphrase', float('nan')):.2f}, portability "
            f"{s['means'].get('portability', float('nan')):.2f}.\n")


# ---- the EasyEdit hand-off (integration/README.md) ----------------------------------

EDIT_FACTS = 20  # CounterFact cases of the GPT-2 fact model edited for the integration tables


def _rate(p: float | None, interval: list[float] | None) -> str:
    """A rate with the 95% bootstrap interval the package's summary gives it."""
    if p is None:
        return "–"
    return f"{p:.0%}" + (f" [{interval[0]:.0%}–{interval[1]:.0%}]" if interval else "")


def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _env() -> dict:
    env = dict(os.environ)
    vendored = ROOT.parent / "shared" / "vendor" / "EasyEdit"
    env.setdefault("EASYEDIT_PATH", str(vendored))
    return env


def _edit_run(*flags: str) -> dict:
    """results.json of `rome-locate edit` on the GPT-2 fact model's first EDIT_FACTS CounterFact cases."""
    import json
    import subprocess
    import tempfile

    model = ROOT / "rome_locate" / "fact_models" / "gpt2"
    out = Path(tempfile.mkdtemp(prefix="figures-edit-")) / "run"
    subprocess.run([sys.executable, "-m", "rome_locate", "edit", "--model", str(model), "--device", "cpu",
                    "--facts", str(model / "counterfact.json"), "--hparams", str(ROOT / "hparams/ROME/fact-gpt2.yaml"),
                    "--limit", str(EDIT_FACTS), "--quiet", "--out", str(out), *flags],
                   check=True, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


@figure("edit-gpt2")
def _edit_gpt2() -> str:
    rows = []
    for editor, layers in (("builtin", "fixed"), ("easyedit", "fixed"), ("easyedit", "traced"),
                           ("builtin", "validated")):
        d = _edit_run("--editor", editor, "--layers", layers)
        s = d["summary"]
        ee = (s.get("editor_metrics") or {}).get("post") or {}
        rows.append([editor, f"{layers} ({', '.join(map(str, s['layers']))})",
                     _rate(s["success_rate"], s.get("success_rate_interval")),
                     _f(s["post_rewrite_acc"]), _f(s["post_rephrase_acc"]), _f(s["post_locality"]),
                     " / ".join(_f(ee.get(k)) for k in ("rewrite_acc", "rephrase_acc", "locality")) if ee else "–"])
    return _table(["editor", "layers (used)", "success [95% CI]", "rewrite_acc", "rephrase_acc", "locality",
                   "EasyEdit's own rewrite / rephrase / locality"], rows)


@figure("edit-gpt2-sequential")
def _edit_gpt2_sequential() -> str:
    rows = []
    for editor, layers in (("builtin", "fixed"), ("easyedit", "traced")):
        seq = _edit_run("--editor", editor, "--layers", layers, "--sequential")["summary"]["sequential"]
        earlier = seq.get("retention_of") or 0
        retention = (f"{round(seq['retention'] * earlier)}/{earlier} = "
                     f"{_rate(seq['retention'], seq.get('retention_interval'))}"
                     if earlier and seq.get("retention") is not None else "–")
        after = seq.get("efficacy_after") or {}
        final = seq.get("final") or {}
        rows.append([editor, layers, retention,
                     " / ".join(_f(final.get(k)) for k in ("success", "rephrase_acc", "locality")),
                     ", ".join(f"{k}: {v:.0%}" for k, v in after.items())])
    return _table(["editor", "layers", "retention after the last edit", "success / rephrase_acc / locality after "
                   "the last edit", "efficacy after n edits"], rows)


@figure("integration-config")
def _integration_config() -> str:
    import json
    import subprocess
    import tempfile

    import yaml

    config = yaml.safe_load((ROOT / "integration" / "config.yaml").read_text(encoding="utf-8"))
    tmp = Path(tempfile.mkdtemp(prefix="figures-integration-"))
    for key in ("model", "facts", "base_hparams"):  # the copy lives elsewhere: resolve its relative paths
        if config.get(key):
            config[key] = str((ROOT / "integration" / config[key]).resolve())
    config["out"] = str(tmp / "out")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "integration" / "pipeline.py"), "--config", str(tmp / "config.yaml")],
                   check=True, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
    d = json.loads(next((tmp / "out").glob("*/results.json")).read_text(encoding="utf-8"))
    s = d["summary"]
    ee = (s.get("editor_metrics") or {}).get("post") or {}
    return (f"`layers: {config['layers']}`, editor `{config['editor']}`, {s['n_facts']} CounterFact cases: "
            f"edited at layer(s) {s['layers']}; success {_rate(s['success_rate'], s.get('success_rate_interval'))}, rewrite_acc "
            f"{_f(s['post_rewrite_acc'])}, rephrase_acc {_f(s['post_rephrase_acc'])}, locality "
            f"{_f(s['post_locality'])}" + (f"; EasyEdit's own post metrics rewrite_acc {_f(ee.get('rewrite_acc'))}, "
                                            f"rephrase_acc {_f(ee.get('rephrase_acc'))}, locality "
                                            f"{_f(ee.get('locality'))}" if ee else "") + ".\n")


@figure("easyedit-parity")
def _easyedit_parity() -> str:
    # bench/ is on sys.path when this script runs: the benchmark's own table formats its JSON.
    from easyedit_parity import table

    d = bench_results("easyedit_parity.py", "easyedit_parity")
    n = {r["case"]: r["n"] for r in d["rows"]}
    return (f"torch {d['torch']}, {d['threads']} thread, {d['wall_s']} s wall for all cases; requests: the first "
            f"{max(n.values())} test facts of each YAML's validation record ({n.get('gpt2-sequential', '–')} "
            f"kept one after another in gpt2-sequential); tolerance {d['tolerance']}.\n\n" + table(d["rows"]))


def _mass_edit_block(name: str, *args: str, what: str) -> str:
    # bench/ is on sys.path when this script runs: the benchmark's own table formats its JSON.
    from mass_edit import table

    d = bench_results("mass_edit.py", name, *args)
    walls = ", ".join(f"{r['model']} {r.get('wall_s', 0) / 60:.0f} min" for r in d["results"])
    return f"torch {d['results'][0].get('torch', '?')}, one thread; wall: {walls}{what}\n\n" + table(d["results"])


@figure("mass-edit")
def _mass_edit() -> str:
    return _mass_edit_block("mass_edit", what=". Efficacy, paraphrase and neighbourhood are CounterFact's success "
                            "rates (P(new) > P(true)); `at once` edits the first 20 / 50 / 100 test facts 1 / 10 / 100 "
                            "at a time; sequential keeps 100 single-fact edits.")


@figure("alphaedit-mass-edit")
def _alphaedit_mass_edit() -> str:
    return _mass_edit_block("mass_edit_alphaedit", "--models", "gpt2", "--methods", "AlphaEdit (validated)",
                            "AlphaEdit (validated, EasyEdit's batch_edit)", what="; the columns as in the table above.")


@figure("memit-limits")
def _memit_limits() -> str:
    from memit_limits import table

    return table(bench_results("memit_limits.py", "memit_limits"))


@figure("template-seeds")
def _template_seeds() -> str:
    from memit_limits import table

    args = ("--model", "gpt2", "--sizes", "100", "--seeds", "0", "1", "2")
    return "\n".join(table(bench_results("memit_limits.py", name, *extra, *args)) for name, extra in (
        ("memit_limits_seeds", ()), ("memit_limits_seeds_alphaedit", ("--alg", "AlphaEdit"))))


@figure("memit-frontier")
def _memit_frontier() -> str:
    from memit_frontier import table

    d = bench_results("memit_frontier.py", "memit_frontier")
    walls = ", ".join(f"{r['model']} {r['wall_s'] / 60:.0f} min" for r in d["results"])
    return (f"torch {d['results'][0]['torch']}, one thread; wall: {walls}. Every window of 1, 2, 3 and 5 layers "
            f"(never the last) x λ, the validated YAML's other settings, the first test facts of its record written "
            f"at once; scored on those test facts (an upper bound on any choice, not a choice); 95% bootstrap "
            f"intervals.\n\n" + table(d["results"]))


def _window_records(paths: list[Path]) -> str:
    """The test figures of window-search validation records, one row per batch figure."""
    import json

    def t(iv):
        return "–" if iv["mean"] is None else f"{iv['mean']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

    lines = ["| model (layers) | chosen window and settings | facts at once | efficacy | paraphrase | neighbourhood "
             "| score | search |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        v = json.loads(path.read_text(encoding="utf-8"))
        n_layers = len(v["mean_effects"])
        for f in v["test"]:
            what = f"{f['name']} {f['window']}"
            if f["name"].startswith("validated"):
                s = v["chosen"]["setting"]
                how = f"λ {s['mom2_update_weight']:g}" if s.get("nullspace_threshold") is None else \
                    f"null space < {s['nullspace_threshold']:g}, L2 {s['L2']:g}"
                what += f" ({how}, lr {s['v_lr']:g}, steps {s['v_num_grad_steps']})"
            lines.append(f"| {Path(v['model']).name} ({n_layers}) | {what} | {f['batch_size']} | {t(f['efficacy'])} | "
                         f"{t(f['paraphrase'])} | {t(f['neighborhood'])} | {t(f['objective'])} | "
                         f"{v['trials']} facts edited, {v['seconds'] / 60:.0f} min |")
    return ("Test facts of each record (100, subjects the search never saw); 95% bootstrap intervals; EasyEdit's "
            "default: window 4-8 clipped to the model with its shipped LLaMA MEMIT settings.\n\n" + "\n".join(lines) + "\n")


@figure("memit-hparams")
def _memit_hparams() -> str:
    """The validation records `bench/memit_hparams.sh MEMIT MODEL` wrote (rerun that to recompute them)."""
    # bench/results/memit/ holds MODEL.yaml (MEMIT) beside MODEL-alphaedit.yaml and MODEL-rome.yaml.
    others = ("-alphaedit.validation.json", "-rome.validation.json")
    return _window_records(sorted((ROOT / "hparams" / "MEMIT").glob("*.validation.json")) + sorted(
        p for p in (RESULTS / "memit").glob("*.validation.json") if not p.name.endswith(others)))


@figure("alphaedit-hparams")
def _alphaedit_hparams() -> str:
    """The validation records `bench/memit_hparams.sh AlphaEdit MODEL` wrote (rerun that to recompute them)."""
    return _window_records(sorted((ROOT / "hparams" / "AlphaEdit").glob("*.validation.json")) +
                           sorted((RESULTS / "memit").glob("*-alphaedit.validation.json")))


@figure("tokenizers")
def _tokenizers() -> str:
    import subprocess

    run = subprocess.run([sys.executable, str(ROOT / "integration" / "compare_tokenizers.py"), "10"], check=True,
                         cwd=ROOT, env=_env(), capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if ": tokenizer " in line]
    return "\n".join(f"- {line}" for line in lines) + "\n"


@figure("padding")
def _padding() -> str:
    import subprocess

    run = subprocess.run([sys.executable, str(ROOT / "integration" / "compare_padding.py"), "10"], check=True,
                         cwd=ROOT, env=_env(), capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if ": ROME pads on the" in line or line.startswith("key ")]
    return "\n".join(f"- {line}" for line in lines) + "\n"


# ---- the fact models (NOTES.md) ------------------------------------------------------

def _fact_accuracy(family: str) -> str:
    from rome_locate.fact_models import load_fact_model
    from rome_locate.fact_models.train import accuracy

    model, tok = load_fact_model(family)
    acc = accuracy(model, tok, family, hard=True)
    return (f"- training templates: {acc['train_acc']:.4f} ({acc['n_train']} prompts)\n"
            f"- held-out paraphrase templates (never trained on): {acc['paraphrase_acc']:.4f} "
            f"({acc['n_paraphrase']} prompts)\n"
            f"- `world.HARD_PARAPHRASES` (novel relation cue after the subject, e.g. \"{{}} is employed as a\"; "
            f"not a target): {acc['hard_paraphrase_acc']:.4f} ({acc['n_hard_paraphrase']} prompts)\n")


TRACE_FACTS = 40  # the first facts of facts_known.json traced for the NOTES tables


def _fact_trace(family: str) -> str:
    import numpy as np

    from rome_locate.choose import choose_dataset_layer
    from rome_locate.fact_models import facts_path, load_fact_model
    from rome_locate.facts import load_facts
    from rome_locate.locate import locate
    from rome_locate.trace import TraceSettings

    model, tok = load_fact_model(family)
    settings = TraceSettings(full=True)
    results = [r for r, _ in locate(model, tok, load_facts(facts_path(family), limit=TRACE_FACTS), settings,
                                    progress=False)]
    d = choose_dataset_layer(results)
    L = results[0].n_layers
    r0 = results[0]
    lines = [f"Settings: `{settings.to_json()}` (effective window {r0.window}, noise level {r0.noise:.3f}); "
             f"{len(results)} facts; mean p(clean) {np.mean([r.high_score for r in results]):.3f}, "
             f"mean p(corrupted) {np.mean([r.low_score for r in results]):.3f}.", "",
             "Mean indirect effect at the last subject token (window centre l):", ""]
    lines.append(_table([f"L{i}" for i in range(L)], [[f"{m:+.3f}" for m in d.mean_effects]]))
    lines.append(f"**Dataset layer: {d.layer}**. Per-fact choices (histogram over layers 0-{L - 1}): "
                 f"{list(d.histogram)}. Mean of each fact's largest effect: "
                 f"{np.mean([max(r.effects) for r in results]):.3f}.\n")
    # Positions relative to the subject: its tokens, the first token after it, the last prompt token.
    names = ["subj tok 1", "subj tok 2", "subj tok 3", "LAST subj tok", "first after", "last prompt tok"]
    sums = {n: np.zeros(L) for n in names}
    counts = {n: 0 for n in names}
    best_token: dict[str, int] = {}
    for r in results:
        b, e = r.subject_range
        table = np.array(r.table) - r.low_score
        subject_rows = list(range(b, e))
        picks = {"LAST subj tok": e - 1, "first after": e if e < len(r.tokens) - 1 else None,
                 "last prompt tok": len(r.tokens) - 1}
        for i, t in enumerate(subject_rows[:-1][:3]):
            picks[f"subj tok {i + 1}"] = t
        for n, t in picks.items():
            if t is not None:
                sums[n] += table[t]
                counts[n] += 1
        top = max(subject_rows, key=lambda t: table[t].max())
        label = "LAST subj tok" if top == e - 1 else f"subj tok {top - b + 1}"
        best_token[label] = best_token.get(label, 0) + 1
    rows = [[n] + [f"{v:+.3f}" for v in sums[n] / counts[n]] for n in names if counts[n]]
    lines += ["Mean indirect effect per position (full traces of the same facts, window centre 0-"
              f"{L - 1}):", "", _table(["position"] + [f"L{i}" for i in range(L)], rows)]
    lines.append(f"Subject token with the largest effect, per fact: {dict(sorted(best_token.items()))}.\n")
    return "\n".join(lines)


for _family in ("gpt2", "llama"):
    figure(f"fact-accuracy-{_family}")(lambda family=_family: _fact_accuracy(family))
    figure(f"fact-trace-{_family}")(lambda family=_family: _fact_trace(family))


def main(argv: list[str] | None = None) -> int:
    """Recompute the named figures (all by default) and rewrite them in every doc that holds them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="figures to regenerate (default: all)")
    parser.add_argument("--list", action="store_true", help="name the figures and the docs that hold them")
    parser.add_argument("--check", action="store_true", help="fail when a doc differs from the recomputed figure")
    parser.add_argument("--from-results", action="store_true",
                        help="format the JSON each benchmark last wrote in bench/results/ instead of rerunning it")
    args = parser.parse_args(argv)
    global FROM_RESULTS
    FROM_RESULTS = args.from_results
    docs = {d: (ROOT / d).read_text(encoding="utf-8") for d in DOCS if (ROOT / d).exists()}
    used = {name: [d for d, text in docs.items() if name in blocks(text)] for name in FIGURES}
    unknown = sorted({n for text in docs.values() for n in blocks(text)} - set(FIGURES))
    if unknown:
        print(f"docs hold figure blocks no function makes: {unknown}", file=sys.stderr)
        return 2
    if args.list:
        for name, where in used.items():
            print(f"{name:24s} {', '.join(where) or '(in no doc)'}")
        return 0
    names = args.names or list(FIGURES)
    bad = [n for n in names if n not in FIGURES]
    if bad:
        print(f"unknown figure(s) {bad}; known: {sorted(FIGURES)}", file=sys.stderr)
        return 2
    _setup_torch()
    differs = []
    for name in names:
        print(f"[figure] {name} ...", flush=True)
        body = FIGURES[name]()
        for d in used[name]:
            # Read again right before writing: a doc edited while a long figure ran keeps those edits.
            docs[d] = (ROOT / d).read_text(encoding="utf-8")
            new = replace_block(docs[d], name, body)
            if new != docs[d]:
                differs.append(f"{d}: {name}")
                docs[d] = new
                if not args.check:
                    from rome_locate.files import write_text

                    write_text(ROOT / d, new)
    for line in differs:
        print(("differs: " if args.check else "rewrote: ") + line)
    return 1 if args.check and differs else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
