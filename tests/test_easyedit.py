"""Against EasyEdit itself; runs only where EasyEdit imports (a clone named by EASYEDIT_PATH, or installed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, build_tiny_model
from rome_locate.facts import Fact
from rome_locate.hparams import generate_hparams, load_hparams, with_layer, write_hparams
from rome_locate.stats import compute_mom2, load_mom2

try:
    from rome_locate.easyedit import import_easyedit

    import_easyedit()
except ImportError as exc:
    pytest.skip(f"EasyEdit is not importable (set EASYEDIT_PATH to a clone of zjunlp/EasyEdit): {exc}",
                allow_module_level=True)

from easyeditor.models.rome.rome_hparams import ROMEHyperParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
YAMLS = sorted((ROOT / "hparams" / "ROME").glob("*.yaml"))
FACT = Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
            target_new="Paris", id="needle")


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_easyedit_loads_every_shipped_yaml(path):
    h = ROMEHyperParams.from_hparams(str(path))
    ours = load_hparams(path)
    assert isinstance(ours, ROMEHyperParams)  # EasyEdit is imported: its class is returned
    assert dataclasses.asdict(ours) == dataclasses.asdict(h)
    layers = list(h.layers)
    moved = with_layer(h, layers[0] + 1)
    assert isinstance(moved, ROMEHyperParams) and moved.layers == [layers[0] + 1] and h.layers == layers


def test_written_yaml_round_trips_through_easyedit(tiny_tokenizer, tmp_path):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    h = generate_hparams(model, None, 2, "tiny")
    ee = ROMEHyperParams.from_hparams(str(write_hparams(h, tmp_path / "t.yaml", header="a header")))
    assert dataclasses.asdict(ee) == dataclasses.asdict(h)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_easyedit_reads_our_mom2_offline(family, tiny_tokenizer, tmp_path, monkeypatch):
    from easyeditor.models.rome import layer_stats as ls

    def no_download(*_a, **_k):
        raise AssertionError("EasyEdit tried to load a dataset: our statistics file was not picked up")

    monkeypatch.setattr(ls, "load_dataset", no_download)
    model = build_tiny_model(family, len(tiny_tokenizer))
    model.config._name_or_path = str(tmp_path / "models" / "tiny-fact")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES))
    h = generate_hparams(model, None, 1, "tiny-fact", stats_dir=str(tmp_path / "stats"), mom2_dataset="wikitext",
                         mom2_n_samples=20, mom2_adjustment=True)
    [path] = compute_mom2(model, tiny_tokenizer, None, [1], corpus, h.stats_dir, mom2_dataset="wikitext", n_samples=20)
    stat = ls.layer_stats(model, tiny_tokenizer, h.rewrite_module_tmp.format(1), h.stats_dir, "wikitext",
                          to_collect=["mom2"], sample_size=20, precision="float32", hparams=h)
    torch.testing.assert_close(stat.mom2.moment().float(), load_mom2(path))
    from easyeditor.models.rome.compute_u import get_inv_cov

    inv = get_inv_cov(model, tiny_tokenizer, h.rewrite_module_tmp.format(1), "wikitext", 20, "float32", hparams=h)
    # The inverse EasyEdit's ROME uses is the inverse of our file's moment (C is ill-conditioned: compare like with like).
    torch.testing.assert_close(inv, torch.inverse(stat.mom2.moment()).float())


def test_easyedit_rome_through_edited_restores(tiny_tokenizer):
    from rome_locate.edit import edited

    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = generate_hparams(model, None, 1, "tiny", context_template_length_params=[[5, 5]], v_num_grad_steps=2)
    with edited(model, tiny_tokenizer, FACT, h, editor="easyedit"):
        assert not torch.equal(model.get_parameter("transformer.h.1.mlp.c_proj.weight"),
                               before["transformer.h.1.mlp.c_proj.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
