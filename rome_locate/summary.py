"""The dataset summary of edit records: means, 95% intervals, layer-choice strategies and the verdict, rank
correlations, sequential-editing retention and the editor's own figures. Computed once per report write."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from .intervals import Interval, bootstrap, overlap, rate
from .metrics import mean_of, spearman
from .outcome import SEQUENTIAL_FIELDS, EvalRecord, LayerScore, best_layer_score


def _editor_means(records: Sequence[EvalRecord]) -> dict[str, dict[str, float | None]]:
    # The editor's own figures (EasyEdit's pre/post accuracies), averaged over the facts that have them.
    rows = [r.editor_metrics for r in records if r.editor_metrics]
    return {stage: {k: mean_of(row.get(stage, {}).get(k) for row in rows)
                    for k in sorted({k for row in rows for k in row.get(stage, {})})}
            for stage in ("pre", "post") if rows}


def sequential_summary(records: Sequence[EvalRecord]) -> dict[str, Any] | None:
    """Retention, paraphrase and locality after the last edit, and efficacy after 1, 10 and all edits."""
    if not records or records[-1].final_metrics is None:
        return None
    earlier = [r for r in records[:-1] if r.metrics.get("success")]
    final = {k: mean_of((r.final_metrics or {}).get(k) for r in records) for k in SEQUENTIAL_FIELDS}
    curve = [r.after_n_edits for r in records if r.after_n_edits]
    return {
        "n_edits": len(records),
        # Of the earlier edits that worked right after they were made, the share that still works after the last.
        "retention": mean_of((r.final_metrics or {}).get("success") for r in earlier) if earlier else None,
        "retention_interval": _bounds(rate([(r.final_metrics or {}).get("success") for r in earlier])),
        "retention_of": len(earlier),
        "final": final,
        "efficacy_after": {str(int(p["n_edits"])): p.get("success") for p in curve
                           if int(p["n_edits"]) in (1, 10, len(records))},
        "curve": curve,
    }



# ---- dataset summary ---------------------------------------------------------------

# The layer mode a record's layer source belongs to: the traced rule's fallback is part of the traced strategy.
_MODE_OF_SOURCE = {"fallback": "traced"}

STRATEGY_FIELDS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score",
                   "efficacy_magnitude", "rewrite_score")


def _at_layer(sweep: Sequence[LayerScore], layer: int | None) -> LayerScore | None:
    return next((s for s in sweep if s.layer == layer), None)


def _bounds(iv: Interval) -> list[float] | None:
    return None if iv.mean is None else [iv.low, iv.high]


def _strategy_row(values: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One strategy's means over its facts and their 95% bootstrap intervals (`intervals[field] = [low, high]`)."""
    ivs = {f: bootstrap([v.get(f) for v in values]) for f in STRATEGY_FIELDS}
    return {"n": len(values), **{f: iv.mean for f, iv in ivs.items()},
            "intervals": {f: _bounds(iv) for f, iv in ivs.items()}}


def _interval_of(row: Mapping[str, Any], field: str) -> Interval:
    bounds = (row.get("intervals") or {}).get(field)
    return Interval(row.get(field), *(bounds or (None, None)), row.get("n", 0))


def verdict(strategies: Mapping[str, Mapping[str, Any]], field: str = "score") -> str | None:
    """One line: the best layer choice by ROME score (the sweep-best oracle left out) and traced vs fixed."""
    ranked = {k: _interval_of(v, field) for k, v in strategies.items() if k != "sweep best"}
    ranked = {k: iv for k, iv in ranked.items() if iv.mean is not None}
    if not ranked:
        return None
    best = max(ranked, key=lambda k: ranked[k].mean)  # first listed wins a tie
    line = f"best layer choice by ROME score: {best} {ranked[best].text()}"
    others = [k for k in ranked if k != best]
    if others:
        line += " (" + ", ".join(f"{k} {ranked[k].text()}" for k in others) + ")"
    if "traced" in ranked and "fixed" in ranked:
        t, f = ranked["traced"], ranked["fixed"]
        how = "beats" if t.mean > f.mean else "trails" if t.mean < f.mean else "ties"
        line += (f"; the traced layer {how} the fixed one, "
                 + ("95% intervals overlap: not a clear difference" if overlap(t, f)
                    else "95% intervals do not overlap"))
    if "sweep best" in strategies:
        line += f"; sweep-best oracle {_interval_of(strategies['sweep best'], field).text()}"
    return line + "."


