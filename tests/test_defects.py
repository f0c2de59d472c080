"""Regression tests for the defects of issue 21: each reproduces the defect as it was reported."""

from __future__ import annotations

import os

import pytest

from rome_locate.files import atomic_path, write_bytes, write_text


# ---- (11) outputs never follow a link planted in the output folder ---------------


def _old_temp_name(path):
    # The name the writer used to pick: predictable from the target and this process's id.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@pytest.mark.parametrize("write", [write_text, lambda p, s: write_bytes(p, s.encode())], ids=["text", "bytes"])
def test_planted_symlink_at_the_temp_name_is_not_followed(tmp_path, write):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "results.json"
    _old_temp_name(target).symlink_to(victim)
    write(target, "new output\n")
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "new output\n" and not target.is_symlink()


def test_temp_file_is_new_and_private_to_the_writer(tmp_path):
    target = tmp_path / "plot.png"
    _old_temp_name(target).symlink_to(tmp_path / "elsewhere.png")
    with atomic_path(target) as tmp:
        # A fresh regular file beside the target, with the target's suffix (matplotlib and numpy infer the format).
        assert tmp.parent == tmp_path and tmp.suffix == ".png"
        assert tmp.is_file() and not tmp.is_symlink() and tmp != _old_temp_name(target)
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    assert not (tmp_path / "elsewhere.png").exists()


def test_temp_file_is_removed_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_output_gets_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "shared.json", "{}\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ---- (16) damaged or pickle-bearing weights: one line naming the file ------------


def _fact_model_copy(tmp_path, weights: str | None = "model.safetensors"):
    """The shipped gpt2 fact model's loadable files (config, tokenizer, weights unless `weights` is None)."""
    import shutil

    from rome_locate.fact_models import fact_model_dir

    src, dst = fact_model_dir("gpt2"), tmp_path / "model"
    dst.mkdir()
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names + ([weights] if weights else []):
        shutil.copy(src / name, dst / name)
    return dst


def _load_error(model_dir):
    from rome_locate import cli
    from rome_locate.models import load_model

    with pytest.raises(ValueError) as err:
        load_model(model_dir, device="cpu")
    # The CLI turns exactly these into its one-line "error:" message.
    assert isinstance(err.value, cli._user_errors()) and "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path, damage):
    model_dir = _fact_model_copy(tmp_path)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\xff" * 4096)
    message = _load_error(model_dir)
    assert message.startswith(f"{weights}: not a complete safetensors file")


def test_pickle_bearing_bin_is_refused_without_running_it(tmp_path):
    import torch

    model_dir = _fact_model_copy(tmp_path, weights=None)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, model_dir / "pytorch_model.bin")
    message = _load_error(model_dir)
    assert message.startswith(f"{model_dir / 'pytorch_model.bin'}: refused as model weights")
    assert "nothing in the file was run" in message
    assert not marker.exists()


def test_truncated_bin_is_one_line_naming_the_file(tmp_path):
    import torch
    from safetensors.torch import load_file

    from rome_locate.fact_models import fact_model_dir

    model_dir = _fact_model_copy(tmp_path, weights=None)
    weights = model_dir / "pytorch_model.bin"
    torch.save(load_file(fact_model_dir("gpt2") / "model.safetensors"), weights)
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    message = _load_error(model_dir)
    assert message.startswith(f"{weights}: not a complete PyTorch checkpoint")
