"""Evaluation records -> report.md, a self-contained report.html (images as data URIs) and results.json.

The summary is computed once per write and the report's sections are built once
(`build_sections`); `rome_locate.render` lays them out as Markdown and as HTML.
"""

from __future__ import annotations

import json
import math
import platform
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import safe_name, write_text
from .metrics import mean_of
from .outcome import SEQUENTIAL_FIELDS, EvalRecord
from .render import (Bullets, Code, Image, Para, Section, Table, curve_plot, fmt, heatmap_png, sweep_plot, to_html,
                     to_markdown)
from .summary import STRATEGY_FIELDS, summarize

IMAGES = "images"
SWEEP_PLOT = "layer_effect_vs_success"
SEQUENTIAL_PLOT = "sequential_edits"
# The line report.md opens with and report.html carries after its doctype: how a rerun knows the file is its own.
REPORT_MARKER = "<!-- written by rome-locate (edit, eval, demo): a rerun of the command rewrites this file -->"

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
    ("generation efficacy (the greedy continuation says target_new)", "gen_efficacy"),
    ("generation paraphrase (share of rephrasings)", "gen_paraphrase"),
    ("EasyEdit portability (mean over keys)", "portability"),
)
# Per-key rows follow the card's metrics: `portability.KEY` and `locality.KEY`, labelled by their key.
KEYED_METRICS = (("EasyEdit portability", "portability"), ("EasyEdit locality", "locality"))
INTERVAL_HEADER = ("metric", "before", "after", "facts")
BEFORE_AFTER = ("metric", "before", "after")
GENERATION_HEADER = ("prompt kind", "prompt", "before", "after")
SWEEP_HEADER = ("layer", "", "indirect effect", "efficacy", "efficacy magn.", "paraphrase", "neighbourhood",
                "ROME score", "rewrite score")
# Each strategy cell is a mean [95% bootstrap interval] over the facts, in STRATEGY_FIELDS order.
STRATEGY_HEADER = ("layer choice", "facts", "efficacy", "paraphrase", "neighbourhood", "ROME score",
                   "efficacy magn.", "rewrite score")
SEQUENTIAL_HEADER = ("edits so far", "success", "efficacy", "paraphrase", "rephrase_acc", "neighbourhood",
                     "locality")


# ---- the summary, read in one place ------------------------------------------------


@dataclass(frozen=True)
class StrategyRow:
    """One layer-choice strategy of the summary: its facts, means and 95% intervals."""

    name: str
    n: int
    means: Mapping[str, float | None]
    intervals: Mapping[str, Sequence[float] | None]

    def cell(self, key: str) -> str:
        """`mean [low, high]`, or the mean alone without an interval."""
        bounds = self.intervals.get(key)
        return fmt(self.means.get(key)) + ("" if bounds is None else f" [{fmt(bounds[0])}, {fmt(bounds[1])}]")


@dataclass(frozen=True)
class SequentialView:
    """The sequential-editing part of the summary."""

    n_edits: int
    retention: float | None
    retention_of: int
    final: Mapping[str, float | None]
    efficacy_after: Mapping[str, float | None]
    curve: tuple[Mapping[str, float | None], ...]


