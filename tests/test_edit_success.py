"""An edit counts as a success only when it could change the answer (issue 21, item 10): a fact without a
target whose target_new the unedited model already predicts is not an edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rome_locate import cli
from rome_locate.evaluate import evaluate_fact
from rome_locate.fact_models import fact_model_dir, load_fact_model
from rome_locate.facts import Fact
from rome_locate.hparams import bind_model, load_hparams
from rome_locate.pipeline import edit_facts

M = fact_model_dir("gpt2")
HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "ROME" / "fact-gpt2.yaml"
PROMPT = "Kepwyn Poxberg was born in the city of"  # the fact model answers " Rome"
PREDICTED = Fact(prompt=PROMPT, subject="Kepwyn Poxberg", target_new="Rome", id="predicted")
REAL = Fact(prompt=PROMPT, subject="Kepwyn Poxberg", target_new="Paris", id="real")


@pytest.fixture(scope="module")
def fact_gpt2():
    model, tok = load_fact_model("gpt2")
    return model, tok, bind_model(load_hparams(str(HPARAMS), easyedit=False), str(M))


def test_the_model_already_predicting_target_new_without_a_target_is_not_an_edit(fact_gpt2):
    model, tok, h = fact_gpt2
    with pytest.raises(ValueError, match="fact 'predicted'.*no target.*already predicts target_new 'Rome'"):
        evaluate_fact(model, tok, PREDICTED, h, generation=None)
    with pytest.raises(ValueError, match="fact 'predicted'.*already predicts target_new 'Rome'.*--skip-errors"):
        edit_facts(model, tok, [REAL, PREDICTED], h, progress=False)
    with pytest.warns(UserWarning, match="skipped: fact 'predicted'"):
        records = edit_facts(model, tok, [REAL, PREDICTED], h, progress=False, skip_errors=True)
    assert [r.fact_id for r in records] == ["real"]
    assert records[0].metrics["success_pre"] == 0.0


def test_cli_edit_names_the_fact_and_skip_errors_skips_it(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f.to_json()) + "\n" for f in (REAL, PREDICTED)))
    argv = ["edit", "--model", str(M), "--facts", str(facts), "--hparams", str(HPARAMS), "--device", "cpu",
            "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "fact 'predicted'" in errors[0] and "already predicts" in errors[0]
    assert cli.main(argv + ["--skip-errors"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["fact_id"] for r in results["records"]] == ["real"]
