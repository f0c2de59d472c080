"""integration/pipeline.py: `layers: fixed` traces nothing; each model and setting gets its own run folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from conftest import build_tiny_model
from rome_locate.hparams import generate_hparams, write_hparams
from test_demo import _counterfact
from test_evaluate import FACT

ROOT = Path(__file__).resolve().parent.parent


def _pipeline_module():
    spec = importlib.util.spec_from_file_location("integration_pipeline", ROOT / "integration" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(tiny_tokenizer, tmp_path, seed: int, layers: str) -> Path:
    model = build_tiny_model("gpt2", len(tiny_tokenizer), seed=seed)
    mdir = tmp_path / f"m{seed}" / "model"  # the same folder name: only the weights tell them apart
    model.save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    (tmp_path / "cf.json").write_text(json.dumps([_counterfact(FACT)]))
    write_hparams(generate_hparams(model, None, 1, model_name=str(mdir), v_num_grad_steps=2,
                                   context_template_length_params=[[5, 5]]), tmp_path / "base.yaml")
    config = {"model": str(mdir), "facts": str(tmp_path / "cf.json"), "device": "cpu", "editor": "builtin",
              "layers": layers, "base_hparams": str(tmp_path / "base.yaml"), "out": str(tmp_path / "runs"),
              "trace": {"samples": 2, "noise": 0.5}}
    path = tmp_path / f"config{seed}{layers}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fixed_layers_trace_nothing_and_runs_are_tied_to_model_and_settings(tiny_tokenizer, tmp_path, capsys):
    pipeline = _pipeline_module()
    assert pipeline.main(["--config", str(_setup(tiny_tokenizer, tmp_path, 0, "fixed"))]) == 0
    [run] = (tmp_path / "runs").iterdir()
    assert not (run / "locate.jsonl").exists()  # `layers: fixed` traces nothing
    data = json.loads((run / "results.json").read_text())
    assert [r["layer"] for r in data["records"]] == [1] and data["records"][0]["layer_source"] == "fixed"
    hp = yaml.safe_load((run / "hparams.yaml").read_text())
    assert Path(hp["model_name"]).is_absolute() and Path(hp["stats_dir"]).is_absolute()
    # Another model (same folder layout, other weights) and other settings never land in the same run folder.
    assert pipeline.main(["--config", str(_setup(tiny_tokenizer, tmp_path, 1, "dataset"))]) == 0
    assert pipeline.main(["--config", str(_setup(tiny_tokenizer, tmp_path, 1, "traced"))]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 3 and all((r / "results.json").is_file() for r in runs)
    assert sum((r / "locate.jsonl").exists() for r in runs) == 2
