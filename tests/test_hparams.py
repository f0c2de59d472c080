"""ROME hyperparameters: the shipped YAMLs, writing a layer into them, generating them for a model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model
from rome_locate.arch import ARCH, arch_for
from rome_locate.hparams import (HParamsError, RomeHParams, bind_model, generate_hparams, load_hparams,
                                 with_layer, write_hparams)

ROOT = Path(__file__).resolve().parent.parent
YAMLS = sorted((ROOT / "hparams" / "ROME").glob("*.yaml"))
# Real depths of the models the shipped files are for: v_loss_layer must be L - 1.
DEPTHS = {"gpt2-xl": 48, "gpt2-medium": 24, "gpt-j-6B": 28, "llama-2-7b": 32, "llama-3-8b": 32,
          "llama-3.2-3b": 28, "mistral-7b": 32, "qwen2.5-7b": 28, "qwen3-8b": 36, "gemma-7b": 28,
          "gemma-2-9b": 42, "phi-3-mini": 32, "pythia-6.9b": 32, "fact-gpt2": 8, "fact-llama": 8}


def test_the_issue_models_are_shipped():
    names = {p.stem for p in YAMLS}
    assert {"gpt2-xl", "gpt-j-6B", "llama-3-8b", "qwen2.5-7b", "mistral-7b", "fact-gpt2", "fact-llama"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_every_shipped_yaml_loads(path):
    h = RomeHParams.from_hparams(path)
    assert h.alg_name == "ROME"
    assert h.v_loss_layer == DEPTHS[path.stem] - 1
    assert 0 <= h.layers[0] < DEPTHS[path.stem]
    # Module templates are the architecture map's row for that family.
    rows = [a for a in ARCH.values() if a.rewrite_module_tmp == h.rewrite_module_tmp]
    assert rows and rows[0].mlp_module_tmp == h.mlp_module_tmp and rows[0].layer_module_tmp == h.layer_module_tmp
    # The same file through the public loader, without the .yaml suffix (EasyEdit accepts both).
    assert dataclasses.asdict(load_hparams(str(path)[:-5], easyedit=False)) == dataclasses.asdict(h)


def test_paper_layers():
    hp = {p.stem: RomeHParams.from_hparams(p) for p in YAMLS}
    assert hp["gpt2-xl"].layers == [17] and hp["gpt2-xl"].rewrite_module_tmp == "transformer.h.{}.mlp.c_proj"
    assert hp["gpt-j-6B"].layers == [5] and hp["gpt-j-6B"].rewrite_module_tmp == "transformer.h.{}.mlp.fc_out"
    assert hp["llama-3-8b"].rewrite_module_tmp == "model.layers.{}.mlp.down_proj"


def test_with_layer_copies_and_does_not_mutate():
    h = RomeHParams.from_hparams(ROOT / "hparams" / "ROME" / "gpt2-xl.yaml")
    h2 = with_layer(h, 3)
    assert h2.layers == [3] and h.layers == [17]
    assert dataclasses.replace(h2, layers=[17]) == h
    with pytest.raises(HParamsError, match="out of range"):
        with_layer(h, 48, n_layers=48)
    with pytest.raises(HParamsError, match="integer"):
        with_layer(h, "x")


def test_write_round_trips_with_header(tmp_path):
    h = with_layer(RomeHParams.from_hparams(ROOT / "hparams" / "ROME" / "llama-3-8b.yaml"), 11)
    path = write_hparams(h, tmp_path / "sub" / "out.yaml", header="facts: f.json (3 facts)\nhistogram: 0:1 1:2")
    text = path.read_text()
    assert text.startswith("# facts: f.json (3 facts)\n# histogram: 0:1 1:2\n")
    assert RomeHParams.from_hparams(path) == h
    assert yaml.safe_load(text)["v_weight_decay"] == pytest.approx(1e-3)
    assert [p.name for p in path.parent.iterdir()] == ["out.yaml"]  # no temp file left


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    h = RomeHParams.from_hparams(ROOT / "hparams" / "ROME" / "gpt2-xl.yaml")
    path = write_hparams(h, tmp_path / "h.yaml")
    old = path.read_text()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_hparams(with_layer(h, 2), path)
    assert path.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.yaml"]
    with pytest.raises(OSError):
        write_hparams(h, tmp_path / "new.yaml")
    assert not (tmp_path / "new.yaml").exists()


def test_bad_files_name_the_file_and_field(tmp_path):
    good = yaml.safe_load((ROOT / "hparams" / "ROME" / "gpt2-xl.yaml").read_text())
    cases = [({"alg_name": "MEMIT"}, "alg_name must be 'ROME'"), ({"layers": []}, "layers"),
             ({"v_lr": "fast"}, "v_lr"), ({"fact_token": "subject_middle"}, "fact_token"),
             ({"bogus": 1}, "unknown ROME hyperparameters"), ({"rewrite_module_tmp": "x.mlp"}, "rewrite_module_tmp")]
    for i, (change, message) in enumerate(cases):
        p = tmp_path / f"bad{i}.yaml"
        p.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(HParamsError, match=message) as err:
            load_hparams(p)
        assert str(p) in str(err.value)
    p = tmp_path / "missing.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "kl_factor"}))
    with pytest.raises(HParamsError, match="kl_factor"):
        RomeHParams.from_hparams(p)
    with pytest.raises(HParamsError, match="out of range"):
        load_hparams(ROOT / "hparams" / "ROME" / "gpt2-xl.yaml", n_layers=12)


def test_scientific_notation_strings_are_numbers(tmp_path):
    good = yaml.safe_load((ROOT / "hparams" / "ROME" / "gpt2-xl.yaml").read_text())
    p = tmp_path / "sci.yaml"
    p.write_text(yaml.safe_dump({**good, "v_lr": "5e-1", "v_weight_decay": "1e-3"}))
    h = RomeHParams.from_hparams(p)
    assert h.v_lr == 0.5 and h.v_weight_decay == 0.001


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_for_tiny_models(family, tiny_tokenizer, tmp_path):
    model = build_tiny_model(family, len(tiny_tokenizer), n_layers=6)
    h = generate_hparams(model, None, 2, "tiny", kl_factor=0.1)
    arch = arch_for(model)
    assert h.layers == [2] and h.v_loss_layer == 5 and h.kl_factor == 0.1 and h.device == "cpu"
    assert h.rewrite_module_tmp == ARCH[family].rewrite_module_tmp
    for name in ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module"):
        assert getattr(h, name) == getattr(arch, name)
    model.get_submodule(h.rewrite_module_tmp.format(5))  # the names resolve in the model
    assert RomeHParams.from_hparams(write_hparams(h, tmp_path / "g.yaml")) == h
    with pytest.raises(HParamsError, match="out of range"):
        generate_hparams(model, None, 6, "tiny")
    with pytest.raises(HParamsError, match="unknown"):
        generate_hparams(model, None, 1, "tiny", v_lrr=1.0)


def test_bind_model_resolves_stats_next_to_the_model(tmp_path, monkeypatch):
    h = dataclasses.replace(RomeHParams.from_hparams(ROOT / "hparams" / "ROME" / "gpt2-xl.yaml"), stats_dir="stats")
    (tmp_path / "m" / "stats").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    bound = bind_model(h, tmp_path / "m")
    assert bound.model_name == str(tmp_path / "m") and bound.stats_dir == str(tmp_path / "m" / "stats")
    assert h.stats_dir == "stats"
    (tmp_path / "stats").mkdir()
    # The working directory wins, as in EasyEdit, written absolute so the YAML means the same from anywhere.
    assert bind_model(h, tmp_path / "m").stats_dir == str(tmp_path / "stats")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fact_yaml_is_validated_with_no_field_set_by_hand(family):
    # The shipped fact-model YAMLs come from the validated `rome-locate hparams`, untouched.
    import json

    path = ROOT / "hparams" / "ROME" / f"fact-{family}.yaml"
    text = path.read_text()
    assert text.startswith("# Generated by `rome-locate hparams` (validated)") and "set by hand" not in text
    h = RomeHParams.from_hparams(path)
    v = json.loads(path.with_name(f"fact-{family}.validation.json").read_text())
    assert h.layers == [v["chosen"]["layer"]] and h.layers[0] in v["candidates"]
    setting = v["chosen"]["setting"]
    assert (h.v_lr, h.v_num_grad_steps, h.clamp_norm_factor) == (setting["v_lr"], setting["v_num_grad_steps"],
                                                                setting["clamp_norm_factor"])
    assert h.mom2_adjustment and h.mom2_dataset == v["mom2"]["mom2_dataset"]


# Issue 21 (17): values of the right type but outside what ROME can use are refused at load, naming the value.
OUT_OF_RANGE = [
    ({"v_loss_layer": 48}, "v_loss_layer must be a layer index in 0..47, got 48"),
    ({"v_loss_layer": 99}, "v_loss_layer must be a layer index in 0..47, got 99"),
    ({"v_loss_layer": -3}, "v_loss_layer must be a layer index in 0..47, got -3"),
    ({"v_num_grad_steps": 0}, "v_num_grad_steps must be >= 1, got 0"),
    ({"v_num_grad_steps": -5}, "v_num_grad_steps must be >= 1, got -5"),
    ({"clamp_norm_factor": -1}, "clamp_norm_factor must be a finite number > 0, got -1.0"),
    ({"clamp_norm_factor": 0}, "clamp_norm_factor must be a finite number > 0, got 0.0"),
    ({"v_lr": float("inf")}, "v_lr must be a finite number > 0, got inf"),
    ({"v_lr": 0}, "v_lr must be a finite number > 0, got 0.0"),
    ({"v_lr": float("nan")}, "v_lr must be a finite number > 0, got nan"),
    ({"kl_factor": -0.1}, "kl_factor must be a finite number >= 0, got -0.1"),
    ({"v_weight_decay": float("nan")}, "v_weight_decay must be a finite number >= 0, got nan"),
    ({"context_template_length_params": [[0, 10]]},
     r"context_template_length_params must be a list of \[length >= 1, count >= 5\] pairs .*, got \[\[0, 10\]\]"),
    ({"context_template_length_params": [[5, 10], [10, 0]]},
     r"context_template_length_params must be .*, got \[\[5, 10\], \[10, 0\]\]"),
    ({"context_template_length_params": [[5, 3]]}, r"context_template_length_params must be .*, got \[\[5, 3\]\]"),
    ({"context_template_length_params": [[5, True]]},
     r"context_template_length_params must be .*, got \[\[5, True\]\]"),
    ({"mom2_n_samples": 0}, "mom2_n_samples must be >= 1, got 0"),
    ({"v_num_grad_steps": float("inf")}, "v_num_grad_steps must be an integer, got inf"),
    ({"v_loss_layer": float("nan")}, "v_loss_layer must be an integer, got nan"),
    ({"max_length": -40}, "max_length must be >= 1, got -40"),
]


@pytest.mark.parametrize("change, message", OUT_OF_RANGE, ids=[f"{i}-{next(iter(c))}" for i, (c, _) in
                                                              enumerate(OUT_OF_RANGE)])
def test_values_out_of_range_name_the_field_and_value(tmp_path, change, message):
    good = yaml.safe_load((ROOT / "hparams" / "ROME" / "gpt2-xl.yaml").read_text())
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**good, **change}))
    with pytest.raises(HParamsError, match=message) as err:
        load_hparams(p, n_layers=48)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_v_loss_layer_is_checked_against_the_model_only_when_its_depth_is_known(tmp_path):
    good = yaml.safe_load((ROOT / "hparams" / "ROME" / "gpt2-xl.yaml").read_text())
    p = tmp_path / "deep.yaml"
    p.write_text(yaml.safe_dump({**good, "layers": [3], "v_loss_layer": 47}))
    assert load_hparams(p).v_loss_layer == 47
    with pytest.raises(HParamsError, match="v_loss_layer must be a layer index in 0..11, got 47"):
        load_hparams(p, n_layers=12)
    p.write_text(yaml.safe_dump({**good, "v_loss_layer": -1}))
    with pytest.raises(HParamsError, match="v_loss_layer must be a layer index >= 0, got -1"):
        load_hparams(p)


@pytest.mark.parametrize("pairs", [[[0, 3]], [[5, 3]]])
def test_template_pairs_that_crashed_the_sampler_are_refused(tiny_tokenizer, pairs):
    # Fewer than 5 texts gives each of ROME's 5 template prefixes none, and the sampler then died with
    # "IndexError: tuple index out of range" in the middle of an edit.
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    with pytest.raises(HParamsError, match=r"context_template_length_params must be .*count >= 5"):
        generate_hparams(model, None, 1, "tiny", context_template_length_params=pairs)
    assert generate_hparams(model, None, 1, "tiny", context_template_length_params=[[1, 5]]).layers == [1]
