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
