"""Hand-off: the edited() context manager, `edit` (the pipeline without generations and sweep), its results.json,
layer choices matched by position, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, build_tiny_model
from rome_locate.choose import LayerChoice
from rome_locate.arch import LayerRangeError
from rome_locate.edit import edited
from rome_locate.outcome import EvalRecord
from test_evaluate import ContextEditor
from rome_locate.facts import Fact, neighbours
from rome_locate.pipeline import edit_facts
from rome_locate.hooks import hook_count
from rome_locate.hparams import generate_hparams
from rome_locate.trace import TraceSettings

FACTS = [
    Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
         target_new="Paris", rephrase_prompts=("Dorven Kaltmoor was born in the city of",),
         locality=neighbours(("Alma Berridge speaks the language of", "Miles Davis plays the"), ("French",)),
         id="needle"),
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
    from rome_locate.editors import EDITORS, BuiltinRome, make_editor

    with pytest.raises(ValueError, match="editor must be one of \\('builtin', 'easyedit'\\), got 'memit'"):
        make_editor("memit", model, tok, _hp(model))
    assert isinstance(make_editor("builtin", model, tok, _hp(model), seed=3), BuiltinRome)
    assert set(EDITORS) == {"builtin", "easyedit"}


def test_edit_facts_writes_results(gpt2, tmp_path):
    model, tok = gpt2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    outcomes = edit_facts(model, tok, FACTS, _hp(model, layer=2), out_dir=tmp_path / "run", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [o["fact_id"] for o in data["records"]] == ["needle", "miles"]
    assert data["summary"]["n_facts"] == 2 and data["settings"]["hparams"]["layers"] == [2]
    assert data["settings"]["layers"] == "fixed" and data["complete"] is True
    o = EvalRecord.from_json(data["records"][0])
    assert o == outcomes[0] and o.layer == 2 and o.layer_source == "fixed" and o.editor == "builtin"
    # Generations and the sweep are off in `edit`.
    assert o.generations == () and o.sweep == ()
    assert 0.0 <= o.metrics["p_new_pre"] <= 1.0 and 0.0 <= o.metrics["p_new"] <= 1.0 and o.metrics["p_true_pre"] is not None
    assert {"rewrite_acc", "rewrite_acc_pre", "rephrase_acc", "rephrase_acc_pre", "locality", "success"} <= set(o.metrics)
    assert 0.0 <= o.metrics["locality"] <= 1.0 and o.metrics["success"] in (0.0, 1.0)
    assert outcomes[1].metrics["rephrase_acc"] is None  # no rephrase prompts
    assert data["summary"]["success_rate"] == pytest.approx(sum(r.success for r in outcomes) / 2)
    assert data["summary"]["post_rewrite_acc"] == pytest.approx(sum(r.metrics["rewrite_acc"] for r in outcomes) / 2)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_layers_given_by_hand_and_choices_without_traces(gpt2, tmp_path):
    model, tok = gpt2
    outcomes = edit_facts(model, tok, FACTS, _hp(model, layer=2), located=[1, 3], progress=False)
    assert [(o.layer, o.layer_source) for o in outcomes] == [(1, "given"), (3, "given")]
    # A bare LayerChoice has no effects for the layer rule to read: an error, never its raw argmax.
    choices = [LayerChoice("needle", 0, "mlp", 0.1, 1, 0.05), LayerChoice("miles", 3, "mlp", 0.2, 2, 0.1)]
    with pytest.raises(ValueError, match="carries no trace"):
        edit_facts(model, tok, FACTS, _hp(model, layer=2), layers="traced", located=choices, progress=False)
    with pytest.raises(ValueError, match="2 layer choices for 1 facts"):
        edit_facts(model, tok, FACTS[:1], _hp(model), located=[1, 2], progress=False)
    with pytest.raises(ValueError, match="given for fact 'miles': 7 out of range"):
        edit_facts(model, tok, FACTS, _hp(model), located=[1, 7], progress=False)


def test_traced_layers_attach_by_position_without_unique_ids(gpt2):
    """Facts without ids (or with one case_id) traced 2, 2, 1, 1 are edited at 2, 2, 1, 1, not all at one layer."""
    from types import SimpleNamespace

    model, tok = gpt2
    facts = [dataclasses.replace(FACTS[0], id="") for _ in range(4)]
    located = [(SimpleNamespace(fact_id="", effects=tuple(0.5 if i == layer else 0.0 for i in range(4))), None)
               for layer in (2, 2, 1, 1)]
    records = edit_facts(model, tok, facts, _hp(model), layers="traced", located=located, progress=False)
    assert [r.layer for r in records] == [2, 2, 1, 1]


def test_traced_locates_when_no_choices(gpt2):
    model, tok = gpt2
    outcomes = edit_facts(model, tok, FACTS[:1], _hp(model), layers="traced", progress=False,
                          trace_settings=TraceSettings(samples=2, noise=0.5))
    # The rule's decision: a traced candidate below the last layer, or the hyperparameters' layer as fallback.
    o = outcomes[0]
    assert (o.layer_source, o.layer) in {("traced", l) for l in range(3)} | {("fallback", 1)}
    assert o.layer == o.traced_layer and o.effects is not None and o.layer_reason


def test_missing_mom2_is_computed_from_a_corpus(gpt2, tmp_path):
    model, tok = gpt2
    h = _hp(model, layer=2, mom2_adjustment=True, stats_dir=str(tmp_path / "none"), mom2_dataset="c",
            mom2_n_samples=10)
    with pytest.raises(FileNotFoundError, match="mom2 statistics missing for layers \\[1, 2\\]"):
        edit_facts(model, tok, FACTS, h, located=[1, 2], progress=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES))
    out = edit_facts(model, tok, FACTS, h, located=[1, 2], progress=False, out_dir=tmp_path / "o", mom2_corpus=corpus)
    assert [o.layer for o in out] == [1, 2]
    assert len(list((tmp_path / "o" / "stats").rglob("*_float32_mom2_10.npz"))) == 2


def test_bad_inputs(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="no target_new"):
        edit_facts(model, tok, [dataclasses.replace(FACTS[0], target_new=None)], _hp(model), progress=False)
    with pytest.raises(ValueError, match="layers must be"):
        edit_facts(model, tok, FACTS, _hp(model), layers="sweep", progress=False)
    with pytest.raises(LayerRangeError, match="out of range"):
        edit_facts(model, tok, FACTS, _hp(model), located=[7, 7], progress=False)
    with pytest.raises(LayerRangeError, match="layer 9 out of range: the model has 4 layers"):
        edit_facts(model, tok, FACTS, dataclasses.replace(_hp(model), layers=[9]), progress=False)


def test_target_new_equal_to_the_true_answer_is_not_a_success(gpt2, tmp_path):
    model, tok = gpt2
    same = dataclasses.replace(FACTS[1], id="same", target_new="trumpet")
    with pytest.raises(ValueError, match="fact 'same'.*target_new 'trumpet' is the true answer"):
        edit_facts(model, tok, [FACTS[0], same], _hp(model), progress=False)
    with pytest.warns(UserWarning, match="skipped: fact 'same'"):
        records = edit_facts(model, tok, [FACTS[0], same], _hp(model), progress=False, skip_errors=True,
                             located=[2, 1])
    assert [(r.fact_id, r.layer) for r in records] == [("needle", 2)]


def test_results_written_after_each_fact(gpt2, tmp_path):
    """A failure on the second fact leaves the first one's record in results.json."""
    from rome_locate.outcome import EvaluationError

    model, tok = gpt2
    calls = []

    def breaks_second(model, tok, fact, hparams, editor="builtin"):
        calls.append(fact.id)
        if len(calls) == 2:
            raise RuntimeError("editor broke")
        return edited(model, tok, fact, hparams)

    with pytest.raises(EvaluationError, match="editor broke"):
        edit_facts(model, tok, FACTS, _hp(model), out_dir=tmp_path, progress=False, editor=ContextEditor(breaks_second))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False and [r["fact_id"] for r in data["records"]] == ["needle"]


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
    assert len(data["records"]) == 2 and data["settings"]["hparams"]["model_name"] == str(mdir)
    assert main(["edit", "--model", str(mdir), "--device", "cpu", "--facts", str(facts), "--hparams",
                 str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run2")]) == 2


def test_import_easyedit_stubs_only_during_the_import(tmp_path, monkeypatch):
    """A fake EasyEdit whose __init__ needs a missing package and a torchvision that raises on load."""
    import sys

    from rome_locate import easyedit as edit_mod

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
    from rome_locate import models

    monkeypatch.setattr(models, "_HIDDEN", {})  # what this test hides is forgotten afterwards
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
        # The stand-ins are gone once EasyEdit is imported; the torchvision that cannot load stays hidden
        # (transformers must see it as absent to load models).
        assert "some_multimodal_extra" not in sys.modules and sys.modules["torchvision"] is None
        assert edit_mod.hidden_modules() == {"torchvision": "RuntimeError: operator torchvision::nms does not exist"}
        with pytest.raises(ModuleNotFoundError):
            __import__("some_multimodal_extra")
        with pytest.raises(ModuleNotFoundError):
            __import__("torchvision")
        for name in [k for k in sys.modules if k.startswith("easyeditor")]:
            del sys.modules[name]
        with pytest.raises(ImportError, match="no easyeditor"):
            edit_mod.import_easyedit(tmp_path / "nowhere")
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] in ("easyeditor", "torchvision")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_easyedit_request_format():
    from rome_locate.easyedit import easyedit_request

    r = easyedit_request(FACTS[0])
    assert r["prompt"] == FACTS[0].prompt and r["subject"] == "The Space Needle"
    assert r["target_new"] == "Paris" and r["ground_truth"] == "Seattle"  # no leading space: EasyEdit adds it
    assert r["rephrase_prompt"] == "Dorven Kaltmoor was born in the city of"
    # Only locality prompts with a known answer are scored.
    assert r["locality"] == {"neighborhood": {"prompt": ["Alma Berridge speaks the language of"],
                                              "ground_truth": ["French"]}}
    assert "rephrase_prompt" not in easyedit_request(FACTS[1]) and easyedit_request(FACTS[1])["locality"] == {}


def test_sequential_edits_accumulate_and_report_retention(gpt2, tmp_path):
    model, tok = gpt2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[set[str]] = []

    def watching(model, tok, fact, hparams, editor="builtin"):
        # Which layers differ from the unedited model when this edit starts: the earlier edits are still in.
        seen.append({n for n, p in model.named_parameters() if not torch.equal(p, before[n])})
        return edited(model, tok, fact, hparams)

    facts = FACTS + [dataclasses.replace(FACTS[0], id="needle2", target_new="Rome")]
    records = edit_facts(model, tok, facts, _hp(model), located=[1, 3, 2], sequential=True, out_dir=tmp_path,
                         progress=False, editor=ContextEditor(watching))
    assert seen == [set(), {"transformer.h.1.mlp.c_proj.weight"},
                    {"transformer.h.1.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"}]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored after the last
    assert [r.layer for r in records] == [1, 3, 2] and all(r.final_metrics is not None for r in records)
    assert [r.after_n_edits is not None for r in records] == [True, True, True]  # checkpoints 1, 2 and 3 (the last)
    s = json.loads((tmp_path / "results.json").read_text())["summary"]
    seq = s["sequential"]
    earlier = [r for r in records[:-1] if r.metrics["success"]]
    assert seq["retention_of"] == len(earlier) and s["retention"] == seq["retention"]
    if earlier:  # the 95% interval over the earlier edits holds the retention itself
        low, high = seq["retention_interval"]
        assert low <= seq["retention"] <= high
    assert seq["efficacy_after"]["1"] == records[0].metrics["success"]
    assert set(seq["efficacy_after"]) == {"1", "3"} and seq["final"]["locality"] is not None
    assert seq["final"]["success"] == pytest.approx(sum(r.final_metrics["success"] for r in records) / 3)
    assert "Sequential editing" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="sequential"):
        from rome_locate.pipeline import run_pipeline

        run_pipeline(model, tok, FACTS, _hp(model), sweep=True, sequential=True, progress=False)


