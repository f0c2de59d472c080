"""Report files: sections built once and rendered alike in Markdown and HTML, one summary per write, none per fact,
escaped HTML, the layer's source and reason, pictures embedded, JSON that reads back, partial reports."""

from __future__ import annotations

import html
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest
import torch

import rome_locate.report as report
from conftest import build_tiny_model
from rome_locate.choose import LayerRule, place
from rome_locate.evaluate import evaluate
from rome_locate.facts import Fact, neighbours
from rome_locate.outcome import EvalRecord, EvaluationError, Generation, GenerationSettings
from rome_locate.report import edit_summary_line, load_results, run_settings, write_report, write_results_json
from rome_locate.trace import TraceSettings, trace_fact

FACT = Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Seattle",
            target_new="Paris", rephrase_prompts=("Alma Berridge speaks the language of Dorven Kaltmoor, born in",),
            locality=neighbours(("The Eiffel Tower is in", "Miles Davis plays the"), ("Paris", "trumpet")),
            relation_id="P19", id="f0")
REASON = "largest effect among candidates [0, 1, 2] (+0.1000, margin 0.0500 >= threshold 0)"


@dataclass(frozen=True)
class FakeHParams:
    """Stands in for ROME hyperparameters: the harness only reads and replaces `layers`."""

    layers: list = field(default_factory=lambda: [1])


class BiasEditor:
    """A test-double editor: pushes block `layers[0]`'s MLP bias towards target_new, restores it afterwards;
    raises on the fact at position `fail_on` (1-based) of those it is asked to edit."""

    name = "double"

    def __init__(self, fail_on: int | None = None):
        self.fail_on, self.seen = fail_on, []

    @contextmanager
    def edited(self, model, tok, fact, hparams):
        """Edit, yield None, restore."""
        if fact.id not in self.seen:
            self.seen.append(fact.id)
        if len(self.seen) == self.fail_on:
            raise RuntimeError(f"editor broke on {fact.id}")
        layer = hparams.layers[0]
        bias = model.transformer.h[layer].mlp.c_proj.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias += (layer + 1) * 3.0 * model.lm_head.weight[tok(" " + fact.target_new)["input_ids"][0]]
        try:
            yield None
        finally:
            with torch.no_grad():
                bias.copy_(saved)


@pytest.fixture(scope="module")
def evaluated(tiny_tokenizer):
    """Two facts traced (full tables), placed by the traced rule and evaluated with a layer sweep on a tiny GPT-2."""
    tok = tiny_tokenizer
    model = build_tiny_model("gpt2", len(tok), n_layers=4)
    facts = [FACT, Fact(**{**FACT.to_json(), "id": "f1", "prompt": "Alma Berridge speaks the language of",
                           "subject": "Alma Berridge"})]
    traces = [trace_fact(model, tok, f, TraceSettings(samples=3, window=2, noise=0.5, full=True)) for f in facts]
    placements = place(facts, LayerRule("traced", 1, (0, 1, 2), 0.0, "test"), located=traces)
    records = evaluate(model, tok, facts, FakeHParams(layers=[1]), placements, sweep=True, editor=BiasEditor(),
                       generation=GenerationSettings(max_new_tokens=4), progress=False)
    settings = run_settings(model="tiny-gpt2", trace_settings=TraceSettings(samples=3, noise=0.5), seed=0,
                            layers="traced", sweep=True, editor="double", wall_time_s=1.5)
    return model, tok, facts, records, traces, settings


def _record(i: int, prompt: str = "Dorven Kaltmoor was born in", **kw) -> EvalRecord:
    """A hand-made record of a sequential run edited by EasyEdit (no model needed)."""
    return EvalRecord(
        fact_id=f"s{i}", prompt=prompt, subject="Dorven Kaltmoor", target_true="Seattle", target_new="Paris",
        layer=2, layer_source="traced", layer_reason=REASON, editor="double",
        generations=(Generation(prompt, "edit", " in Seattle", " in Paris <b>"),),
        metrics={"efficacy_score": 1.0, "efficacy_score_pre": 0.0, "success": float(i % 2), "score": 0.5 + i / 10,
                 "locality": 0.75},
        editor_metrics={"pre": {"rewrite_acc": 0.25}, "post": {"rewrite_acc": 1.0, "locality": 0.5}},
        final_metrics={"success": 1.0, "locality": 0.5},
        after_n_edits={"n_edits": float(i + 1), "success": 0.5, "locality": 0.25}, **kw)


@pytest.fixture
def sequential_records():
    """Three hand-made records of a sequential run."""
    return [_record(i) for i in range(3)]


@pytest.fixture
def count_summaries(monkeypatch):
    """Counts the calls of the summary the report module runs (the bootstrap)."""
    calls = []
    real = report.summarize

    def counting(records):
        calls.append(len(records))
        return real(records)

    monkeypatch.setattr(report, "summarize", counting)
    return calls


# ---- reading the two renderings back --------------------------------------------------


