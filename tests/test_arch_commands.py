"""`--arch` reaches every command: a family the ARCH table does not know works through the file alone.

The tiny LLaMA's row is taken out of the table for the test (`monkeypatch`), so
its module names are known only through `--arch FILE.json`: without the file
every command stops with the unknown-architecture error; with it, `stats`,
`hparams`, `edit` and `eval` (self-sampled statistics included) all run.
"""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_model
from rome_locate import arch as arch_mod
from rome_locate.cli import main
from rome_locate.facts import Fact, neighbours

FACTS = [
    Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
         target_new="Paris", rephrase_prompts=("Dorven Kaltmoor was born in the city of",),
         locality=neighbours(("The Eiffel Tower is in",), ("Paris",)), id="needle"),
    Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", target_new="piano", id="miles"),
]
COMMON = ["--device", "cpu", "--quiet"]


@pytest.fixture
def unknown_family(tiny_tokenizer, tmp_path, monkeypatch):
    """(model dir, arch file, facts file) of a tiny LLaMA whose family is known only through --arch."""
    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=4)
    mdir = tmp_path / "tiny-llama"
    model.save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    names = arch_mod.ARCH["llama"].to_json()
    del names["n_layers"]
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(names))
    monkeypatch.delitem(arch_mod.ARCH, "llama")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([f.to_json() for f in FACTS]))
    return mdir, arch_file, facts


def _hparams(tmp_path, mdir, facts, *extra):
    out = tmp_path / "h.yaml"
    code = main(["hparams", "--model", str(mdir), "--facts", str(facts), "-o", str(out), "--samples", "2",
                 "--no-validate", "--set", "mom2_adjustment=true", f"stats_dir={tmp_path / 'stats'}",
                 "v_num_grad_steps=2", "context_template_length_params=[[4, 5]]", *COMMON, *extra])
    return code, out


def test_without_arch_every_command_names_the_missing_family(unknown_family, tmp_path, capsys):
    mdir, _, facts = unknown_family
    code, out = _hparams(tmp_path, mdir, facts)
    err = capsys.readouterr().err
    assert code == 2 and "unknown model_type 'llama'" in err and "--arch" in err and not out.exists()


def test_stats_hparams_edit_eval_through_the_arch_file(unknown_family, tmp_path, capsys):
    mdir, arch_file, facts = unknown_family
    arch = ["--arch", str(arch_file)]
    assert main(["stats", "--model", str(mdir), "--self-sample", "6", "--layers", "1",
                 "--stats-dir", str(tmp_path / "s"), *COMMON[:2], *arch]) == 0
    assert list((tmp_path / "s" / "tiny-llama").glob("self_sample_stats/model.layers.1.mlp.down_proj*.npz"))
    code, out = _hparams(tmp_path, mdir, facts, *arch)
    assert code == 0 and "model.layers.{}.mlp.down_proj" in out.read_text()
    # No statistics in stats_dir: edit and eval self-sample them for the family known only through --arch.
    for command in ("edit", "eval"):
        run = tmp_path / command
        argv = [command, "--model", str(mdir), "--facts", str(facts), "--hparams", str(out), "--out", str(run),
                "--layers", "traced", "--samples", "2", *COMMON[:2], *arch]
        argv += ["--quiet"] if command == "edit" else ["--no-progress", "--max-new-tokens", "2", "--no-heatmaps"]
        assert main(argv) == 0, capsys.readouterr().err
        records = json.loads((run / "results.json").read_text())["records"]
        assert [r["fact_id"] for r in records] == ["needle", "miles"]
        assert all(r["layer_source"] in ("traced", "fallback") and r["layer"] < 3 for r in records)
    assert "self_sample" in (tmp_path / "eval" / "results.json").read_text()
