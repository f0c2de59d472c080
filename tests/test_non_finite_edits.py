"""An edit that makes the model non-finite is an error naming the fact and what became non-finite, never a
failed edit averaged as zeros; a model that is non-finite before any edit says so (issue 21, item 7)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model

from rome_locate import cli, rome
from rome_locate.choose import LayerDecision, Placement
from rome_locate.evaluate import evaluate, evaluate_fact
from rome_locate.fact_models import counterfact_path, fact_model_dir, load_fact_model
from rome_locate.facts import Fact
from rome_locate.hparams import bind_model, load_hparams
from rome_locate.outcome import EvaluationError
from rome_locate.validate import ValidationError, usable_facts

M = fact_model_dir("gpt2")
HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "ROME" / "fact-gpt2.yaml"
FACT = Fact(prompt="Kepwyn Poxberg was born in the city of", subject="Kepwyn Poxberg", target="Rome",
            target_new="Paris", id="k0")


@pytest.fixture(scope="module")
def fact_gpt2():
    model, tok = load_fact_model("gpt2")
    return model, tok, bind_model(load_hparams(str(HPARAMS), easyedit=False), str(M))


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_nan_in_a_mom2_file_stops_edit_with_the_fact_and_the_file(tmp_path, capsys):
    stats = tmp_path / "stats"
    shutil.copytree(M / "stats", stats)
    [npz] = (stats / "gpt2" / "self_sample_stats").glob("transformer.h.1.mlp.c_proj_*.npz")
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["mom2.mom2"] = arrays["mom2.mom2"].copy()
    arrays["mom2.mom2"][3, 3] = np.nan
    np.savez(npz, **arrays)
    yaml = tmp_path / "h.yaml"
    yaml.write_text(HPARAMS.read_text().replace("stats_dir: ./rome_locate/fact_models/gpt2/stats",
                                                f"stats_dir: {stats}"))
    out = tmp_path / "out"
    code = cli.main(["edit", "--model", str(M), "--facts", str(counterfact_path("gpt2")), "--limit", "2",
                     "--hparams", str(yaml), "--device", "cpu", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("rome-locate edit: error:")]
    assert len(errors) == 1 and "evaluation failed on fact" in errors[0]
    assert "non-finite" in errors[0] and "mom2" in errors[0] and str(npz) in errors[0]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and "non-finite" in results["error"]


def test_a_non_finite_v_star_stops_the_evaluation_and_restores(fact_gpt2, monkeypatch):
    model, tok, h = fact_gpt2
    real = rome.compute_value

    def exploding(*args, **kwargs):  # what v_lr: .inf does to the optimisation
        value, info = real(*args, **kwargs)
        return torch.full_like(value, float("inf")), info

    monkeypatch.setattr(rome, "compute_value", exploding)
    before = _weights(model)
    placement = Placement(LayerDecision(1, "fixed", "the hyperparameters' layer"), fallback=1)
    with pytest.raises(EvaluationError, match="fact 'k0'.*v\\*.*non-finite.*v_lr") as info:
        evaluate(model, tok, [FACT], h, [placement], generation=None, progress=False)
    assert info.value.records == [] and _unchanged(model, before)


class _NanEditor:
    """An editor whose edit leaves NaN in the rewrite module's weight (what a broken editor or update does)."""

    name = "nan"

    @contextlib.contextmanager
    def edited(self, model, tok, fact, hparams):
        name = hparams.rewrite_module_tmp.format(hparams.layers[0]) + ".weight"
        weight = model.get_parameter(name)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[0, 0] = float("nan")
        try:
            yield None
        finally:
            with torch.no_grad():
                weight.copy_(saved)


def test_any_editor_that_makes_the_outputs_non_finite_is_named(fact_gpt2):
    model, tok, h = fact_gpt2
    before = _weights(model)
    with pytest.raises(ValueError, match="fact 'k0'.*non-finite.*transformer.h.1.mlp.c_proj.weight"):
        evaluate_fact(model, tok, FACT, h, generation=None, editor=_NanEditor())
    assert _unchanged(model, before)


def _nan_model(tiny_tokenizer):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    with torch.no_grad():
        model.get_parameter("transformer.h.1.mlp.c_fc.weight")[0, 0] = float("nan")
    return model


def test_known_facts_of_a_nan_model_name_the_nan_not_an_unknown_fact(tiny_tokenizer):
    facts = [Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", id="m1"),
             Fact(prompt="Alma Berridge speaks the language of", subject="Alma Berridge", target="French", id="a1")]
    with pytest.raises(ValidationError, match="non-finite.*'m1'.*--dtype") as info:
        usable_facts(_nan_model(tiny_tokenizer), tiny_tokenizer, facts, 0.5)
    assert "float16" in str(info.value) and "is known by the model" not in str(info.value)


def test_hparams_on_a_nan_model_names_the_nan(tmp_path, capsys, tiny_tokenizer):
    path = tmp_path / "nan_model"
    _nan_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Miles Davis plays the", "subject": "Miles Davis", "target": "trumpet", "id": "m1"}\n')
    out = tmp_path / "h.yaml"
    code = cli.main(["hparams", "--model", str(path), "--facts", str(facts), "-o", str(out), "--device", "cpu",
                     "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "non-finite" in errors[0] and "--dtype" in errors[0], errors
    assert not out.exists()