def _md_cells(line: str) -> list[str]:
    cells, cell, chars = [], "", iter(line.strip()[1:-1])
    for ch in chars:
        if ch == "\\":
            cell += next(chars)
        elif ch == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return cells + [cell.strip()]


def parse_markdown(text: str) -> tuple[list[str], list[list[list[str]]]]:
    """(headings, tables as rows of cells) of a Markdown report, escapes undone."""
    headings, tables, current = [], [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not re.fullmatch(r"\|(---\|)+", line):
                current.append(_md_cells(line))
            continue
        current = None
        if re.match(r"#{1,6} ", line):
            headings.append(line.split(" ", 1)[1])
    return headings, tables


class _HTMLTables(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.headings, self.tables, self.text, self.tags = [], [], None, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("th", "td", "h1", "h2", "h3", "h4"):
            self.text = ""

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.tables[-1][-1].append(self.text.strip())
        elif tag in ("h1", "h2", "h3", "h4"):
            self.headings.append(self.text)
        if tag in ("th", "td", "h1", "h2", "h3", "h4"):
            self.text = None

    def handle_data(self, data):
        if self.text is not None:
            self.text += data


def parse_html(page: str) -> tuple[list[str], list[list[list[str]]], list[str]]:
    """(headings, tables as rows of cells, every tag opened) of an HTML report, entities decoded."""
    parser = _HTMLTables()
    parser.feed(page)
    return parser.headings, parser.tables, parser.tags


def assert_same_report(md: str, page: str) -> None:
    """The same headings in the same order, and the same tables cell for cell, each cell escaped in the page."""
    md_headings, md_tables = parse_markdown(md)
    html_headings, html_tables, _ = parse_html(page)
    assert md_headings == html_headings
    assert md_tables == html_tables
    assert md_tables and all(len(t) >= 2 for t in md_tables)
    for table in md_tables:
        for row in table:
            for cell in row:
                assert html.escape(cell) in page, cell


# ---- the tests ------------------------------------------------------------------------


def test_report_has_every_section(evaluated, tmp_path):
    _, _, facts, records, traces, settings = evaluated
    paths = write_report(records, tmp_path, settings, traces=traces)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    md_headings = parse_markdown(md)[0]
    for section in ("Settings", "Summary", "Mean of every metric", "Layer effect vs edit success", "Facts",
                    "Generations", "Metrics", "Layer sweep", "Traced vs fixed vs sweep (mean [95% bootstrap interval])"):
        assert section in md_headings, section
    for text in (md, page):
        for needle in ("EasyEdit locality", "efficacy score", "Spearman", "transformers", "torch", "Verdict:"):
            assert needle in text, needle
        for rec in records:
            assert f"Fact {rec.fact_id}" in text
    # One heatmap per fact plus the layer-effect plot, all inline.
    assert page.count("src='data:image/png;base64,") == len(records) + 1
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert md.count("](images/") == len(records) + 1
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_markdown_and_html_hold_the_same_sections_and_numbers(evaluated, sequential_records, tmp_path):
    _, _, _, records, traces, settings = evaluated
    for name, recs, tr in (("swept", records, traces), ("sequential", sequential_records, None)):
        paths = write_report(recs, tmp_path / name, settings, traces=tr)
        md, page = paths["md"].read_text(), paths["html"].read_text()
        assert_same_report(md, page)
        verdict = json.loads(paths["json"].read_text())["summary"]["verdict"]
        assert verdict and verdict in md and html.escape(verdict) in page
    # The sequential run's own sections made it into both.
    assert "Sequential editing" in parse_markdown(md)[0]
    assert "EasyEdit's own metrics (mean over the facts)" in parse_html(page)[0]
    assert page.count("src='data:image/png;base64,") == 1  # the sequential plot


def test_verdict_comes_first(sequential_records, tmp_path):
    paths = write_report(sequential_records, tmp_path, {"model": "m"})
    md = paths["md"].read_text()
    first = [line for line in md.splitlines()[2:] if line.strip()][0]  # after the marker line and the title
    assert first.startswith("**Verdict:** best layer choice by ROME score")
    assert md.index("Verdict:") < md.index("## Settings")
    page = paths["html"].read_text()
    assert page.index("Verdict:") < page.index("<h2 id='settings'>")


def test_summarize_runs_once_per_report(evaluated, count_summaries, tmp_path):
    _, _, _, records, traces, settings = evaluated
    paths = write_report(records, tmp_path, settings, traces=traces)
    assert count_summaries == [len(records)]
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is True and set(obj["summary"]["strategies"]) == {"traced", "fixed", "sweep best"}
    # An interval in the JSON summary is the one both reports show.
    low, high = obj["summary"]["strategies"]["traced"]["intervals"]["score"]
    shown = f"[{report.fmt(low)}, {report.fmt(high)}]"
    assert shown in paths["md"].read_text() and shown in paths["html"].read_text()


def test_results_json_after_each_fact_skips_the_bootstrap(evaluated, count_summaries, tmp_path):
    model, tok, facts, _, _, settings = evaluated
    written = []

    def finished(recs):
        written.append(json.loads(write_results_json(recs, tmp_path, settings, complete=False).read_text()))

    placements = place(facts, LayerRule("fixed", 1, (1,), 0.0, "test"))
    evaluate(model, tok, facts, FakeHParams(), placements, editor=BiasEditor(), generation=None,
             on_record=finished, progress=False)
    assert count_summaries == []
    assert [w["summary"]["n_facts"] for w in written] == [1, 2]
    for w in written:
        assert w["complete"] is False and w["summary"]["partial"] is True
        assert "strategies" not in w["summary"] and "intervals" not in json.dumps(w["summary"])
        assert w["summary"]["means"]["success"] == pytest.approx(
            sum(r["metrics"]["success"] for r in w["records"]) / len(w["records"]))


def test_results_json_complete_summary_once_or_given(sequential_records, count_summaries, tmp_path):
    obj = json.loads(write_results_json(sequential_records, tmp_path, {}).read_text())
    assert count_summaries == [3] and "partial" not in obj["summary"] and obj["summary"]["strategies"]
    given = {"n_facts": 3, "marker": "precomputed"}
    obj = json.loads(write_results_json(sequential_records, tmp_path, {}, summary=given).read_text())
    assert count_summaries == [3] and obj["summary"] == given


def test_html_escapes_a_script_in_a_fact(tmp_path):
    bad = "<script>alert('x')</script> & co"
    rec = _record(0, prompt=bad)
    paths = write_report([rec], tmp_path, {"model": "<i>m</i>"})
    page = paths["html"].read_text()
    assert "<script" not in page and "<i>" not in page and "Paris <b>" not in page
    assert html.escape(bad) in page and "in Paris &lt;b&gt;" in page and "&lt;i&gt;m&lt;/i&gt;" in page
    assert not {"script", "i"} & set(parse_html(page)[2])
    assert bad in paths["md"].read_text()  # the Markdown keeps the text as it is


def test_layer_line_shows_source_and_reason(evaluated, sequential_records, tmp_path):
    line = f"edited at layer 2 (traced: {REASON})"
    paths = write_report(sequential_records[:1], tmp_path / "hand", {})
    assert line in paths["md"].read_text() and html.escape(line) in paths["html"].read_text()
    given = _record(0, fixed_layer=1)
    given = EvalRecord.from_json({**given.to_json(), "layer_source": "given", "layer_reason": ""})
    assert report.layer_line(given).startswith("edited at layer 2 (given); fixed layer 1")
    # Records of a real traced run carry the rule's own reason.
    _, _, _, records, traces, settings = evaluated
    md = write_report(records, tmp_path / "run", settings, traces=traces)["md"].read_text()
    for rec in records:
        assert rec.layer_source in ("traced", "fallback") and rec.layer_reason
        assert f"edited at layer {rec.layer} ({rec.layer_source}: {rec.layer_reason})" in md


def test_results_json_reads_back(evaluated, tmp_path):
    _, _, _, records, traces, settings = evaluated
    paths = write_report(records, tmp_path, settings, traces=traces)
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is True and obj["error"] is None
    assert obj["settings"]["versions"]["torch"]
    assert obj["summary"]["n_facts"] == 2
    settings_back, records_back = load_results(paths["json"])
    assert records_back == records
    assert settings_back["model"] == "tiny-gpt2"


def test_partial_report_after_failing_editor(evaluated, count_summaries, tmp_path):
    model, tok, facts, _, _, settings = evaluated
    facts3 = facts + [Fact(**{**FACT.to_json(), "id": "f2"})]
    placements = place(facts3, LayerRule("fixed", 1, (1,), 0.0, "test"))
    with pytest.raises(EvaluationError) as info:
        evaluate(model, tok, facts3, FakeHParams(), placements, editor=BiasEditor(fail_on=2), generation=None,
                 progress=False)
    paths = write_report(info.value.records, tmp_path, settings, error=str(info.value))
    assert count_summaries == [1]
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is False and obj["summary"]["strategies"]  # the full summary of what finished
    assert [r["fact_id"] for r in obj["records"]] == ["f0"]
    assert "editor broke on f1" in obj["error"]
    md = paths["md"].read_text()
    assert "> **Run stopped with an error:**" in md and "### Fact f0" in md and "### Fact f1" not in md
    assert "editor broke on f1" in paths["html"].read_text()


def test_terminal_lines_read_the_summary(sequential_records, capsys):
    summary = report.summarize(sequential_records)
    line = edit_summary_line(summary, "double", "traced")
    assert line.startswith("3 edits (double, layers traced: [2]): success 33.3% [95% interval")
    assert "EasyEdit's own metrics (post): locality 0.500, rewrite_acc 1.000" in line
    assert "sequential, after the last of 3 edits: retention 100.0% of 1" in line
    report.print_summary(sequential_records, summary=summary)
    out = capsys.readouterr().out
    assert "fact s0:" in out and f"verdict: {summary['verdict']}" in out
    assert "efficacy 0.00 -> 1.00" in out and "traced: efficacy 1.000 [1.000, 1.000]" in out
