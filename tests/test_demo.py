"""The pipeline orchestration: report written as facts finish and after a failure; CLI eval; the shipped demo."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_model, params_hash
from rome_locate.pipeline import run_pipeline
from rome_locate.trace import TraceSettings
from rome_locate.outcome import EvaluationError
from rome_locate.facts import Fact
from rome_locate.locate import locate
from test_evaluate import FACT, ContextEditor, FakeHParams, bias_edit, failing_on


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    """A tiny GPT-2 and three facts."""
    model = build_tiny_model("gpt2", len(tiny_tokenizer), n_layers=4)
    facts = [Fact(**{**FACT.to_json(), "id": f"f{i}"}) for i in range(3)]
    return model, tiny_tokenizer, facts


def test_pipeline_writes_report_and_keeps_weights(tiny, tmp_path):
    model, tok, facts = tiny
    before = params_hash(model)
    located = locate(model, tok, facts[:2], TraceSettings(samples=3, window=2, noise=0.5, full=True), progress=False)
    records, paths = run_pipeline(model, tok, facts[:2], FakeHParams(layers=[1]), tmp_path, model_name="tiny",
                                  layers="traced", sweep=True, located=located, editor=ContextEditor(bias_edit),
                                  progress=False)
    assert params_hash(model) == before
    assert [r.fact_id for r in records] == ["f0", "f1"]
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is True and len(obj["records"]) == 2
    assert obj["settings"]["trace"]["samples"] == 3 and obj["settings"]["wall_time_s"] > 0
    assert obj["settings"]["model_fingerprint"]["model_type"] == "gpt2"
    page = paths["html"].read_text()
    assert page.count("src='data:image/png;base64,") == 3  # two heatmaps and the sweep plot


def test_pipeline_failure_leaves_partial_report(tiny, tmp_path):
    model, tok, facts = tiny
    before = params_hash(model)
    with pytest.raises(EvaluationError, match="editor broke on f2"):
        run_pipeline(model, tok, facts, FakeHParams(), tmp_path, model_name="tiny", layers="fixed",
                     editor=ContextEditor(failing_on(3)), progress=False)
    assert params_hash(model) == before
    obj = json.loads((tmp_path / "results.json").read_text())
    assert obj["complete"] is False
    assert [r["fact_id"] for r in obj["records"]] == ["f0", "f1"]
    assert "editor broke on f2" in obj["error"]
    md = (tmp_path / "report.md").read_text()
    assert "Run stopped with an error" in md and "### Fact f1" in md and "### Fact f2" not in md


def _counterfact(fact: Fact) -> dict:
    return {"case_id": fact.id, "requested_rewrite": {
        "prompt": fact.prompt.replace(fact.subject, "{}"), "subject": fact.subject, "relation_id": fact.relation_id,
        "target_true": {"str": fact.target}, "target_new": {"str": fact.target_new}},
        "paraphrase_prompts": list(fact.rephrase_prompts), "neighborhood_prompts": list(fact.locality_prompts)}


@pytest.fixture
def saved(tiny, tmp_path):
    """The tiny model saved as a model directory, its facts as CounterFact JSON and hyperparameters at layer 1."""
    from rome_locate.hparams import generate_hparams, write_hparams

    model, tok, facts = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps([_counterfact(f) for f in facts]))
    write_hparams(generate_hparams(model, None, 1, model_name=str(tmp_path / "model"), v_num_grad_steps=3,
                                   context_template_length_params=[[5, 5]]), tmp_path / "hp.yaml")
    return tmp_path


def test_cli_eval_end_to_end(saved, tmp_path, capsys):
    from rome_locate import cli

    out = tmp_path / "out"
    rc = cli.main(["eval", "--model", str(tmp_path / "model"), "--device", "cpu", "--facts", str(tmp_path / "cf.json"),
                   "--hparams", str(tmp_path / "hp.yaml"), "--layers", "traced", "--sweep", "--limit", "2",
                   "--samples", "3", "--noise", "0.5", "--generation", "beam", "--num-beams", "2",
                   "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    obj = json.loads((out / "results.json").read_text())
    assert [r["fact_id"] for r in obj["records"]] == ["f0", "f1"]
    assert all(r["layer_source"] == "traced" and len(r["sweep"]) == 4 for r in obj["records"])
    assert obj["records"][0]["metrics"]["locality"] is not None
    assert obj["settings"]["generation"]["mode"] == "beam"
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert "wrote" in capsys.readouterr().out

    rc = cli.main(["eval", "--model", str(tmp_path / "model"), "--facts", str(tmp_path / "missing.json"),
                   "--hparams", str(tmp_path / "hp.yaml"), "--out", str(out)])
    assert rc == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_eval_checks_the_yaml_layer_before_any_work(tiny, tmp_path, capsys):
    from rome_locate import cli
    from rome_locate.hparams import generate_hparams, write_hparams

    model, tok, facts = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "cf.json").write_text(json.dumps([_counterfact(f) for f in facts]))
    big = build_tiny_model("gpt2", len(tok), n_layers=12)  # a YAML written for a deeper model
    write_hparams(generate_hparams(big, None, 9, model_name=str(tmp_path / "model")), tmp_path / "hp.yaml")
    out = tmp_path / "out"
    for command in ("eval", "edit"):
        rc = cli.main([command, "--model", str(tmp_path / "model"), "--device", "cpu", "--facts",
                       str(tmp_path / "cf.json"), "--hparams", str(tmp_path / "hp.yaml"), "--layers", "traced",
                       "--out", str(out)] + (["--no-progress"] if command == "eval" else ["--quiet"]))
        assert rc == 2
        assert "layer 9 out of range: the model has 4 layers (0..3)" in capsys.readouterr().err
        assert not (out / "locate.jsonl").exists() and not (out / "results.json").exists()


def test_cli_eval_and_edit_sequential(saved, tmp_path, capsys):
    from rome_locate import cli

    common = ["--model", str(tmp_path / "model"), "--device", "cpu", "--facts", str(tmp_path / "cf.json"),
              "--hparams", str(tmp_path / "hp.yaml"), "--sequential"]
    assert cli.main(["eval", *common, "--max-new-tokens", "3", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    obj = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert obj["settings"]["sequential"] is True and obj["summary"]["sequential"]["n_edits"] == 3
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Sequential editing" in page and "alt='metrics against the number of edits'" in page
    assert (tmp_path / "eval" / "images" / "sequential_edits.png").is_file()
    capsys.readouterr()
    assert cli.main(["edit", *common, "--out", str(tmp_path / "edit"), "--quiet"]) == 0
    assert "sequential, after the last of 3 edits: retention" in capsys.readouterr().out


def test_demo_on_shipped_fact_model(tmp_path, capsys):
    from rome_locate.demo import run_demo
    from rome_locate.fact_models import load_fact_model

    model, tok = load_fact_model("gpt2")
    before = params_hash(model)
    paths = run_demo(tmp_path, family="gpt2", n_facts=1, progress=False, model_and_tok=(model, tok))
    assert params_hash(model) == before
    printed = capsys.readouterr().out
    assert "[5/5] wrote" in printed and "before:" in printed and "after:" in printed
    obj = json.loads(paths["json"].read_text())
    assert obj["complete"] is True
    [rec] = obj["records"]
    n_layers = model.config.n_layer
    # The demo edits with the shipped validated YAML, at its layer, and says so.
    from rome_locate.demo import shipped_hparams_path
    from rome_locate.hparams import read_config

    yaml_layer = read_config(shipped_hparams_path("gpt2"))["layers"][0]
    assert rec["layer_source"] == "fixed" and len(rec["sweep"]) == n_layers
    assert rec["layer"] == rec["fixed_layer"] == yaml_layer
    assert obj["settings"]["demo"]["hparams_source"].startswith("hparams/ROME/fact-gpt2.yaml (validated")
    assert obj["settings"]["hparams"]["v_num_grad_steps"] == read_config(shipped_hparams_path("gpt2"))["v_num_grad_steps"]
    assert "hparams/ROME/fact-gpt2.yaml (validated" in printed
    # The fact model knows the fact: before the edit the true object beats the new one.
    assert rec["metrics"]["efficacy_score_pre"] == 0.0 and rec["metrics"]["p_true_pre"] > 0.5
    assert rec["metrics"]["p_new"] != rec["metrics"]["p_new_pre"]  # the edit did something, and was undone
    edited = next(s for s in rec["sweep"] if s["layer"] == rec["layer"])
    best = next(s for s in rec["sweep"] if s["layer"] == rec["best_layer"])
    assert edited["efficacy_magnitude"] == pytest.approx(rec["metrics"]["efficacy_magnitude"])
    assert (best["score"], best["efficacy_magnitude"]) >= (edited["score"], edited["efficacy_magnitude"])
    assert [g["group"] for g in rec["generations"]][:1] == ["edit"] and all(g["before"] for g in rec["generations"])
    # Issue 20: portability (by key) and the generation metrics, in the record, the summary and the report.
    assert {"portability", "portability.other_phrasing", "portability.hard_paraphrase", "gen_efficacy",
            "gen_efficacy_pre", "gen_paraphrase", "gen_paraphrase_pre"} <= set(rec["metrics"])
    assert rec["metrics"]["gen_efficacy_pre"] == 0.0  # the model says the true object before the edit
    assert {"portability", "gen_efficacy", "gen_paraphrase"} <= set(obj["summary"]["intervals"])
    md = paths["md"].read_text()
    assert "| gen_efficacy |" in md and "| portability.other_phrasing |" in md
    assert "EasyEdit portability [hard_paraphrase]" in md
    page = paths["html"].read_text()
    assert page.count("src='data:image/png;base64,") == 2  # the fact's heatmap and the sweep plot


def test_demo_without_the_validated_yaml_says_so(tmp_path, monkeypatch):
    # A non-editable install has no hparams/ folder: the demo stops before any work, naming the file.
    from rome_locate import demo

    monkeypatch.setattr(demo, "shipped_hparams_path", lambda family: tmp_path / "hparams" / f"fact-{family}.yaml")
    with pytest.raises(FileNotFoundError, match="fact-gpt2.yaml"):
        demo.run_demo(tmp_path / "out", family="gpt2", n_facts=1, progress=False, quiet=True)
    assert not (tmp_path / "out").exists()