def test_checkpoints():
    from rome_locate.evaluate import checkpoints

    assert checkpoints(1) == [1] and checkpoints(3) == [1, 2, 3]
    assert checkpoints(25) == [1, 2, 5, 10, 20, 25] and checkpoints(100) == [1, 2, 5, 10, 20, 50, 100]


def test_validated_trial_edits_use_the_pipeline_editor(gpt2):
    # The trial edits of --layers validated go through the pipeline's own edit context (EasyEdit's session
    # with --editor easyedit), never a second editor: a counting stand-in sees every trial and every edit.
    from contextlib import contextmanager

    from rome_locate.choose import LayerRule

    model, tok = gpt2
    calls = []

    @contextmanager
    def counting(model, tok, fact, hparams):
        calls.append((fact.id, hparams.layers[0], bool(fact.rephrase_prompts)))
        yield model

    rule = LayerRule("validated", 1, (0, 1, 2), 0.0, "test")
    records = edit_facts(model, tok, FACTS, _hp(model), layers="validated", layer_rule=rule, editor=ContextEditor(counting),
                         progress=False, trace_settings=TraceSettings(samples=2, noise=0.5))
    assert [r.layer_source for r in records] == ["validated", "validated"]
    assert all(r.layer in (0, 1, 2) for r in records)
    trials = [c for c in calls if not c[2] and c[0] == "needle"]  # the pick never sees the paraphrases
    assert len(trials) >= 2 and {c[1] for c in trials} >= {1}  # the rule's layer is always tried
    assert len(calls) == 2 * 2 + 2  # two tries per fact, then one edit each


