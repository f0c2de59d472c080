"""mom2 statistics: EasyEdit's file name and npz keys, and the numbers (E[k k^T] over token positions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SENTENCES, build_tiny_model
from rome_locate.arch import arch_for
from rome_locate.hooks import captured_inputs, hook_count
from rome_locate.hparams import generate_hparams
from rome_locate.stats import compute_mom2, load_mom2, mom2_for, mom2_path, stats_model_name


def test_path_matches_easyedit_layer_stats():
    # easyeditor/models/rome/layer_stats.py: f"{model_name}/{ds_name}_stats/{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_suffix}.npz"
    p = mom2_path("data/stats", "gpt2-xl", "transformer.h.17.mlp.c_proj", "wikipedia", 100000, "float32")
    assert p == Path("data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz")
    assert mom2_path("s", "m", "x", "wikitext", None, "float64").name == "x_float64_mom2.npz"
    with pytest.raises(ValueError, match="dtype"):
        mom2_path("s", "m", "x", "wikitext", 1, "int8")


def test_stats_model_name_is_the_folder_name(tiny_tokenizer):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    model.config._name_or_path = "/some/where/fact_models/gpt2"
    assert stats_model_name(model) == "gpt2"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compute_mom2_file_and_numbers(family, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    model.config._name_or_path = str(tmp_path / "tiny-model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:5]) + "\n\n")
    paths = compute_mom2(model, tok, None, [1, 3], corpus, tmp_path / "stats", mom2_dataset="tinytext",
                         n_samples=4, batch_size=3)
    arch = arch_for(model)
    assert paths[0] == tmp_path / "stats" / "tiny-model" / "tinytext_stats" / f"{arch.rewrite_module(1)}_float32_mom2_4.npz"
    assert hook_count(model) == 0
    with np.load(paths[0]) as data:
        assert set(data.files) == {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
        assert str(data["mom2.constructor"]) == "easyeditor.util.runningstats.SecondMoment()"
        assert int(data["sample_size"]) == 4 and data["mom2.mom2"].dtype == np.float32
        total, count = data["mom2.mom2"], int(data["mom2.count"])
    # Reference: one text at a time (no padding), only the first 4 lines.
    name = arch.rewrite_module(1)
    keys = []
    for text in SENTENCES[:4]:
        with captured_inputs(model, [name]) as cache:
            model(torch.tensor([tok(text)["input_ids"]]))
        keys.append(cache[name][0].double())
    k = torch.cat(keys)
    assert count == k.shape[0]
    np.testing.assert_allclose(total, (k.T @ k).numpy(), rtol=1e-4, atol=1e-6)
    c = load_mom2(paths[0], n_samples=4)
    np.testing.assert_allclose(c.numpy(), (k.T @ k / count).numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="sample_size"):
        load_mom2(paths[0], n_samples=5)
    h = generate_hparams(model, arch, 1, "tiny-model", stats_dir=str(tmp_path / "stats"), mom2_dataset="tinytext",
                         mom2_n_samples=4, mom2_adjustment=True)
    assert torch.equal(mom2_for(model, h, 1), c)
    with pytest.raises(FileNotFoundError, match="rome-locate stats"):
        mom2_for(model, dataclasses.replace(h, mom2_n_samples=10), 1)


def test_bad_inputs(tiny_tokenizer, tmp_path):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    with pytest.raises(FileNotFoundError, match="corpus"):
        compute_mom2(model, tiny_tokenizer, None, [0], tmp_path / "nope.txt", tmp_path, model_name="m")
    (tmp_path / "c.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="out of range"):
        compute_mom2(model, tiny_tokenizer, None, [9], tmp_path / "c.txt", tmp_path, model_name="m")
    assert not any(tmp_path.glob("m/**/*.npz"))


def test_self_sample_writes_easyedit_layout_with_settings(tiny_tokenizer, tmp_path):
    import json

    from rome_locate.stats import sample_texts, self_sample_mom2

    tok = tiny_tokenizer
    model = build_tiny_model("gpt2", len(tok))
    model.config._name_or_path = str(tmp_path / "tiny-model")
    texts = sample_texts(model, tok, 7, new_tokens=5, seed=3)
    assert len(texts) == 7 and texts == sample_texts(model, tok, 7, new_tokens=5, seed=3)
    assert texts != sample_texts(model, tok, 7, new_tokens=5, seed=4)
    paths = self_sample_mom2(model, tok, None, [1, 2], tmp_path / "stats", n_samples=7, new_tokens=5, seed=3)
    arch = arch_for(model)
    for layer, path in zip([1, 2], paths):
        assert path == mom2_path(tmp_path / "stats", "tiny-model", arch.rewrite_module(layer), "self_sample", 7,
                                 "float32")
        settings = json.loads(path.with_suffix(".json").read_text())
        assert settings["n_texts"] == 7 and settings["seed"] == 3 and settings["new_tokens"] == 5
        cov = load_mom2(path, 7)
        assert cov.shape == (4 * 32, 4 * 32) and torch.allclose(cov, cov.T)


def test_missing_stats_fall_back_to_self_sample_with_notice(tiny_tokenizer, tmp_path):
    from rome_locate.stats import ensure_self_sampled, missing_mom2_layers

    tok = tiny_tokenizer
    model = build_tiny_model("gpt2", len(tok))
    model.config._name_or_path = str(tmp_path / "tiny-model")
    h = generate_hparams(model, None, 1, "tiny-model", stats_dir=str(tmp_path / "stats"), mom2_adjustment=True,
                         mom2_dataset="wikipedia")
    assert missing_mom2_layers(model, h, [1]) == [1]
    notices: list[str] = []
    out = ensure_self_sampled(model, tok, h, [1], n_samples=6, notice=notices.append)
    assert len(notices) == 1 and "sampled from the model itself" in notices[0]
    assert (out.mom2_dataset, out.mom2_n_samples) == ("self_sample", 6)
    assert missing_mom2_layers(model, out, [1]) == [] and mom2_for(model, out, 1).shape == (128, 128)
    # Present statistics are used as they are: no notice, hyperparameters unchanged.
    again: list[str] = []
    assert ensure_self_sampled(model, tok, out, [1], notice=again.append) == out and not again
    off = dataclasses.replace(h, mom2_adjustment=False)
    assert ensure_self_sampled(model, tok, off, [1], notice=again.append) is off and not again


def test_non_utf8_corpus_is_named(tiny_tokenizer, tmp_path):
    # Issue 21 (21): the codec's message alone ("can't decode byte 0xe9") does not say which file.
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Caf\xe9 au lait\n".encode("latin-1"))
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not UTF-8.*0xe9") as err:
        compute_mom2(model, tiny_tokenizer, None, [0], corpus, tmp_path / "stats", model_name="m")
    assert str(corpus) in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickled"])
def test_unreadable_mom2_file_is_named(tmp_path, damage):
    # Issue 21 (21): a damaged npz used to end in zipfile's BadZipFile, a traceback that names no file.
    path = tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_4.npz"
    np.savez_compressed(path, **{"mom2.count": np.array(3), "mom2.mom2": np.eye(8, dtype=np.float32),
                                 "sample_size": np.array(4)})
    data = path.read_bytes()
    if damage == "pickled":
        # An object array needs pickle to load; np.load refuses it, so no code in the file runs.
        np.savez(path, **{"mom2.count": np.array(3), "mom2.mom2": np.array([{"a": 1}], dtype=object),
                          "sample_size": np.array(4)})
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00not a zip" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match="not a readable mom2 statistics file") as err:
        load_mom2(path, n_samples=4)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
