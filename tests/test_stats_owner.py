"""mom2 statistics carry the model they were computed on (issue 21, item 6): EasyEdit files them by the model
folder's name only, so two models in folders both called `model` share a folder; rome-locate refuses to read or
write over another model's, and checks the shape of statistics without a record."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SENTENCES, build_tiny_model

from rome_locate import cli
from rome_locate.hparams import generate_hparams, write_hparams
from rome_locate.models import fingerprint, load_model
from rome_locate.stats import compute_mom2, mom2_for, self_sample_mom2

LAYER_NAME = "transformer.h.1.mlp.c_proj"


def _save(tmp_path, tok, where: str, seed: int, d: int = 32):
    path = tmp_path / where / "model"
    build_tiny_model("gpt2", len(tok), d=d, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def two_models(tmp_path, tiny_tokenizer):
    """Model A and model B, each saved in a folder called `model`, loaded from there; and a corpus."""
    a, b = _save(tmp_path, tiny_tokenizer, "a", 0), _save(tmp_path, tiny_tokenizer, "b", 1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    return a, b, corpus


def _hp(model, stats):
    return generate_hparams(model, None, 1, "model", stats_dir=str(stats), mom2_adjustment=True,
                            mom2_dataset="corpus", mom2_n_samples=20)


def test_statistics_record_the_model_and_refuse_another_one(two_models, tmp_path):
    a_dir, b_dir, corpus = two_models
    a, tok = load_model(a_dir, device="cpu")
    b, _ = load_model(b_dir, device="cpu")
    stats = tmp_path / "stats"
    [npz] = compute_mom2(a, tok, None, [1], corpus, stats, mom2_dataset="corpus", n_samples=20)
    assert npz.parent.parent.name == "model"  # EasyEdit's layout, by the folder's name
    record = json.loads(npz.with_suffix(".json").read_text())
    assert record["model_fingerprint"]["digest"] == fingerprint(a).digest
    written = npz.read_bytes()
    # B's statistics would go to the very same file: refused, A's left as they were.
    with pytest.raises(ValueError, match="another model") as info:
        compute_mom2(b, tok, None, [1], corpus, stats, mom2_dataset="corpus", n_samples=20)
    assert str(npz) in str(info.value) and str(a_dir) in str(info.value) and str(b_dir) in str(info.value)
    assert npz.read_bytes() == written
    with pytest.raises(ValueError, match="another model") as info:
        mom2_for(b, _hp(b, stats), 1)
    assert str(npz) in str(info.value) and str(a_dir) in str(info.value) and str(b_dir) in str(info.value)
    assert mom2_for(a, _hp(a, stats), 1).shape == (128, 128)


def test_the_same_weights_elsewhere_or_in_another_dtype_are_the_same_model(two_models, tmp_path):
    a_dir, _, corpus = two_models
    a, tok = load_model(a_dir, device="cpu")
    stats = tmp_path / "stats"
    compute_mom2(a, tok, None, [1], corpus, stats, mom2_dataset="corpus", n_samples=20)
    copy = tmp_path / "c" / "model"
    shutil.copytree(a_dir, copy)
    same, _ = load_model(copy, device="cpu")
    assert mom2_for(same, _hp(same, stats), 1).shape == (128, 128)
    half, _ = load_model(a_dir, device="cpu", dtype="bfloat16")
    assert mom2_for(half, _hp(half, stats), 1).shape == (128, 128)


def test_self_sampled_statistics_of_another_model_are_not_overwritten(two_models, tmp_path):
    a_dir, b_dir, _ = two_models
    a, tok = load_model(a_dir, device="cpu")
    b, _ = load_model(b_dir, device="cpu")
    stats = tmp_path / "stats"
    [npz] = self_sample_mom2(a, tok, None, [1], stats, n_samples=4, new_tokens=3)
    record = json.loads(npz.with_suffix(".json").read_text())
    assert record["n_texts"] == 4 and record["model_fingerprint"]["digest"] == fingerprint(a).digest
    with pytest.raises(ValueError, match="another model"):
        self_sample_mom2(b, tok, None, [1], stats, n_samples=4, new_tokens=3)


def test_statistics_without_a_record_are_used_when_their_shape_fits(two_models, tmp_path, tiny_tokenizer):
    a_dir, b_dir, corpus = two_models
    a, tok = load_model(a_dir, device="cpu")
    b, _ = load_model(b_dir, device="cpu")
    stats = tmp_path / "stats"
    [npz] = compute_mom2(a, tok, None, [1], corpus, stats, mom2_dataset="corpus", n_samples=20)
    npz.with_suffix(".json").unlink()  # as EasyEdit's own files come: no record
    assert mom2_for(b, _hp(b, stats), 1).shape == (128, 128)
    wide_dir = _save(tmp_path, tiny_tokenizer, "w", 2, d=64)
    wide, _ = load_model(wide_dir, device="cpu")
    with pytest.raises(ValueError, match="another model") as info:
        mom2_for(wide, _hp(wide, stats), 1)
    message = str(info.value)
    assert str(npz) in message and "(128, 128)" in message and "256" in message and "rome-locate stats" in message


def test_cli_stats_and_edit_of_another_model_in_a_folder_of_the_same_name(two_models, tmp_path, capsys):
    a_dir, b_dir, corpus = two_models
    stats = tmp_path / "stats"
    argv = ["stats", "--device", "cpu", "--corpus", str(corpus), "--layers", "1", "--stats-dir", str(stats),
            "--mom2-dataset", "corpus", "--n-samples", "20", "--model"]
    assert cli.main(argv + [str(a_dir)]) == 0
    capsys.readouterr()
    assert cli.main(argv + [str(b_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rome-locate")]
    assert len(errors) == 1 and errors[0].startswith("rome-locate stats: error:") and "another model" in errors[0]
    b, _ = load_model(b_dir, device="cpu")
    yaml = tmp_path / "b.yaml"
    write_hparams(generate_hparams(b, None, 1, str(b_dir), stats_dir=str(stats), mom2_adjustment=True,
                                   mom2_dataset="corpus", mom2_n_samples=20, v_num_grad_steps=2,
                                   context_template_length_params=[[4, 5]]), yaml)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "Miles Davis plays the", "subject": "Miles Davis", "target": "trumpet",
                                  "target_new": "piano", "id": "m"}]))
    out = tmp_path / "run"
    assert cli.main(["edit", "--model", str(b_dir), "--device", "cpu", "--facts", str(facts), "--hparams", str(yaml),
                     "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rome-locate")]
    assert len(errors) == 1 and "another model" in errors[0] and str(a_dir) in errors[0] and str(b_dir) in errors[0]
    assert not (out / "results.json").exists()  # said before any edit
