"""Report files: every section present, pictures embedded in the HTML, JSON that reads back, partial reports."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_model
from rome_locate.evaluate import EvaluationError, evaluate
from rome_locate.facts import Fact
from rome_locate.report import load_results, run_settings, write_report
from rome_locate.trace import TraceSettings, trace_fact
from test_evaluate import FACT, FakeHParams, bias_edit, failing_on


@pytest.fixture(scope="module")
def evaluated(tiny_tokenizer):
    """Two facts traced (full tables) and evaluated with a layer sweep on a tiny GPT-2."""
    tok = tiny_tokenizer
    model = build_tiny_model("gpt2", len(tok), n_layers=4)
    facts = [FACT, Fact(**{**FACT.to_json(), "id": "f1", "prompt": "Alma Berridge speaks the language of",
                           "subject": "Alma Berridge"})]
    traces = [trace_fact(model, tok, f, TraceSettings(samples=3, window=2, noise=0.5, full=True)) for f in facts]

    class Choice:  # what `choose_layer` returns, reduced to what the harness reads
        def __init__(self, fact_id, layer, margin):
            self.fact_id, self.layer, self.margin = fact_id, layer, margin

    located = [(t, Choice(t.fact_id, max(range(4), key=lambda i: t.scores[i]), 0.01)) for t in traces]
    records = evaluate(model, tok, facts, FakeHParams(layers=[1]), layers="traced", located=located, sweep=True,
                       edit_context=bias_edit, progress=False)
    settings = run_settings(model="tiny-gpt2", trace_settings=TraceSettings(samples=3, noise=0.5), seed=0,
                            layers="traced", sweep=True, editor="test-double", wall_time_s=1.5)
    return model, tok, facts, records, traces, settings


def test_report_has_every_section(evaluated, tmp_path):
    _, _, facts, records, traces, settings = evaluated
    paths = write_report(records, tmp_path, settings, traces=traces)
    md = paths["md"].read_text()
    page = paths["html"].read_text()
    for text in (md, page):
        for section in ("Settings", "Summary", "Mean of every metric", "Traced vs fixed vs sweep",
                        "Layer effect vs edit success", "Generations", "Metrics", "Layer sweep",
                        "EasyEdit locality", "efficacy score", "Spearman"):
            assert section in text, section
        for rec in records:
            assert f"Fact {rec.fact_id}" in text
            assert rec.generations[0].after.strip()[:10].replace("<", "&lt;") in text or not rec.generations[0].after.strip()
        assert "transformers" in text and "torch" in text
    # One heatmap per fact plus the layer-effect plot, all inline.
    assert page.count("src='data:image/png;base64,") == len(records) + 1
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert md.count("](images/") == len(records) + 1
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_results_json_reads_back(evaluated, tmp_path):
    _, _, _, records, traces, settings = evaluated
    paths = write_report(records, tmp_path, settings, traces=traces)
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is True and obj["error"] is None
    assert obj["settings"]["versions"]["torch"]
    assert obj["summary"]["n_facts"] == 2
    assert set(obj["summary"]["strategies"]) == {"traced", "fixed", "sweep best"}
    settings_back, records_back = load_results(paths["json"])
    assert records_back == records
    assert settings_back["model"] == "tiny-gpt2"


def test_partial_report_after_failing_editor(evaluated, tmp_path):
    model, tok, facts, _, _, settings = evaluated
    facts3 = facts + [Fact(**{**FACT.to_json(), "id": "f2"})]
    try:
        evaluate(model, tok, facts3, FakeHParams(), edit_context=failing_on(2), progress=False)
    except EvaluationError as exc:
        paths = write_report(exc.records, tmp_path, settings, error=str(exc))
    else:
        pytest.fail("the failing editor did not fail")
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is False
    assert [r["fact_id"] for r in obj["records"]] == ["f0"]
    assert "editor broke on f1" in obj["error"]
    assert "Run stopped with an error" in paths["md"].read_text()
    assert "editor broke on f1" in paths["html"].read_text()