def test_edit_and_eval_traced_report_the_layers_applied(tmp_path, capsys):
    """The shipped validated YAML's rule (candidates [1, 2, 3], threshold null): `--layers traced` applies the
    fallback to every fact and says so; the verdict compares what was applied, not the raw argmax."""
    from rome_locate import fact_models as FM
    from rome_locate.cli import main
    from rome_locate.facts import load_facts

    root = Path(__file__).resolve().parent.parent
    facts = tmp_path / "f.json"
    facts.write_text(json.dumps([f.to_json() for f in load_facts(FM.counterfact_path("gpt2"))[:3]]))
    base = ["--model", str(FM.fact_model_dir("gpt2")), "--facts", str(facts), "--device", "cpu",
            "--hparams", str(root / "hparams" / "ROME" / "fact-gpt2.yaml"), "--layers", "traced", "--samples", "3"]
    assert main(["edit", *base, "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert "candidates [1, 2, 3], fallback layer 1, margin threshold inf" in capsys.readouterr().err
    data = json.loads((tmp_path / "e" / "results.json").read_text())
    assert [(r["layer"], r["layer_source"]) for r in data["records"]] == [(1, "fallback")] * 3
    assert all("below the threshold inf" in r["layer_reason"] or "positive" in r["layer_reason"]
               for r in data["records"])
    assert data["summary"]["layer_sources"] == {"fallback": 3} and list(data["summary"]["strategies"]) == ["traced"]
    assert data["settings"]["layer_rule"]["candidates"] == [1, 2, 3] and data["settings"]["layer_rule"]["threshold"] is None
    assert main(["eval", *base, "--out", str(tmp_path / "v"), "--sweep", "--no-progress", "--max-new-tokens", "2",
                 "--no-heatmaps"]) == 0
    s = json.loads((tmp_path / "v" / "results.json").read_text())["summary"]
    records = json.loads((tmp_path / "v" / "results.json").read_text())["records"]
    assert all(r["traced_layer"] == r["layer"] == 1 for r in records)
    # The traced strategy is scored at the layer applied, so it equals the fixed one here: a tie, not a trail.
    assert s["strategies"]["traced"]["score"] == s["strategies"]["fixed"]["score"]
    assert "the traced layer ties the fixed one" in s["verdict"]