# Metrics whose mean the summary gives with a 95% interval in `intervals`: the generation metrics, portability and
# locality, with their keys (`portability.KEY`, `locality.KEY`). Per fact, gen_efficacy is 0 or 1 (one prompt):
# its interval is Wilson's, as the success rate's; the others are shares, bootstrapped.
INTERVAL_PREFIXES = ("gen_efficacy", "gen_paraphrase", "portability", "locality")
WILSON_FIELDS = ("gen_efficacy", "gen_efficacy_pre")


def _shown_with_interval(key: str) -> bool:
    return any(key == p or key == p + "_pre" or key.startswith(p + ".") for p in INTERVAL_PREFIXES)


def metric_intervals(records: Sequence[EvalRecord]) -> dict[str, dict[str, Any]]:
    """`{metric: {mean, interval: [low, high], n, kind}}` of the metrics of `INTERVAL_PREFIXES` the records have,
    over the facts that have them (kind "wilson" or "bootstrap")."""
    keys = list(dict.fromkeys(k for r in records for k in r.metrics if _shown_with_interval(k)))
    out = {}
    for key in keys:
        values = [r.metrics.get(key) for r in records]
        iv = rate(values) if key in WILSON_FIELDS else bootstrap(values)
        if iv.mean is not None:
            out[key] = {"mean": iv.mean, "interval": _bounds(iv), "n": iv.n,
                        "kind": "wilson" if key in WILSON_FIELDS else "bootstrap"}
    return out


def summarize(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """Dataset summary: mean of every metric, traced vs fixed vs sweep-best, and effect/success rank correlations."""
    keys = sorted({k for r in records for k in r.metrics})
    means = {k: mean_of(r.metrics.get(k) for r in records) for k in keys}

    strategies: dict[str, dict[str, Any]] = {}
    swept = [r for r in records if r.sweep]
    if swept:
        picks: dict[str, list[LayerScore | None]] = {}
        validated = [r for r in swept if r.layer_source == "validated"]
        if validated:  # the layer the trial edits picked, which is the layer the fact was edited at
            picks["validated"] = [_at_layer(r.sweep, r.layer) for r in validated]
        picks.update({
            "traced": [_at_layer(r.sweep, r.traced_layer) for r in swept],
            "fixed": [_at_layer(r.sweep, r.fixed_layer) for r in swept],
            "sweep best": [best_layer_score(r.sweep) for r in swept],
        })
        for name, chosen in picks.items():
            chosen = [c for c in chosen if c is not None]
            if chosen:
                strategies[name] = _strategy_row([{f: getattr(c, f) for f in STRATEGY_FIELDS} for c in chosen])
    else:  # what was applied, by mode: a traced fact that fell back is still the traced rule's choice
        for mode in sorted({_MODE_OF_SOURCE.get(r.layer_source, r.layer_source) for r in records}):
            strategies[mode] = _strategy_row([r.metrics for r in records
                                              if _MODE_OF_SOURCE.get(r.layer_source, r.layer_source) == mode])

    per_fact, xs, ys = {}, [], []
    for r in swept:
        pts = [(s.effect, s.rewrite_score) for s in r.sweep if s.effect is not None and s.rewrite_score is not None]
        if pts:
            per_fact[r.fact_id] = spearman([p[0] for p in pts], [p[1] for p in pts])
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
    pooled = spearman(xs, ys) if xs else None
    sequential = sequential_summary(records)
    editor_means = _editor_means(records)
    traced_is_best = [r.traced_layer == r.best_layer for r in swept if r.traced_layer is not None]
    return {
        "n_facts": len(records),
        # The figures `rome-locate edit` prints (EasyEdit's names; "post" is after the edit).
        "success_rate": means.get("success"),
        "success_rate_interval": _bounds(rate([r.metrics.get("success") for r in records])),
        "pre_rewrite_acc": means.get("rewrite_acc_pre"),
        "post_rewrite_acc": means.get("rewrite_acc"),
        "post_rephrase_acc": means.get("rephrase_acc"),
        "post_locality": means.get("locality"),
        # Generation metrics, portability and locality by key: mean, 95% interval and facts of each.
        "intervals": metric_intervals(records),
        "layers": sorted({l for r in records for l in (r.layers or (r.layer,))}),  # a window: every layer
        "layer_sources": dict(sorted(Counter(r.layer_source for r in records).items())),
        "means": means,
        "strategies": strategies,
        "verdict": verdict(strategies),
        "spearman_per_fact": per_fact,
        "spearman_per_fact_mean": mean_of(per_fact.values()),
        "spearman_pooled": pooled,
        "traced_is_best_share": mean_of(float(v) for v in traced_is_best) if traced_is_best else None,
        "correlation_measure": "Spearman rank correlation of traced indirect effect vs rewrite_score per layer",
        **({"sequential": sequential, "retention": sequential["retention"]} if sequential else {}),
        **({"editor_metrics": editor_means} if editor_means else {}),
    }
