"""Flags that cannot work are one line before the model loads (issue 21, items 18 and 19): a --device this torch
does not have, and --editor easyedit without an importable EasyEdit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from rome_locate import cli
from rome_locate.fact_models import counterfact_path, fact_model_dir, facts_path

M = str(fact_model_dir("gpt2"))
FACTS = str(facts_path("gpt2"))


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: the flags must be checked first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("device, message", [
    ("tpu", "not a device torch knows"),
    ("cuda:x", "not a device torch knows"),
    ("meta", "holds no weights"),
    ("hpu", "this torch has no hpu device"),
])
def test_a_device_this_torch_lacks_is_one_line_before_loading(tmp_path, capsys, no_loading, device, message):
    argv = ["locate", "--model", M, "--facts", FACTS, "--limit", "1", "--device", device, "--out",
            str(tmp_path / "a.jsonl"), "--quiet"]
    assert cli.main(argv) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("rome-locate locate: error: --device")
    assert repr(device) in errors[0] and message in errors[0] and "cpu, cuda, cuda:N" in errors[0]
    assert not (tmp_path / "a.jsonl").exists()


def test_a_cuda_index_beyond_the_gpus_is_one_line(tmp_path, capsys, no_loading):
    argv = ["locate", "--model", M, "--facts", FACTS, "--limit", "1", "--device", f"cuda:{torch.cuda.device_count()}",
            "--quiet"]
    assert cli.main(argv) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "--device" in errors[0] and "CUDA device" in errors[0]


def test_check_device_accepts_what_this_torch_has():
    from rome_locate.models import check_device

    assert check_device("cpu") == "cpu" and check_device("cpu:0") == "cpu:0"
    if torch.cuda.is_available():
        assert check_device("cuda:0") == "cuda:0"


@pytest.mark.parametrize("command", ["edit", "eval"])
def test_editor_easyedit_without_easyedit_is_one_line_naming_easyedit_path(tmp_path, capsys, monkeypatch, command):
    import sys

    # As if EasyEdit had never been imported in this process, and EASYEDIT_PATH named no clone.
    for name in [n for n in sys.modules if n == "easyeditor" or n.startswith("easyeditor.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("EASYEDIT_PATH", str(tmp_path / "no-easyedit"))

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before --editor was checked")

    monkeypatch.setattr(cli, "load_model", load)
    hparams = Path(__file__).resolve().parent.parent / "hparams" / "ROME" / "fact-gpt2.yaml"
    argv = [command, "--model", M, "--facts", str(counterfact_path("gpt2")), "--limit", "1", "--hparams",
            str(hparams), "--editor", "easyedit", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main(argv) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"rome-locate {command}: error: --editor easyedit")
    assert "EASYEDIT_PATH" in errors[0] and str(tmp_path / "no-easyedit") in errors[0]
    assert not (tmp_path / "out").exists()