@dataclass(frozen=True)
class SummaryView:
    """The figures of `summarize()` the reports show; `of` is the one reader of its keys."""

    n_facts: int
    verdict: str | None = None
    means: Mapping[str, float | None] = field(default_factory=dict)
    strategies: tuple[StrategyRow, ...] = ()
    editor_pre: Mapping[str, float | None] = field(default_factory=dict)
    editor_post: Mapping[str, float | None] = field(default_factory=dict)
    layers: tuple[int, ...] = ()
    success_rate: float | None = None
    success_rate_interval: Sequence[float] | None = None
    post: Mapping[str, float | None] = field(default_factory=dict)  # EasyEdit's names: post_rewrite_acc, ...
    correlation_measure: str = ""
    spearman_pooled: float | None = None
    spearman_per_fact_mean: float | None = None
    spearman_per_fact: Mapping[str, float | None] = field(default_factory=dict)
    traced_is_best_share: float | None = None
    sequential: SequentialView | None = None
    intervals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # metric -> mean, interval, n

    @classmethod
    def of(cls, s: "Mapping[str, Any] | SummaryView") -> "SummaryView":
        """The view of a `summarize()` dict (or of results.json's summary; missing parts stay empty)."""
        if isinstance(s, SummaryView):
            return s
        ee, seq = s.get("editor_metrics") or {}, s.get("sequential")
        return cls(
            n_facts=int(s["n_facts"]), verdict=s.get("verdict"), means=dict(s.get("means") or {}),
            strategies=tuple(StrategyRow(name, int(row["n"]), {k: row.get(k) for k in STRATEGY_FIELDS},
                                         dict(row.get("intervals") or {}))
                             for name, row in (s.get("strategies") or {}).items()),
            editor_pre=dict(ee.get("pre") or {}), editor_post=dict(ee.get("post") or {}),
            layers=tuple(s.get("layers") or ()), success_rate=s.get("success_rate"),
            success_rate_interval=s.get("success_rate_interval"),
            post={k: s.get(k) for k in ("post_rewrite_acc", "post_rephrase_acc", "post_locality")},
            correlation_measure=s.get("correlation_measure", ""), spearman_pooled=s.get("spearman_pooled"),
            spearman_per_fact_mean=s.get("spearman_per_fact_mean"),
            spearman_per_fact=dict(s.get("spearman_per_fact") or {}),
            traced_is_best_share=s.get("traced_is_best_share"), intervals=dict(s.get("intervals") or {}),
            sequential=None if not seq else SequentialView(
                int(seq["n_edits"]), seq.get("retention"), int(seq.get("retention_of", 0)),
                dict(seq.get("final") or {}), dict(seq.get("efficacy_after") or {}), tuple(seq.get("curve") or ())),
        )


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
        "model": model, "model_fingerprint": _jsonable(model_fingerprint), "facts": facts, "editor": editor,
        "layers": layers, "sweep": sweep, "seed": seed, "hparams": _jsonable(hparams),
        "trace": _jsonable(trace_settings), "generation": _jsonable(generation), "wall_time_s": wall_time_s,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    out.update({k: _jsonable(v) for k, v in extra.items()})
    return out


