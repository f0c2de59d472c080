"""Evaluation records -> report.md, a self-contained report.html (images as data URIs) and results.json."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .outcome import EvalRecord
from .summary import summarize
from .files import safe_name, write_text

IMAGES = "images"
SWEEP_PLOT = "layer_effect_vs_success"
SEQUENTIAL_PLOT = "sequential_edits"

# Metrics shown on each card: (label, key); the "_pre" twin, when there is one, is the "before" column.
CARD_METRICS = (
    ("efficacy score (P(new) > P(true))", "efficacy_score"),
    ("efficacy magnitude (P(new) - P(true))", "efficacy_magnitude"),
    ("paraphrase score", "paraphrase_score"),
    ("paraphrase magnitude", "paraphrase_magnitude"),
    ("neighbourhood score (P(true) > P(new))", "neighborhood_score"),
    ("neighbourhood magnitude", "neighborhood_magnitude"),
    ("ROME score (harmonic mean)", "score"),
    ("generation n-gram entropy", "ngram_entropy"),
    ("P(new) per token", "p_new"),
    ("P(true) per token", "p_true"),
    ("EasyEdit rewrite_acc", "rewrite_acc"),
    ("EasyEdit rephrase_acc", "rephrase_acc"),
    ("EasyEdit locality", "locality"),
    ("rewrite score (Hase et al.)", "rewrite_score"),
    ("neighbourhood KL(before || after)", "neighborhood_kl"),
    ("success (target_new is the top-1 next token)", "success"),
)

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:90%}
th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.card{border:1px solid #bbb;border-radius:6px;padding:0 1em 1em;margin:1.5em 0}
.error{background:#fee;border:1px solid #c33;padding:.5em 1em}
img{max-width:100%}
code{background:#f6f6f6}
"""


