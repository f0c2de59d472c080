"""MEMIT/AlphaEdit YAMLs, mass editing through the pipeline and the CLI, and the window search's pure parts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import params_hash
from rome_locate.algorithms import load_any_hparams
from rome_locate.arch import arch_for
from rome_locate.batches import check_batch_size
from rome_locate.fact_models import fact_model_dir, load_fact_model
from rome_locate.facts import load_facts
from rome_locate.hparams import HParamsError
from rome_locate.memit_hparams import (AlphaEditHParams, MemitHParams, load_memit_hparams, memit_hparams_from_arch,
                                       with_window, write_memit_hparams)
from rome_locate.pipeline import edit_facts, run_pipeline
from rome_locate.validate_window import easyedit_window, propose_windows, run_window_validation
from rome_locate.window_records import WindowSetting

GPT2 = fact_model_dir("gpt2")


@pytest.fixture(scope="module")
def fact_gpt2():
    return load_fact_model("gpt2")


def _hp(model, window=(0, 1, 2), alg="MEMIT", **kw):
    kw.setdefault("v_num_grad_steps", 20)
    kw.setdefault("v_lr", 1.0)
    return memit_hparams_from_arch(arch_for(model), list(window), str(GPT2), alg_name=alg,
                                   stats_dir=str(GPT2 / "stats"), mom2_dataset="self_sample", mom2_n_samples=3000,
                                   mom2_update_weight=100.0, **kw)


def test_yaml_round_trip_and_checks(fact_gpt2, tmp_path):
    model, _ = fact_gpt2
    hp = _hp(model)
    path = write_memit_hparams(hp, tmp_path / "m.yaml", header="test")
    text = path.read_text()
    assert text.startswith("# test\nalg_name: MEMIT\n")
    assert "fp16" not in text and "context_template_length_params" not in text  # EasyEdit's class has neither
    assert load_any_hparams(path) == hp == MemitHParams.from_hparams(path)
    a = _hp(model, alg="AlphaEdit")
    assert isinstance(load_any_hparams(write_memit_hparams(a, tmp_path / "a.yaml")), AlphaEditHParams)
    bad = yaml.safe_load(text)
    for key, value, message in (("mom2_update_weight", -1, "mom2_update_weight must be a finite number >= 0"),
                                ("layers", [2, 2], "repeat a layer"), ("layer_selection", "some", "layer_selection"),
                                ("v_lr", "fast", "v_lr must be a number"), ("fp16", True, "unknown MEMIT")):
        (tmp_path / "b.yaml").write_text(yaml.safe_dump({**bad, key: value}))
        with pytest.raises(HParamsError, match=message):
            load_memit_hparams(tmp_path / "b.yaml")
    with pytest.raises(HParamsError, match="layer 9 out of range"):
        load_memit_hparams(path, n_layers=8) and with_window(hp, [7, 9], n_layers=8)
    assert with_window(hp, [3, 1], n_layers=8).layers == [1, 3]


def test_easyedit_loads_the_yaml(fact_gpt2, tmp_path):
    from conftest import require_easyedit

    require_easyedit()
    from rome_locate.easyedit import import_easyedit

    ee = import_easyedit()
    model, _ = fact_gpt2
    path = write_memit_hparams(_hp(model), tmp_path / "m.yaml")
    loaded = ee.MEMITHyperParams.from_hparams(str(path))
    assert loaded.layers == [0, 1, 2] and loaded.mom2_update_weight == 100.0
    a = write_memit_hparams(_hp(model, alg="AlphaEdit"), tmp_path / "a.yaml")
    from easyeditor.models.alphaedit.AlphaEdit_hparams import AlphaEditHyperParams

    assert AlphaEditHyperParams.from_hparams(str(a)).L2 == 10.0


def test_pipeline_batches_edit_measure_and_restore(fact_gpt2):
    model, tok = fact_gpt2
    facts = load_facts(GPT2 / "counterfact.json")[:4]
    digest = params_hash(model)
    records = edit_facts(model, tok, facts, _hp(model), batch_size=4, progress=False)
    assert params_hash(model) == digest
    assert [r.fact_id for r in records] == [f.id for f in facts]
    assert all(r.layers == (0, 1, 2) and r.batch_size == 4 and r.layer == 2 for r in records)
    assert "window [0, 1, 2]" in records[0].layer_reason
    # The batch is written, not ignored: target_new's probability rises on every edit prompt.
    assert all(r.metrics["p_new"] > 10 * r.metrics["p_new_pre"] for r in records)
    # Sequential batches: the earlier batch is measured again on the final model.
    seq = edit_facts(model, tok, facts, _hp(model), batch_size=2, sequential=True, progress=False)
    assert params_hash(model) == digest
    assert all(r.final_metrics is not None for r in seq) and seq[-1].after_n_edits["n_edits"] == 4.0
    assert [r.batch_size for r in seq] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="--layers traced chooses ROME's one layer"):
        edit_facts(model, tok, facts, _hp(model), layers="traced", progress=False)


def test_rome_in_batches_equals_rome_kept_one_by_one(fact_gpt2):
    from rome_locate.hparams import load_hparams

    model, tok = fact_gpt2
    facts = load_facts(GPT2 / "counterfact.json")[:3]
    hp = dataclasses.replace(load_hparams("hparams/ROME/fact-gpt2.yaml", easyedit=False),
                             stats_dir=str(GPT2 / "stats"), v_num_grad_steps=10)
    batch = edit_facts(model, tok, facts, hp, batch_size=3, progress=False)
    seq = edit_facts(model, tok, facts, hp, sequential=True, progress=False)
    # The last fact of a batch is measured on the model holding all three, as the last sequential edit is (the
    # "_pre" figures and the KL from before differ by design: a batch's "before" is the unedited model, a sequential
    # edit's the model after the others).
    post = lambda m: {k: v for k, v in m.items()  # noqa: E731
                      if not k.endswith("_pre") and k != "neighborhood_kl" and v is not None}
    assert post(batch[-1].metrics) == pytest.approx(post(seq[-1].metrics))
    assert batch[0].metrics["efficacy_magnitude_pre"] == pytest.approx(seq[0].metrics["efficacy_magnitude_pre"])


def test_check_batch_size_names_the_flag():
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="--batch-size must be an integer >= 1"):
            check_batch_size(bad)


def test_cli_edit_batch_size(tmp_path, fact_gpt2):
    model, _ = fact_gpt2
    path = write_memit_hparams(_hp(model, window=(1, 2), v_num_grad_steps=5), tmp_path / "m.yaml")
    facts = tmp_path / "f.json"
    facts.write_text(json.dumps(json.loads((GPT2 / "counterfact.json").read_text())[:3]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "rome_locate", "edit", "--model", str(GPT2), "--hparams", str(path),
                          "--facts", str(facts), "--batch-size", "3", "--out", str(tmp_path / "out"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "every fact in the hyperparameters' window [1, 2]" in run.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["settings"]["batch_size"] == 3 and data["settings"]["hparams"]["alg_name"] == "MEMIT"
    assert [r["layers"] for r in data["records"]] == [[1, 2]] * 3
    bad = subprocess.run([sys.executable, "-m", "rome_locate", "edit", "--model", str(GPT2), "--hparams", str(path),
                          "--facts", str(facts), "--batch-size", "0", "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "--batch-size must be an integer >= 1, got 0" in bad.stderr


def test_windows_hold_the_dataset_layer_and_never_the_last():
    effects = [0.1, 0.2, 0.5, 0.3, 0.1, 0.05, 0.0, -0.1]
    centre, windows = propose_windows(effects, 8, max_size=3)
    assert centre == 2
    assert windows == [(2,), (1, 2), (2, 3), (0, 1, 2), (1, 2, 3), (2, 3, 4)]
    _, near_end = propose_windows([0, 0, 0, 0, 0, 0.1, 0.9, 0.2], 8, max_size=3)
    assert all(7 not in w and 6 in w for w in near_end)  # the last layer is never a candidate
    assert easyedit_window(8) == (4, 5, 6, 7) and easyedit_window(32) == (4, 5, 6, 7, 8)
    assert easyedit_window(3) == (0, 1, 2)


def test_window_search_runs_end_to_end(fact_gpt2):
    model, tok = fact_gpt2
    facts = load_facts(GPT2 / "counterfact.json")[:40]
    grid = [WindowSetting(100.0, 4.0, 1.0, 10), WindowSetting(15000.0, 4.0, 1.0, 10)]
    v = run_window_validation(model, tok, facts, _hp(model), n_calibration=6, n_test=6, trial_batch=3, max_batch=6,
                              budget=30, grid=grid, max_window=2, progress=False, log=lambda m: None)
    assert v.n_calibration == 6 and v.n_test == 6 and not set(v.calibration_ids) & set(v.test_ids)
    assert v.chosen.window in v.windows and v.chosen.setting in grid
    assert [(f.name, f.batch_size) for f in v.test] == [("validated window", 6), ("validated window", 3),
                                                        ("EasyEdit's default window", 6)]
    assert v.test[-1].window == (4, 5, 6, 7)
    assert json.loads(json.dumps(v.to_json()))["chosen"]["window"] == list(v.chosen.window)


def test_cli_hparams_alg_memit_writes_easyedits_yaml_and_its_record(tmp_path):
    from conftest import require_easyedit

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "m.yaml"
    base = [sys.executable, "-m", "rome_locate", "hparams", "--model", str(GPT2), "--facts",
            str(GPT2 / "counterfact.json"), "--stats-dir", str(GPT2 / "stats"), "--quiet"]
    bad = subprocess.run(base + ["--alg", "MEMIT", "--no-validate", "-o", str(out)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode != 0 and "--alg MEMIT writes a window chosen by trial edits" in bad.stderr
    run = subprocess.run(base + ["--alg", "MEMIT", "-o", str(out), "--limit", "40", "--calibration-facts", "4",
                                 "--test-facts", "4", "--trial-batch", "2", "--max-batch", "4", "--max-window", "1",
                                 "--budget", "20"], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    assert "verdict: layers [" in run.stdout
    text = out.read_text()
    assert text.startswith("# Generated by `rome-locate hparams` (validated, MEMIT)")
    record = json.loads((tmp_path / "m.validation.json").read_text())
    assert record["alg_name"] == "MEMIT" and len(record["test_ids"]) == 4
    assert (tmp_path / "m.validation.md").read_text().startswith("# Validated MEMIT hyperparameters")
    loaded = load_memit_hparams(out)
    assert loaded.layers == list(record["chosen"]["window"]) and loaded.lm_head_module == "transformer.wte"
    require_easyedit()
    from rome_locate.easyedit import import_easyedit

    assert import_easyedit().MEMITHyperParams.from_hparams(str(out)).layers == loaded.layers
    # A second run may write over its own files (and only those).
    again = subprocess.run(base + ["--alg", "MEMIT", "-o", str(out), "--limit", "40", "--calibration-facts", "4",
                                   "--test-facts", "4", "--trial-batch", "2", "--max-batch", "4", "--max-window",
                                   "1", "--budget", "20"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr


def test_mass_editing_inputs_that_contradict_are_named(fact_gpt2, tmp_path, monkeypatch):
    from rome_locate import memit
    from rome_locate.rome import EditError

    model, tok = fact_gpt2
    facts = load_facts(GPT2 / "counterfact.json")[:2]
    with pytest.raises(ValueError, match="cannot run with --batch-size or a MEMIT/AlphaEdit window"):
        run_pipeline(model, tok, facts, _hp(model), sweep=True, progress=False)
    bad = {**yaml.safe_load(write_memit_hparams(_hp(model, alg="AlphaEdit"), tmp_path / "a.yaml").read_text()),
           "mom2_adjustment": False}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(HParamsError, match="AlphaEdit projects onto the null space"):
        load_memit_hparams(tmp_path / "b.yaml")
    digest = params_hash(model)
    monkeypatch.setattr(memit, "compute_value",
                        lambda *a, **k: (torch.full((64,), float("nan")), {"p_target": 0.0}))
    with pytest.raises(EditError, match="z .* became non-finite"):
        memit.apply_memit(model, tok, facts, _hp(model))
    assert params_hash(model) == digest


@pytest.mark.parametrize("path", [p for alg in ("MEMIT", "AlphaEdit") for p in sorted(
    (GPT2.parent.parent.parent / "hparams" / alg).glob("fact-*.yaml"))], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_window_yamls_load_in_easyedit_and_match_their_records(path):
    """Each shipped MEMIT/AlphaEdit YAML is EasyEdit's class, holds its record's chosen window and settings, and was
    measured on facts the search never saw."""
    from conftest import require_easyedit

    require_easyedit()
    from rome_locate.easyedit import import_easyedit

    import_easyedit()
    from easyeditor.models.alphaedit.AlphaEdit_hparams import AlphaEditHyperParams
    from easyeditor.models.memit.memit_hparams import MEMITHyperParams

    loaded = {"MEMIT": MEMITHyperParams, "AlphaEdit": AlphaEditHyperParams}[path.parent.name].from_hparams(str(path))
    record = json.loads(path.with_suffix(".validation.json").read_text())
    assert loaded.alg_name == record["alg_name"] == path.parent.name
    assert loaded.layers == record["chosen"]["window"]
    for key, value in record["chosen"]["setting"].items():
        if value is not None:
            assert getattr(loaded, key) == value, key
    assert not set(record["test_ids"]) & set(record["calibration_ids"])
    assert load_memit_hparams(path, n_layers=8).layers == loaded.layers
