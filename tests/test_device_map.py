"""Models spread by an accelerate device map: blocks 2-5 of the GPT-2 fact model on disk trace and edit as the plain model."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from rome_locate import cli
from rome_locate.fact_models import counterfact_path, fact_model_dir, facts_path
from rome_locate.facts import load_facts
from rome_locate.atp import trace_by_method
from rome_locate.hooks import hook_count
from rome_locate.hparams import bind_model, load_hparams, with_layer
from rome_locate.locate import locate
from rome_locate.models import input_device, load_model, parse_device_map, parse_max_memory, weight_value
from rome_locate.pipeline import edit_facts
from rome_locate.trace import TraceSettings

MODEL = str(fact_model_dir("gpt2"))
HPARAMS = os.path.join(os.path.dirname(__file__), "..", "hparams", "ROME", "fact-gpt2.yaml")
DISK_BLOCKS = range(2, 6)


def _device_map() -> dict[str, str]:
    dm = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    dm.update({f"transformer.h.{i}": "disk" if i in DISK_BLOCKS else "cpu" for i in range(8)})
    return dm


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    plain, tok = load_model(MODEL, device="cpu")
    offloaded, _ = load_model(MODEL, device_map=_device_map(), offload_folder=tmp_path_factory.mktemp("offload"))
    return plain, offloaded, tok


@pytest.fixture(scope="module")
def edit_case(models):
    """(hparams at layer 3, whose block is on disk; two CounterFact facts; the plain model's outcomes)."""
    plain, _, tok = models
    hparams = with_layer(bind_model(load_hparams(HPARAMS, easyedit=False), MODEL), 3)
    facts = load_facts(counterfact_path("gpt2"), limit=2)
    return hparams, facts, edit_facts(plain, tok, facts, hparams, progress=False)


def test_blocks_are_really_offloaded(models):
    _, offloaded, _ = models
    assert offloaded.transformer.h[3].mlp.c_proj.weight.device.type == "meta"
    assert offloaded.transformer.h[0].mlp.c_proj.weight.device.type == "cpu"
    assert input_device(offloaded).type == "cpu"


def test_disk_offloaded_model_traces_to_the_plain_numbers(models):
    plain, offloaded, tok = models
    facts = load_facts(facts_path("gpt2"), limit=3)
    a = locate(plain, tok, facts, TraceSettings(samples=3), progress=False)
    b = locate(offloaded, tok, facts, TraceSettings(samples=3), progress=False)
    for (ra, ca), (rb, cb) in zip(a, b):
        assert ra.high_score == pytest.approx(rb.high_score, abs=1e-5)
        assert ra.low_score == pytest.approx(rb.low_score, abs=1e-5)
        assert ra.scores == pytest.approx(rb.scores, abs=1e-5)
        assert ca.layer == cb.layer


def test_disk_offloaded_model_full_tables_and_atp_match_the_plain_model(models):
    """The fast path's skipped blocks, cached corrupted states and prefix caches, and attribution patching's
    backward, give the plain model's numbers when blocks 2-5 live on disk."""
    plain, offloaded, tok = models
    fact = load_facts(facts_path("gpt2"), limit=1)[0]
    for settings in (TraceSettings(samples=3, noise=0.5, full=True),
                     TraceSettings(samples=3, noise=0.5, method="atp", verify_top=4)):
        for options in ({}, {"reuse_prefix": True, "max_batch": 6}, {"reuse_prefix": False, "max_batch": 9}):
            if settings.method == "atp" and options:
                continue
            a = trace_by_method(plain, tok, fact, settings, **options)
            b = trace_by_method(offloaded, tok, fact, settings, **options)
            assert a.low_score == pytest.approx(b.low_score, abs=1e-5)
            assert torch.allclose(torch.tensor(a.table), torch.tensor(b.table), atol=1e-5, rtol=0)
    assert hook_count(offloaded) == 0


def test_disk_offloaded_model_edits_to_the_same_result_and_restores_exactly(models, edit_case):
    plain, offloaded, tok = models
    hparams, facts, a = edit_case
    layer = hparams.layers[0]
    name = f"{hparams.rewrite_module_tmp.format(layer)}.weight"
    checkpoint = _sha(f"{MODEL}/model.safetensors")
    before = weight_value(offloaded, name)
    b = edit_facts(offloaded, tok, facts, hparams, progress=False)
    for oa, ob in zip(a, b):
        assert oa.success == ob.success
        assert oa.metrics["p_new"] == pytest.approx(ob.metrics["p_new"], abs=1e-5)
        assert oa.metrics["p_new"] != pytest.approx(oa.metrics["p_new_pre"], abs=1e-3)  # the edit did land
    assert torch.equal(weight_value(offloaded, name), before)
    assert torch.equal(weight_value(offloaded, name), weight_value(plain, name))
    hook = offloaded.get_submodule(hparams.rewrite_module_tmp.format(layer))._hf_hook
    assert hook.offload
    assert not [k for k in hook.weights_map.dataset.state_dict if k.startswith(f"transformer.h.{layer}.")]  # no copy left
    assert _sha(f"{MODEL}/model.safetensors") == checkpoint  # the checkpoint on disk is never written


def test_cpu_offloaded_model_edits_its_cpu_copy_and_restores_exactly(models, edit_case):
    from accelerate import cpu_offload

    plain, _, tok = models
    hparams, facts, a = edit_case
    offloaded, _ = load_model(MODEL, device="cpu")
    # Every weight on the meta device, its values in a CPU state dict that a hook loads at each forward
    # (what a device map's "cpu" entries become on a machine with a GPU).
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    name = f"{hparams.rewrite_module_tmp.format(hparams.layers[0])}.weight"
    assert offloaded.get_parameter(name).device.type == "meta"
    b = edit_facts(offloaded, tok, facts, hparams, progress=False)
    assert [o.metrics["p_new"] for o in a] == pytest.approx([o.metrics["p_new"] for o in b], abs=1e-5)
    assert torch.equal(weight_value(offloaded, name), weight_value(plain, name))


def test_disk_offloaded_model_memit_batch_matches_the_plain_model_and_restores(models):
    import dataclasses

    from rome_locate.arch import arch_for
    from rome_locate.memit_hparams import memit_hparams_from_arch

    plain, offloaded, tok = models
    gpt2 = fact_model_dir("gpt2")
    # A window across the last CPU block and the first disk blocks.
    hp = memit_hparams_from_arch(arch_for(plain), [1, 2, 3], MODEL, stats_dir=str(gpt2 / "stats"),
                                 mom2_dataset="self_sample", mom2_n_samples=3000, v_num_grad_steps=8,
                                 mom2_update_weight=100.0)
    facts = load_facts(counterfact_path("gpt2"), limit=3)
    a = edit_facts(plain, tok, facts, hp, batch_size=3, progress=False)
    names = [f"{hp.rewrite_module_tmp.format(l)}.weight" for l in hp.layers]
    before = [weight_value(offloaded, n) for n in names]
    b = edit_facts(offloaded, tok, facts, dataclasses.replace(hp), batch_size=3, progress=False)
    assert [o.metrics["p_new"] for o in a] == pytest.approx([o.metrics["p_new"] for o in b], abs=1e-4)
    assert any(o.metrics["p_new"] > 10 * o.metrics["p_new_pre"] for o in b)  # the batch did land
    assert all(torch.equal(weight_value(offloaded, n), w) for n, w in zip(names, before))
    assert hook_count(offloaded) == 0


def test_mom2_statistics_of_an_offloaded_layer_equal_the_plain_ones(models):
    from rome_locate.fact_models import corpus_path
    from rome_locate.stats import second_moments

    plain, offloaded, tok = models
    texts = corpus_path("gpt2").read_text(encoding="utf-8").splitlines()[:16]
    names = ["transformer.h.3.mlp.c_proj", "transformer.h.7.mlp.c_proj"]  # on disk, in memory
    a, b = second_moments(plain, tok, names, texts), second_moments(offloaded, tok, names, texts)
    for name in names:
        assert a[name][1] == b[name][1]
        assert torch.allclose(a[name][0], b[name][0], rtol=1e-6, atol=1e-6)


def test_cli_locate_with_a_device_map_file_writes_the_plain_numbers(tmp_path):
    dm = tmp_path / "map.json"
    dm.write_text(json.dumps(_device_map()))
    argv = ["locate", "--model", MODEL, "--facts", str(facts_path("gpt2")), "--limit", "2", "--samples", "2", "--quiet"]
    assert cli.main(argv + ["--device", "cpu", "--out", str(tmp_path / "plain.jsonl")]) == 0
    assert cli.main(argv + ["--device-map", str(dm), "--offload-folder", str(tmp_path / "off"),
                            "--out", str(tmp_path / "mapped.jsonl")]) == 0
    plain = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    mapped = [json.loads(x) for x in (tmp_path / "mapped.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in plain] == [pytest.approx(r["scores"], abs=1e-5) for r in mapped]


def test_loading_options_are_checked(tmp_path):
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")
    assert parse_device_map("auto") == "auto"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        parse_device_map(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        parse_device_map(str(bad))
    with pytest.raises(ValueError, match="apply to a --device-map"):
        load_model(MODEL, max_memory="cpu=1GiB")
    with pytest.raises(ValueError, match="not both"):
        load_model(MODEL, device="cpu", device_map="auto")