def partial_summary(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """The summary results.json holds while a run is under way: counts and plain means, no intervals."""
    keys = sorted({k for r in records for k in r.metrics})
    return {"partial": True, "n_facts": len(records),
            "means": {k: mean_of(r.metrics.get(k) for r in records) for k in keys},
            "layers": sorted({l for r in records for l in (r.layers or (r.layer,))}),
            "layer_sources": dict(sorted(Counter(r.layer_source for r in records).items()))}


def write_results_json(records: Sequence[EvalRecord], out_dir: str | Path, settings: Mapping[str, Any],
                       *, error: str | None = None, complete: bool = True,
                       summary: Mapping[str, Any] | None = None) -> Path:
    """results.json: settings, records and `summary` (computed when complete, a partial one while under way)."""
    # Written after every fact so that a crash loses nothing finished: that write must not pay the bootstrap.
    if summary is None:
        summary = summarize(records) if complete else partial_summary(records)
    obj = {"settings": _jsonable(dict(settings)), "complete": complete, "error": error,
           "summary": summary, "records": [r.to_json() for r in records]}
    return write_text(Path(out_dir) / "results.json", json.dumps(_finite(obj), indent=2, allow_nan=False))


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


def sequential_plot(summary: "Mapping[str, Any] | SummaryView", path: Path) -> Path | None:
    """Success, paraphrase and locality of the edits so far against the number of edits (sequential editing)."""
    seq = SummaryView.of(summary).sequential
    return None if seq is None or not seq.curve else curve_plot(seq.curve, path)


@dataclass
class Pictures:
    """The report's PNGs: heatmaps by record position (two facts may share an id), the two plots, failures."""

    heatmaps: dict[int, Path] = field(default_factory=dict)
    sweep: Path | None = None
    sequential: Path | None = None
    errors: list[str] = field(default_factory=list)


def draw_pictures(records: Sequence[EvalRecord], traces: Sequence[Any] | None, summary: SummaryView,
                  out_dir: Path) -> Pictures:
    """Draw every picture of the report under out_dir/images; a heatmap that fails is listed, not raised."""
    pics = Pictures()
    for i, (rec, trace) in enumerate(zip(records, traces or ())):
        if trace is None:
            continue
        try:
            png = heatmap_png(trace, out_dir / IMAGES, f"{i}_{safe_name(rec.fact_id)}")
        except (ValueError, RuntimeError, ImportError) as exc:  # a missing picture must not lose the report
            pics.errors.append(f"heatmap of fact {rec.fact_id}: {exc}")
            continue
        if png is not None:
            pics.heatmaps[i] = png
    pics.sweep = sweep_plot(records, out_dir / IMAGES / f"{SWEEP_PLOT}.png")
    pics.sequential = sequential_plot(summary, out_dir / IMAGES / f"{SEQUENTIAL_PLOT}.png")
    return pics


# ---- the sections, built once ----------------------------------------------------


def layer_line(rec: EvalRecord) -> str:
    """Where the fact was edited, by which rule and why; the traced, fixed and sweep-best layers beside it."""
    why = f"{rec.layer_source}: {rec.layer_reason}" if rec.layer_reason else rec.layer_source
    parts = [f"edited at layer {rec.layer} ({why})"]
    if rec.traced_layer is not None:
        parts.append(f"traced layer {rec.traced_layer}" + ("" if rec.margin is None else f", margin {fmt(rec.margin)}"))
    if rec.fixed_layer is not None:
        parts.append(f"fixed layer {rec.fixed_layer}")
    if rec.best_layer is not None:
        parts.append(f"sweep best layer {rec.best_layer}")
    return "; ".join(parts)


def _keyed_metrics(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, key) of the `portability.KEY` and `locality.KEY` metrics present, in their order."""
    return [(f"{label} [{k.partition('.')[2]}]", k) for label, name in KEYED_METRICS for k in metrics
            if k.startswith(name + ".") and not k.endswith("_pre")]


def _metric_rows(rec: EvalRecord) -> list[list[str]]:
    rows = [[label, fmt(rec.metrics.get(key + "_pre")), fmt(rec.metrics.get(key))]
            for label, key in (*CARD_METRICS, *_keyed_metrics(rec.metrics))
            if rec.metrics.get(key) is not None or rec.metrics.get(key + "_pre") is not None]
    pre, post = (rec.editor_metrics or {}).get("pre", {}), (rec.editor_metrics or {}).get("post", {})
    return rows + [[f"{k}, as EasyEdit computes it", fmt(pre.get(k)), fmt(post.get(k))]
                   for k in sorted(set(pre) | set(post))]


def _sweep_rows(rec: EvalRecord) -> list[list[str]]:
    best = rec.best_layer
    rows = []
    for s in rec.sweep:
        mark = " ".join(x for x, on in (("best", s.layer == best), ("traced", s.layer == rec.traced_layer),
                                        ("fixed", s.layer == rec.fixed_layer)) if on)
        rows.append([str(s.layer), mark, fmt(s.effect), fmt(s.efficacy_score), fmt(s.efficacy_magnitude),
                     fmt(s.paraphrase_score), fmt(s.neighborhood_score), fmt(s.score), fmt(s.rewrite_score)])
    return rows


def _fact_card(i: int, rec: EvalRecord, heatmap: Path | None) -> Section:
    blocks: list = [Para(f"Subject: {rec.subject}. {layer_line(rec)}.")]
    if heatmap is not None:
        blocks.append(Image(heatmap, f"causal trace of fact {rec.fact_id}"))
    parts = []
    if rec.generations:
        rows = [[g.group, g.prompt, g.before, g.after] for g in rec.generations]
        parts.append(Section("Generations", (Table.of(GENERATION_HEADER, rows),), level=4))
    parts.append(Section("Metrics", (Table.of(BEFORE_AFTER, _metric_rows(rec)),), level=4))
    if rec.sweep:
        parts.append(Section("Layer sweep", (Table.of(SWEEP_HEADER, _sweep_rows(rec)),), level=4))
    return Section(f"Fact {rec.fact_id}: {rec.prompt} → {rec.target_new} (was {rec.target_true})", tuple(blocks),
                   tuple(parts), level=3, anchor=f"fact-{i}-{safe_name(rec.fact_id)}", card=True)


def _settings_section(settings: Mapping[str, Any]) -> Section:
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else fmt(v)] for k, v in settings.items()
            if k != "hparams"]
    blocks: list = [Table.of(("setting", "value"), rows)]
    if settings.get("hparams"):
        blocks.append(Code("Hyperparameters", json.dumps(settings["hparams"], indent=2)))
    return Section("Settings", tuple(blocks), anchor="settings")


def _correlation_rows(s: SummaryView) -> list[list[str]]:
    rows = [["pooled (all facts, all layers)", fmt(s.spearman_pooled)],
            ["mean of per-fact correlations", fmt(s.spearman_per_fact_mean)]]
    rows += [[f"fact {fid}", fmt(v)] for fid, v in s.spearman_per_fact.items()]
    if s.traced_is_best_share is not None:
        rows.append(["share of facts whose traced layer is the sweep's best", fmt(s.traced_is_best_share)])
    return rows


def _interval_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return fmt(None)
    bounds = entry.get("interval")
    return fmt(entry.get("mean")) + ("" if not bounds else f" [{fmt(bounds[0])}, {fmt(bounds[1])}]")


def _interval_rows(intervals: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """One row per metric of the summary's `intervals`: before (its `_pre` twin) and after, each with its interval."""
    rows = []
    for key, entry in intervals.items():
        if key.endswith("_pre"):
            continue
        pre = intervals.get(key + "_pre")
        rows.append([key, _interval_cell(pre), _interval_cell(entry), str(entry.get("n", ""))])
    return rows


def _summary_section(s: SummaryView, pics: Pictures) -> Section:
    strategies = [[row.name, str(row.n), *(row.cell(k) for k in STRATEGY_FIELDS)] for row in s.strategies]
    parts = [Section("Mean of every metric", (Table.of(("metric", "mean"), [[k, fmt(v)] for k, v in s.means.items()]),),
                     level=3)]
    if s.intervals:
        parts.append(Section(
            "Generation, portability and locality by key (mean [95% interval] over the facts)",
            (Para("gen_efficacy and gen_paraphrase: the share of prompts whose greedy continuation starts with "
                  "target_new (Wilson interval for gen_efficacy, bootstrap for the others); portability and "
                  "locality: EasyEdit's teacher-forced token accuracies, by key."),
             Table.of(INTERVAL_HEADER, _interval_rows(s.intervals))), level=3))
    parts.append(Section("Traced vs fixed vs sweep (mean [95% bootstrap interval])",
                         (Table.of(STRATEGY_HEADER, strategies),), level=3))
    editor = sorted(set(s.editor_pre) | set(s.editor_post))
    if editor:
        rows = [[k, fmt(s.editor_pre.get(k)), fmt(s.editor_post.get(k))] for k in editor]
        parts.append(Section("EasyEdit's own metrics (mean over the facts)", (Table.of(BEFORE_AFTER, rows),), level=3))
    if pics.sweep is not None:
        parts.append(Section("Layer effect vs edit success", (
            Image(pics.sweep, "layer effect vs edit success"), Para(f"Rank correlation ({s.correlation_measure}):"),
            Table.of(("scope", "Spearman ρ"), _correlation_rows(s))), level=3))
    return Section("Summary", (Para(f"{s.n_facts} fact(s) evaluated."),), tuple(parts), anchor="summary")


def _sequential_section(seq: SequentialView, pics: Pictures) -> Section:
    retention = "–" if seq.retention is None else f"{seq.retention:.1%}"
    text = (f"{seq.n_edits} edits kept one after another. Retention (share of the {seq.retention_of} earlier "
            f"edits that worked when made and still work after the last edit): {retention}. Each row: means over "
            f"every edit so far, measured after that many edits (locality against the unedited model).")
    rows = [[str(int(p["n_edits"]))] + [fmt(p.get(k)) for k in SEQUENTIAL_FIELDS] for p in seq.curve]
    blocks: list = [Para(text), Table.of(SEQUENTIAL_HEADER, rows)]
    if pics.sequential is not None:
        blocks.append(Image(pics.sequential, "metrics against the number of edits"))
    return Section("Sequential editing", tuple(blocks), anchor="sequential")


def build_sections(records: Sequence[EvalRecord], settings: Mapping[str, Any], summary: SummaryView,
                   pics: Pictures, error: str | None = None) -> list[Section]:
    """Every section of the report, in order, for both renderers."""
    top: list = []
    if error:
        top += [Para(error, "Run stopped with an error:", "error"),
                Para(f"This report covers the {len(records)} fact(s) that finished.", style="error")]
    if summary.verdict:
        top.append(Para(summary.verdict, "Verdict:"))
    sections = [Section("", tuple(top))] if top else []
    sections += [_settings_section(settings), _summary_section(summary, pics)]
    if summary.sequential is not None:
        sections.append(_sequential_section(summary.sequential, pics))
    cards = tuple(_fact_card(i, rec, pics.heatmaps.get(i)) for i, rec in enumerate(records))
    sections.append(Section("Facts", children=cards, anchor="facts"))
    if pics.errors:
        sections.append(Section("Pictures that could not be drawn", (Bullets(tuple(pics.errors)),)))
    return sections


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
    summary = summarize(records)  # the write's one bootstrap: results.json and both renderers share it
    view = SummaryView.of(summary)
    sections = build_sections(records, settings, view, draw_pictures(records, traces, view, out_dir), error)
    return {"json": write_results_json(records, out_dir, settings, error=error, complete=error is None,
                                       summary=summary),
            "md": write_text(out_dir / "report.md", to_markdown(title, sections, out_dir, REPORT_MARKER)),
            "html": write_text(out_dir / "report.html", to_html(title, sections, REPORT_MARKER))}


# ---- reading back and the terminal ------------------------------------------------


def written_summary(path: str | Path) -> dict[str, Any]:
    """The summary a results.json holds: what was computed once when it was written, read back, not recomputed."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["summary"]


def load_results(path: str | Path) -> tuple[dict[str, Any], list[EvalRecord]]:
    """Read results.json back: (settings, records)."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    return obj["settings"], [EvalRecord.from_json(r) for r in obj["records"]]


def _two(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def print_summary(records: Sequence[EvalRecord], quiet: bool = False, *,
                  summary: Mapping[str, Any] | None = None) -> None:
    """A few lines per fact and the dataset summary (`summary`, when already computed), for the terminal."""
    if quiet:
        return
    for r in records:
        m = r.metrics
        gen = next((g for g in r.generations if g.group == "edit"), None)
        print(f"fact {r.fact_id}: {r.prompt!r} {r.target_true!r} -> {r.target_new!r}: layer {r.layer} "
              f"({r.layer_source})" + (f", sweep best {r.best_layer}" if r.best_layer is not None else ""))
        print("  " + ", ".join(f"{name} {_two(m.get(key + '_pre'))} -> {_two(m.get(key))}" for name, key in (
            ("efficacy", "efficacy_score"), ("paraphrase", "paraphrase_score"),
            ("neighbourhood", "neighborhood_score"))) + f", locality {_two(m.get('locality'))}")
        if gen is not None:
            print(f"  before: {gen.prompt}{gen.before!r}\n  after:  {gen.prompt}{gen.after!r}")
    s = SummaryView.of(summarize(records) if summary is None else summary)
    if s.verdict:
        print(f"verdict: {s.verdict}")
    for row in s.strategies:
        print(f"{row.name:>10}: efficacy {row.cell('efficacy_score')} paraphrase {row.cell('paraphrase_score')} "
              f"neighbourhood {row.cell('neighborhood_score')} rewrite score {row.cell('rewrite_score')} "
              f"(n={row.n})")
    if s.spearman_pooled is not None:
        print(f"Spearman(traced effect, edit success) pooled {_two(s.spearman_pooled)}, "
              f"mean per fact {_two(s.spearman_per_fact_mean)}")


def _percent(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def edit_summary_line(summary: Mapping[str, Any], editor: str, layers: str) -> str:
    """The one line `rome-locate edit` prints: success rate and EasyEdit's post-edit accuracies."""
    s = SummaryView.of(summary)
    bounds = s.success_rate_interval
    line = (f"{s.n_facts} edits ({editor}, layers {layers}: {list(s.layers)}): success {_percent(s.success_rate)}"
            + ("" if bounds is None else f" [95% interval {bounds[0]:.1%}, {bounds[1]:.1%}]")
            + "".join(f", {label} {s.post[key]:.3f}" for label, key in (
                ("post rewrite_acc", "post_rewrite_acc"), ("rephrase_acc", "post_rephrase_acc"),
                ("locality", "post_locality")) if s.post.get(key) is not None)
            + "".join(f", {key} {_interval_cell(s.intervals[key])}" for key in ("gen_efficacy", "gen_paraphrase",
                                                                                 "portability")
                      if key in s.intervals))
    if s.editor_post:
        line += "\nEasyEdit's own metrics (post): " + ", ".join(
            f"{k} {v:.3f}" for k, v in s.editor_post.items() if v is not None)
    seq = s.sequential
    if seq is not None:
        line += (f"\nsequential, after the last of {seq.n_edits} edits: retention "
                 + ("–" if seq.retention is None else f"{seq.retention:.1%} of {seq.retention_of}")
                 + "".join(f", {k} {seq.final[k]:.3f}" for k in ("success", "rephrase_acc", "locality")
                           if seq.final.get(k) is not None)
                 + "; efficacy (success) after "
                 + ", ".join(f"{n}: {v:.1%}" for n, v in seq.efficacy_after.items() if v is not None))
    return line