# ---- files -------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def run_settings(*, model: str | None, model_fingerprint: Any = None, hparams: Any = None,
                 trace_settings: Any = None, seed: int | None = None, generation: Any = None,
                 layers: str | None = None, sweep: bool = False, editor: str | None = None,
                 facts: str | None = None, wall_time_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """The run's settings as plain JSON: model and its fingerprint, hyperparameters, trace settings (a
    TraceSettings record), generation, seed, library versions, wall time."""
    import torch
    import transformers

    if hparams is not None and is_dataclass(hparams):
        from .hparams import to_dict

        hparams = to_dict(hparams)
    out = {
        "model": model, "model_fingerprint": _jsonable(model_fingerprint), "facts": facts, "editor": editor, "layers": layers, "sweep": sweep, "seed": seed,
        "hparams": _jsonable(hparams), "trace": _jsonable(trace_settings),
        "generation": _jsonable(generation), "wall_time_s": wall_time_s,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    out.update({k: _jsonable(v) for k, v in extra.items()})
    return out


def write_results_json(records: Sequence[EvalRecord], out_dir: str | Path, settings: Mapping[str, Any],
                       *, error: str | None = None, complete: bool = True) -> Path:
    """results.json alone (cheap: called after every fact so that a crash loses nothing finished)."""
    out_dir = Path(out_dir)
    obj = {"settings": _jsonable(dict(settings)), "complete": complete, "error": error,
           "summary": summarize(records), "records": [r.to_json() for r in records]}
    return write_text(out_dir / "results.json", json.dumps(_finite(obj), indent=2, allow_nan=False))


def _finite(obj: Any) -> Any:
    # JSON has no NaN or infinity: an undefined number is null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---- pictures ----------------------------------------------------------------


def _heatmap_png(trace: Any, out_dir: Path, stem: str) -> Path | None:
    """The trace's heatmap; a trace without the full table gets a bar chart of its per-layer effects."""
    if getattr(trace, "table", None) is None:
        return _effect_bars(trace, out_dir / IMAGES / f"effects_{stem}.png")
    from .plots import heatmap

    paths = heatmap(trace, out_dir / IMAGES / f"trace_{stem}")
    return next((Path(p) for p in paths if str(p).endswith(".png")), None)


def _save_png(fig, path: Path) -> Path:
    from .plots import save_figure

    return save_figure(fig, path.with_suffix(""), formats=("png",), dpi=110)[0]


def _effect_bars(trace: Any, path: Path) -> Path:
    from matplotlib.figure import Figure

    effects = list(trace.effects)
    fig = Figure(figsize=(5, 2.6))
    ax = fig.subplots()
    ax.bar(range(len(effects)), effects, color="tab:green")
    ax.set_xlabel(f"layer ({trace.kind}, window {trace.window})")
    ax.set_ylabel("indirect effect")
    ax.set_title(f"last subject token, answer {trace.answer!r}", fontsize=9)
    fig.tight_layout()
    return _save_png(fig, path)


def sweep_plot(records: Sequence[EvalRecord], path: Path) -> Path | None:
    """Traced indirect effect against edit success (rewrite score) per layer, per fact and averaged."""
    swept = [r for r in records if r.sweep]
    if not swept:
        return None
    from matplotlib.figure import Figure
    import numpy as np

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    drawn = 0
    for r in swept:
        pts = [(s.effect, s.rewrite_score) for s in r.sweep if s.effect is not None and s.rewrite_score is not None]
        if pts:
            ax1.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=f"fact {r.fact_id}")
            drawn += 1
    if not drawn:
        ax1.text(0.5, 0.5, "no traced effects (facts not traced)", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("traced indirect effect (p_restored - p_corrupt)")
    ax1.set_ylabel("edit success: rewrite score")
    ax1.set_title("per layer, each fact")
    if 0 < drawn <= 10:
        ax1.legend(fontsize=7)
    n_layers = max(s.layer for r in swept for s in r.sweep) + 1
    success = np.full((len(swept), n_layers), np.nan)
    effect = np.full((len(swept), n_layers), np.nan)
    for i, r in enumerate(swept):
        for s in r.sweep:
            if s.rewrite_score is not None:
                success[i, s.layer] = s.rewrite_score
            if s.effect is not None:
                effect[i, s.layer] = s.effect
    layers = np.arange(n_layers)
    ax2.plot(layers, np.nanmean(success, 0), "o-", color="tab:red", label="mean rewrite score")
    ax2.set_xlabel("layer")
    ax2.set_xticks(layers)
    ax2.set_ylabel("mean rewrite score", color="tab:red")
    if not np.isnan(effect).all():
        ax3 = ax2.twinx()
        ax3.plot(layers, np.nanmean(effect, 0), "s--", color="tab:blue", label="mean indirect effect")
        ax3.set_ylabel("mean indirect effect", color="tab:blue")
    ax2.set_title("by layer, mean over facts")
    fig.tight_layout()
    return _save_png(fig, path)


SEQUENTIAL_HEADER = ("edits so far", "success", "efficacy", "paraphrase", "rephrase_acc", "neighbourhood",
                     "locality")


def _sequential_rows(seq: Mapping[str, Any]) -> list[list[str]]:
    from .outcome import SEQUENTIAL_FIELDS

    return [[str(int(p["n_edits"]))] + [_fmt(p.get(k)) for k in SEQUENTIAL_FIELDS] for p in seq["curve"]]


def _sequential_text(seq: Mapping[str, Any]) -> str:
    retention = "–" if seq["retention"] is None else f"{seq['retention']:.1%}"
    return (f"{seq['n_edits']} edits kept one after another. Retention (share of the {seq['retention_of']} earlier "
            f"edits that worked when made and still work after the last edit): {retention}. Each row: means over "
            f"every edit so far, measured after that many edits (locality against the unedited model).")


def sequential_plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Success, paraphrase and locality of the edits so far against the number of edits (sequential editing)."""
    seq = summary.get("sequential")
    if not seq or not seq["curve"]:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    xs = [p["n_edits"] for p in seq["curve"]]
    for key, label in (("success", "efficacy (target_new top-1)"), ("rephrase_acc", "rephrase_acc"),
                       ("locality", "locality")):
        ys = [p.get(key) for p in seq["curve"]]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("number of edits")
    ax.set_ylabel("mean over the edits so far")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ---- formatting ------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="num"' if isinstance(c, str) and _looks_numeric(c) else ""
            cells.append(f"<td{cls}>{html.escape(str(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _metric_rows(rec: EvalRecord) -> list[list[str]]:
    rows = []
    for label, key in CARD_METRICS:
        after = rec.metrics.get(key)
        before = rec.metrics.get(key + "_pre")
        if after is None and before is None:
            continue
        rows.append([label, _fmt(before), _fmt(after)])
    ee = rec.editor_metrics or {}
    for key in sorted(set(ee.get("pre", {})) | set(ee.get("post", {}))):
        rows.append([f"{key}, as EasyEdit computes it", _fmt(ee.get("pre", {}).get(key)),
                     _fmt(ee.get("post", {}).get(key))])
    return rows


def _editor_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    ee = summary.get("editor_metrics") or {}
    keys = sorted(set(ee.get("pre", {})) | set(ee.get("post", {})))
    return [[k, _fmt(ee.get("pre", {}).get(k)), _fmt(ee.get("post", {}).get(k))] for k in keys]


def _generation_rows(rec: EvalRecord) -> list[list[str]]:
    return [[g.group, g.prompt, g.before, g.after] for g in rec.generations]


def _sweep_rows(rec: EvalRecord) -> list[list[str]]:
    best = rec.best_layer
    rows = []
    for s in rec.sweep:
        mark = " ".join(x for x, on in (("best", s.layer == best), ("traced", s.layer == rec.traced_layer),
                                        ("fixed", s.layer == rec.fixed_layer)) if on)
        rows.append([str(s.layer), mark, _fmt(s.effect), _fmt(s.efficacy_score), _fmt(s.efficacy_magnitude),
                     _fmt(s.paraphrase_score), _fmt(s.neighborhood_score), _fmt(s.score), _fmt(s.rewrite_score)])
    return rows


SWEEP_HEADER = ("layer", "", "indirect effect", "efficacy", "efficacy magn.", "paraphrase", "neighbourhood",
                "ROME score", "rewrite score")
STRATEGY_HEADER = ("layer choice", "facts", "efficacy", "paraphrase", "neighbourhood", "ROME score",
                   "efficacy magn.", "rewrite score")  # each a mean [95% bootstrap interval] over the facts


def _with_interval(row: Mapping[str, Any], field: str) -> str:
    bounds = (row.get("intervals") or {}).get(field)
    return _fmt(row[field]) + ("" if bounds is None else f" [{_fmt(bounds[0])}, {_fmt(bounds[1])}]")


def _strategy_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    fields = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
              "rewrite_score")
    return [[name, str(row["n"]), *(_with_interval(row, f) for f in fields)]
            for name, row in summary["strategies"].items()]


def _layer_line(rec: EvalRecord) -> str:
    parts = [f"edited at layer {rec.layer} ({rec.layer_source})"]
    if rec.traced_layer is not None:
        parts.append(f"traced layer {rec.traced_layer}" + (f", margin {_fmt(rec.margin)}" if rec.margin is not None else ""))
    if rec.fixed_layer is not None:
        parts.append(f"fixed layer {rec.fixed_layer}")
    if rec.best_layer is not None:
        parts.append(f"sweep best layer {rec.best_layer}")
    return "; ".join(parts)


def _settings_rows(settings: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for k, v in settings.items():
        if k == "hparams":
            continue
        rows.append([k, json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)])
    return rows


def _correlation_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    rows = [["pooled (all facts, all layers)", _fmt(summary["spearman_pooled"])],
            ["mean of per-fact correlations", _fmt(summary["spearman_per_fact_mean"])]]
    rows += [[f"fact {fid}", _fmt(v)] for fid, v in summary["spearman_per_fact"].items()]
    if summary.get("traced_is_best_share") is not None:
        rows.append(["share of facts whose traced layer is the sweep's best", _fmt(summary["traced_is_best_share"])])
    return rows


# ---- the report ------------------------------------------------------------------


def write_report(records: Sequence[EvalRecord], out_dir: str | Path, settings: Mapping[str, Any], *,
                 traces: Sequence[Any] | None = None, error: str | None = None,
                 title: str = "rome-locate evaluation") -> dict[str, Path]:
    """Write report.md, report.html and results.json (and images/) for the records; returns their paths.

    `traces` holds each record's TraceResult (or None), in the records' order, for
    the heatmaps. `error`, when given, is shown at the top: the report then covers
    the facts that finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    images: dict[int | str, Path | None] = {}  # by record position; "sequential" for its plot
    image_errors: list[str] = []
    for i, (rec, trace) in enumerate(zip(records, traces or ())):
        if trace is None:
            continue
        try:
            # Position first: two facts may share an id.
            images[i] = _heatmap_png(trace, out_dir, f"{i}_{safe_name(rec.fact_id)}")
        except (ValueError, RuntimeError, ImportError) as exc:  # a missing picture must not lose the report
            image_errors.append(f"heatmap of fact {rec.fact_id}: {exc}")
    plot = sweep_plot(records, out_dir / IMAGES / f"{SWEEP_PLOT}.png")
    seq_plot = sequential_plot(summary, out_dir / IMAGES / f"{SEQUENTIAL_PLOT}.png")
    images["sequential"] = seq_plot

    paths = {"json": write_results_json(records, out_dir, settings, error=error, complete=error is None)}
    paths["md"] = write_text(out_dir / "report.md",
                                _markdown(records, settings, summary, images, plot, out_dir, error, image_errors, title))
    paths["html"] = write_text(out_dir / "report.html",
                                  _html(records, settings, summary, images, plot, error, image_errors, title))
    return paths


def _markdown(records, settings, summary, images, plot, out_dir: Path, error, image_errors, title) -> str:
    md = [f"# {title}", ""]
    if error:
        md += [f"> **Run stopped with an error:** {error}", f"> This report covers the {len(records)} fact(s) that finished.", ""]
    if summary.get("verdict"):
        md += [f"**Verdict:** {summary['verdict']}", ""]
    md += ["## Settings", "", _md_table(("setting", "value"), _settings_rows(settings)), ""]
    if settings.get("hparams"):
        md += ["Hyperparameters:", "", "```json", json.dumps(settings["hparams"], indent=2), "```", ""]
    md += ["## Summary", "", f"{summary['n_facts']} fact(s) evaluated.", "", "### Mean of every metric", "",
           _md_table(("metric", "mean"), [[k, _fmt(v)] for k, v in summary["means"].items()]), "",
           "### Traced vs fixed vs sweep (mean [95% bootstrap interval])", "", _md_table(STRATEGY_HEADER, _strategy_rows(summary)), ""]
    if _editor_rows(summary):
        md += ["### EasyEdit's own metrics (mean over the facts)", "",
               _md_table(("metric", "before", "after"), _editor_rows(summary)), ""]
    if plot is not None:
        md += ["### Layer effect vs edit success", "", f"![layer effect vs edit success]({plot.relative_to(out_dir).as_posix()})", "",
               f"Rank correlation ({summary['correlation_measure']}):", "",
               _md_table(("scope", "Spearman ρ"), _correlation_rows(summary)), ""]
    if summary.get("sequential"):
        md += ["## Sequential editing", "", _sequential_text(summary["sequential"]), "",
               _md_table(SEQUENTIAL_HEADER, _sequential_rows(summary["sequential"])), ""]
        if images.get("sequential") is not None:
            md += [f"![metrics against the number of edits]({images['sequential'].relative_to(out_dir).as_posix()})", ""]
    md += ["## Facts", ""]
    for i, rec in enumerate(records):
        md += [f"### Fact {rec.fact_id}: {rec.prompt} → {rec.target_new} (was {rec.target_true})", "",
               f"Subject: `{rec.subject}`. {_layer_line(rec)}.", ""]
        img = images.get(i)
        if img is not None:
            md += [f"![causal trace of fact {rec.fact_id}]({img.relative_to(out_dir).as_posix()})", ""]
        if rec.generations:
            md += ["Generations:", "", _md_table(("prompt kind", "prompt", "before", "after"), _generation_rows(rec)),
                   ""]
        md += ["Metrics:", "", _md_table(("metric", "before", "after"), _metric_rows(rec)), ""]
        if rec.sweep:
            md += ["Layer sweep:", "", _md_table(SWEEP_HEADER, _sweep_rows(rec)), ""]
    if image_errors:
        md += ["## Pictures that could not be drawn", ""] + [f"- {e}" for e in image_errors] + [""]
    return "\n".join(md)


def _html(records, settings, summary, images, plot, error, image_errors, title) -> str:
    e = html.escape
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>",
         f"<h1>{e(title)}</h1>"]
    if error:
        h.append(f"<div class='error'><b>Run stopped with an error:</b> {e(error)}<br>"
                 f"This report covers the {len(records)} fact(s) that finished.</div>")
    if summary.get("verdict"):
        h.append(f"<p class='verdict'><b>Verdict:</b> {e(summary['verdict'])}</p>")
    h += ["<h2 id='settings'>Settings</h2>", _html_table(("setting", "value"), _settings_rows(settings))]
    if settings.get("hparams"):
        h.append(f"<details><summary>Hyperparameters</summary><pre>{e(json.dumps(settings['hparams'], indent=2))}</pre></details>")
    h += ["<h2 id='summary'>Summary</h2>", f"<p>{summary['n_facts']} fact(s) evaluated.</p>",
          "<h3>Mean of every metric</h3>", _html_table(("metric", "mean"), [[k, _fmt(v)] for k, v in summary["means"].items()]),
          "<h3>Traced vs fixed vs sweep (mean [95% bootstrap interval])</h3>", _html_table(STRATEGY_HEADER, _strategy_rows(summary))]
    if _editor_rows(summary):
        h += ["<h3>EasyEdit's own metrics (mean over the facts)</h3>",
              _html_table(("metric", "before", "after"), _editor_rows(summary))]
    if plot is not None:
        h += ["<h3>Layer effect vs edit success</h3>", f"<img alt='layer effect vs edit success' src='{_data_uri(plot)}'>",
              f"<p>Rank correlation ({e(summary['correlation_measure'])}):</p>",
              _html_table(("scope", "Spearman ρ"), _correlation_rows(summary))]
    if summary.get("sequential"):
        h += ["<h2 id='sequential'>Sequential editing</h2>", f"<p>{e(_sequential_text(summary['sequential']))}</p>",
              _html_table(SEQUENTIAL_HEADER, _sequential_rows(summary["sequential"]))]
        if images.get("sequential") is not None:
            h.append(f"<img alt='metrics against the number of edits' src='{_data_uri(images['sequential'])}'>")
    h.append("<h2 id='facts'>Facts</h2>")
    for i, rec in enumerate(records):
        h.append(f"<div class='card' id='fact-{i}-{e(safe_name(rec.fact_id))}'>")
        h.append(f"<h3>Fact {e(rec.fact_id)}: {e(rec.prompt)} → {e(rec.target_new)} (was {e(str(rec.target_true))})</h3>")
        h.append(f"<p>Subject: <code>{e(rec.subject)}</code>. {e(_layer_line(rec))}.</p>")
        img = images.get(i)
        if img is not None:
            h.append(f"<img alt='causal trace of fact {e(rec.fact_id)}' src='{_data_uri(img)}'>")
        if rec.generations:
            h += ["<h4>Generations</h4>", _html_table(("prompt kind", "prompt", "before", "after"), _generation_rows(rec))]
        h += ["<h4>Metrics</h4>", _html_table(("metric", "before", "after"), _metric_rows(rec))]
        if rec.sweep:
            h += ["<h4>Layer sweep</h4>", _html_table(SWEEP_HEADER, _sweep_rows(rec))]
        h.append("</div>")
    if image_errors:
        h.append("<h2>Pictures that could not be drawn</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in image_errors) + "</ul>")
    h.append("</body></html>")
    return "\n".join(h)


def load_results(path: str | Path) -> tuple[dict[str, Any], list[EvalRecord]]:
    """Read results.json back: (settings, records)."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    return obj["settings"], [EvalRecord.from_json(r) for r in obj["records"]]


def print_summary(records: Sequence[EvalRecord], quiet: bool = False) -> None:
    """A few lines per fact and the dataset summary, for the terminal."""
    if quiet:
        return

    def f(v):
        return "–" if v is None else f"{v:.2f}"

    for r in records:
        m = r.metrics
        gen = next((g for g in r.generations if g.group == "edit"), None)
        print(f"fact {r.fact_id}: {r.prompt!r} {r.target_true!r} -> {r.target_new!r}: layer {r.layer} ({r.layer_source})"
              + (f", sweep best {r.best_layer}" if r.best_layer is not None else ""))
        print(f"  efficacy {f(m.get('efficacy_score_pre'))} -> {f(m.get('efficacy_score'))}, "
              f"paraphrase {f(m.get('paraphrase_score_pre'))} -> {f(m.get('paraphrase_score'))}, "
              f"neighbourhood {f(m.get('neighborhood_score_pre'))} -> {f(m.get('neighborhood_score'))}, "
              f"locality {f(m.get('locality'))}")
        if gen is not None:
            print(f"  before: {gen.prompt}{gen.before!r}\n  after:  {gen.prompt}{gen.after!r}")
    s = summarize(records)
    if s["verdict"]:
        print(f"verdict: {s['verdict']}")
    for name, row in s["strategies"].items():
        print(f"{name:>10}: efficacy {_with_interval(row, 'efficacy_score')} paraphrase "
              f"{_with_interval(row, 'paraphrase_score')} neighbourhood {_with_interval(row, 'neighborhood_score')} "
              f"rewrite score {_with_interval(row, 'rewrite_score')} (n={row['n']})")
    if s["spearman_pooled"] is not None:
        print(f"Spearman(traced effect, edit success) pooled {f(s['spearman_pooled'])}, "
              f"mean per fact {f(s['spearman_per_fact_mean'])}")


def _rate_interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f" [95% interval {bounds[0]:.1%}, {bounds[1]:.1%}]"


def edit_summary_line(summary: Mapping[str, Any], editor: str, layers: str) -> str:
    """The one line `rome-locate edit` prints: success rate and EasyEdit's post-edit accuracies."""
    def opt(label, key):
        return f", {label} {summary[key]:.3f}" if summary.get(key) is not None else ""

    line = (f"{summary['n_facts']} edits ({editor}, layers {layers}: {summary['layers']}): "
            f"success {summary['success_rate']:.1%}" + _rate_interval(summary.get("success_rate_interval"))
            + opt("post rewrite_acc", "post_rewrite_acc")
            + opt("rephrase_acc", "post_rephrase_acc") + opt("locality", "post_locality"))
    ee = (summary.get("editor_metrics") or {}).get("post")
    if ee:
        line += "\nEasyEdit's own metrics (post): " + ", ".join(f"{k} {v:.3f}" for k, v in ee.items() if v is not None)
    seq = summary.get("sequential")
    if seq:
        final = seq["final"]
        line += (f"\nsequential, after the last of {seq['n_edits']} edits: retention "
                 + ("–" if seq["retention"] is None else f"{seq['retention']:.1%} of {seq['retention_of']}")
                 + "".join(f", {k} {final[k]:.3f}" for k in ("success", "rephrase_acc", "locality")
                           if final.get(k) is not None)
                 + "; efficacy (success) after " + ", ".join(
                     f"{n}: {v:.1%}" for n, v in seq["efficacy_after"].items() if v is not None))
    return line
