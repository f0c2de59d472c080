"""Hand-off: the edited() context manager, edit_facts and its results.json, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import SENTENCES, build_tiny_model
from rome_locate.choose import LayerChoice
from rome_locate.edit import EditOutcome, edit_facts, edited
from rome_locate.facts import Fact
from rome_locate.hooks import hook_count
from rome_locate.hparams import generate_hparams

FACTS = [
    Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
         target_new="Paris", rephrase_prompts=("Dorven Kaltmoor was born in the city of",),
         locality_prompts=("Alma Berridge speaks the language of", "Miles Davis plays the"),
         locality_answers=("French",), id="needle"),
    Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", target_new="nurse", id="miles"),
]


def _hp(model, layer=1, **kw):
    kw.setdefault("context_template_length_params", [[5, 5]])
    kw.setdefault("v_num_grad_steps", 2)
    return generate_hparams(model, None, layer, "tiny", **kw)


@pytest.fixture
def gpt2(tiny_tokenizer):
    return build_tiny_model("gpt2", len(tiny_tokenizer), n_layers=4), tiny_tokenizer


def test_edited_restores_even_when_the_body_raises(gpt2):
    model, tok = gpt2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "transformer.h.2.mlp.c_proj.weight"
    with pytest.raises(KeyError, match="boom"):
        with edited(model, tok, FACTS[0], _hp(model, layer=2)) as m:
            assert not torch.equal(m.get_parameter(name), before[name])
            raise KeyError("boom")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="editor"):
        with edited(model, tok, FACTS[0], _hp(model), editor="memit"):
            pass


def test_edit_facts_writes_results(gpt2, tmp_path):
    model, tok = gpt2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    outcomes = edit_facts(model, tok, FACTS, _hp(model, layer=2), out_dir=tmp_path / "run", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [o["fact_id"] for o in data["outcomes"]] == ["needle", "miles"]
    assert data["summary"]["n"] == 2 and data["hparams"]["layers"] == [2] and data["layers"] == "fixed"
    o = EditOutcome.from_json(data["outcomes"][0])
    assert o == outcomes[0] and o.layer == 2 and o.layer_source == "fixed" and o.editor == "builtin"
    assert 0.0 <= o.p_new_before <= 1.0 and 0.0 <= o.p_new_after <= 1.0 and o.p_true_before is not None
    assert set(o.metrics["pre"]) == {"rewrite_acc", "rephrase_acc"}
    assert set(o.metrics["post"]) == {"rewrite_acc", "rephrase_acc", "locality"}
    assert 0.0 <= o.metrics["post"]["locality"] <= 1.0
    assert outcomes[1].metrics["post"]["rephrase_acc"] is None  # no rephrase prompts
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_traced_layers_from_choices(gpt2, tmp_path):
    model, tok = gpt2
    choices = [LayerChoice("needle", 0, "mlp", 0.1, 1, 0.05), LayerChoice("miles", 3, "mlp", 0.2, 2, 0.1)]
    outcomes = edit_facts(model, tok, FACTS, _hp(model, layer=2), layers="traced", choices=choices, progress=False)
    assert [(o.layer, o.layer_source) for o in outcomes] == [(0, "traced"), (3, "traced")]
    outcomes = edit_facts(model, tok, FACTS, _hp(model, layer=2), choices={"needle": 1, "miles": 1}, progress=False)
    assert [(o.layer, o.layer_source) for o in outcomes] == [(1, "given"), (1, "given")]
    with pytest.raises(ValueError, match="2 layer choices for 1 facts"):
        edit_facts(model, tok, FACTS[:1], _hp(model), layers="traced", choices=choices, progress=False)
    with pytest.raises(ValueError, match="given for fact"):
        edit_facts(model, tok, FACTS[::-1], _hp(model), layers="traced", choices=choices, progress=False)


def test_traced_locates_when_no_choices(gpt2):
    model, tok = gpt2
    outcomes = edit_facts(model, tok, FACTS[:1], _hp(model), layers="traced", progress=False)
    assert outcomes[0].layer_source == "traced" and 0 <= outcomes[0].layer < 4


def test_missing_mom2_is_computed_from_a_corpus(gpt2, tmp_path):
    model, tok = gpt2
    h = _hp(model, layer=2, mom2_adjustment=True, stats_dir=str(tmp_path / "none"), mom2_dataset="c",
            mom2_n_samples=10)
    with pytest.raises(FileNotFoundError, match="mom2 statistics missing for layers \\[1, 2\\]"):
        edit_facts(model, tok, FACTS, h, choices=[1, 2], progress=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES))
    out = edit_facts(model, tok, FACTS, h, choices=[1, 2], progress=False, out_dir=tmp_path / "o", mom2_corpus=corpus)
    assert [o.layer for o in out] == [1, 2]
    assert len(list((tmp_path / "o" / "stats").rglob("*_float32_mom2_10.npz"))) == 2


def test_bad_inputs(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="no target_new"):
        edit_facts(model, tok, [dataclasses.replace(FACTS[0], target_new=None)], _hp(model), progress=False)
    with pytest.raises(ValueError, match="layers must be"):
        edit_facts(model, tok, FACTS, _hp(model), layers="sweep", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        edit_facts(model, tok, FACTS, _hp(model), choices=[7, 7], progress=False)


def test_cli_stats_hparams_edit(tiny_tokenizer, tmp_path):
    from rome_locate.cli import main

    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=4)
    mdir = tmp_path / "tiny-llama"
    model.save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([f.to_json() for f in FACTS]))
    assert main(["stats", "--model", str(mdir), "--device", "cpu", "--corpus", str(corpus), "--layers", "1", "2",
                 "--stats-dir", str(tmp_path / "stats"), "--mom2-dataset", "c", "--n-samples", "20"]) == 0
    assert (tmp_path / "stats" / "tiny-llama" / "c_stats" / "model.layers.1.mlp.down_proj_float32_mom2_20.npz").is_file()
    out = tmp_path / "h.yaml"
    assert main(["hparams", "--model", str(mdir), "--device", "cpu", "--facts", str(facts), "-o", str(out),
                 "--samples", "2", "--quiet", "--no-validate", "--set", f"stats_dir={tmp_path / 'stats'}", "mom2_dataset=c",
                 "mom2_n_samples=20", "v_num_grad_steps=2", "context_template_length_params=[[4, 5]]"]) == 0
    text = out.read_text()
    assert "# facts: " in text and "mean effect per layer" in text and "v_loss_layer: 3" in text
    assert main(["edit", "--model", str(mdir), "--device", "cpu", "--facts", str(facts), "--hparams", str(out),
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(data["outcomes"]) == 2 and data["hparams"]["model_name"] == str(mdir)
    assert main(["edit", "--model", str(mdir), "--device", "cpu", "--facts", str(facts), "--hparams",
                 str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run2")]) == 2


def test_import_easyedit_stubs_only_during_the_import(tmp_path, monkeypatch):
    """A fake EasyEdit whose __init__ needs a missing package and a torchvision that raises on load."""
    import sys

    from rome_locate import edit as edit_mod

    pkg = tmp_path / "clone" / "easyeditor"
    (pkg / "models" / "rome").mkdir(parents=True)
    (pkg / "editors").mkdir()
    (pkg / "__init__.py").write_text("import some_multimodal_extra\nfrom some_multimodal_extra.sub import Thing\n"
                                     "import torchvision\nVALUE = 42\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "rome" / "__init__.py").write_text("")
    (pkg / "editors" / "__init__.py").write_text("")
    (pkg / "editors" / "editor.py").write_text("class BaseEditor:\n    pass\n")
    fake_tv = tmp_path / "tv"
    (fake_tv / "torchvision").mkdir(parents=True)
    (fake_tv / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("easyeditor", "torchvision")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake_tv))
    try:
        with pytest.raises(ImportError, match="some_multimodal_extra"):
            edit_mod.import_easyedit(tmp_path / "clone", stub_missing=False)
        for name in [k for k in sys.modules if k.startswith("easyeditor")]:
            del sys.modules[name]
        module = edit_mod.import_easyedit(tmp_path / "clone")
        assert module.VALUE == 42
        assert edit_mod.stubbed_modules() == ["some_multimodal_extra", "torchvision"]
        # The stand-ins are gone once EasyEdit is imported.
        assert "some_multimodal_extra" not in sys.modules and "torchvision" not in sys.modules
        with pytest.raises(ModuleNotFoundError):
            __import__("some_multimodal_extra")
        for name in [k for k in sys.modules if k.startswith("easyeditor")]:
            del sys.modules[name]
        with pytest.raises(ImportError, match="no easyeditor"):
            edit_mod.import_easyedit(tmp_path / "nowhere")
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] in ("easyeditor", "torchvision")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_easyedit_request_format():
    from rome_locate.edit import easyedit_request

    r = easyedit_request(FACTS[0])
    assert r["prompt"] == FACTS[0].prompt and r["subject"] == "The Space Needle"
    assert r["target_new"] == "Paris" and r["ground_truth"] == "Seattle"  # no leading space: EasyEdit adds it
    assert r["rephrase_prompt"] == "Dorven Kaltmoor was born in the city of"
    # Only locality prompts with a known answer are scored.
    assert r["locality"] == {"neighborhood": {"prompt": ["Alma Berridge speaks the language of"],
                                              "ground_truth": ["French"]}}
    assert "rephrase_prompt" not in easyedit_request(FACTS[1]) and easyedit_request(FACTS[1])["locality"] == {}
