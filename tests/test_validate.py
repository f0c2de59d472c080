"""The validated hyperparameter search: split, shortlist, schedule, objective, intervals, rules, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from rome_locate import fact_models as FM

ROOT = Path(__file__).resolve().parent.parent
from rome_locate.facts import Fact
from rome_locate.choose import LayerRule
from rome_locate.validate import (Interval, TrialScores, ValidationError, bootstrap, calibrate_threshold,
                                  default_grid, objective, schedule, shortlist, split_by_subject)


def traced_layer(effects, candidates, fallback, threshold):
    """The layer the one traced rule (`choose.LayerRule`) decides."""
    return LayerRule("traced", fallback, tuple(candidates), threshold, "test").traced(effects).layer


def validated_pick(results, fallback):
    """The layer the one validated rule picks from trial edits."""
    return LayerRule("validated", fallback, tuple(results), 0.0, "test").pick(results).layer


def _fact(subject, i):
    return Fact(prompt=f"{subject} plays the", subject=subject, target="piano", target_new="harp", id=str(i))


def test_split_is_seeded_and_disjoint_by_subject():
    facts = [_fact(f"S{i % 6}", i) for i in range(18)]
    calib, test = split_by_subject(facts, 0.5, seed=1)
    assert {f.subject for f in calib}.isdisjoint({f.subject for f in test})
    assert len(calib) + len(test) == 18 and len(test) == 9
    assert split_by_subject(facts, 0.5, seed=1) == (calib, test)
    assert split_by_subject(facts, 0.5, seed=2) != (calib, test)
    with pytest.raises(ValidationError, match="too few facts to split"):
        split_by_subject([_fact("A", 0), _fact("A", 1), _fact("B", 2)], 0.5)
    with pytest.raises(ValidationError, match="test-fraction"):
        split_by_subject(facts, 1.0)


def test_shortlist_never_offers_the_last_layer():
    assert shortlist([0.1, 0.5, 0.2, 0.0], 4) == (1, [0, 1, 2])
    assert shortlist([0.0, 0.1, 0.2, 0.9], 4) == (2, [1, 2])  # the last layer's effect is ignored
    assert shortlist([0.9, 0.1, 0.0], 3) == (0, [0, 1])


def test_schedule_fits_the_budget_and_halves():
    rounds = schedule(24, 40, 300)
    assert [k for k, _ in rounds] == [24, 8, 3]
    ns = [n for _, n in rounds]
    assert ns == sorted(ns) and ns[-1] <= 40
    cost = sum(k * (n - p) for (k, n), p in zip(rounds, [0] + ns[:-1]))
    assert cost <= 300
    with pytest.raises(ValidationError, match="too small"):
        schedule(24, 40, 20)
    assert schedule(3, 5, 3) == [(3, 1)]


def test_objective_is_the_harmonic_mean_of_mean_rates():
    s = [TrialScores(1.0, 0.5, 1.0, 0.3), TrialScores(1.0, None, 0.5, 0.2)]
    # efficacy 1.0, paraphrase 0.5, neighbourhood 0.75
    assert objective(s) == pytest.approx(3 / (1 + 2 + 4 / 3))
    assert objective([TrialScores(0.0, 1.0, 1.0, 0.0)]) == 0.0


def test_bootstrap_interval_contains_the_mean():
    iv = bootstrap([1, 0, 1, 1, 0, 1, 1, 1], seed=0)
    assert isinstance(iv, Interval) and iv.n == 8
    assert iv.low <= iv.mean == 0.75 <= iv.high and iv.low < iv.high
    assert bootstrap([None]).mean is None


def test_traced_rule_falls_back_below_the_calibrated_threshold():
    cands = [0, 1, 2]
    assert traced_layer([0.5, 0.1, 0.0, 0.9], cands, 1, threshold=0.2) == 0
    assert traced_layer([0.5, 0.45, 0.0, 0.9], cands, 2, threshold=0.2) == 2
    good, bad = TrialScores(1.0, 1.0, 1.0, 0.5), TrialScores(0.0, 0.0, 1.0, -0.5)
    # Fact 1 has a clear trace and does well at its traced layer 0; fact 2 is unclear and does badly there.
    effects = [[0.9, 0.1, 0.0], [0.3, 0.29, 0.0]]
    results = [{0: good, 1: bad, 2: bad}, {0: bad, 1: good, 2: bad}]
    t = calibrate_threshold(effects, results, cands, fallback=1)
    assert 0.01 < t <= 0.8
    assert traced_layer(effects[0], cands, 1, t) == 0 and traced_layer(effects[1], cands, 1, t) == 1


def test_validated_pick_ignores_paraphrases_and_prefers_the_fallback_on_ties():
    a = TrialScores(1.0, 0.0, 1.0, 0.4)
    b = TrialScores(1.0, 1.0, 0.6, 0.9)
    assert validated_pick({3: a, 4: b}, fallback=4) == 3
    assert validated_pick({3: a, 4: a}, fallback=4) == 4


def test_grid_has_the_paper_settings():
    grid = default_grid()
    assert len(grid) == len(set(grid)) == 8
    assert any(s.v_lr == 0.5 and s.v_num_grad_steps == 20 and s.clamp_norm_factor == 4 and s.v_weight_decay == 0.5
               and s.context_template_length_params for s in grid)


def _hparams_cli(tmp_path, facts, *extra):
    from rome_locate.cli import main

    out = tmp_path / "h.yaml"
    argv = ["hparams", "--model", str(FM.fact_model_dir("gpt2")), "--facts", str(facts), "--device", "cpu",
            "-o", str(out), "--stats-dir", str(tmp_path / "stats"), "--self-sample", "40", "--grid", "paper",
            "--samples", "3", "--quiet", *extra]
    return main(argv), out


def test_hparams_validates_on_held_out_facts(tmp_path, capsys):
    # Known facts only (no target_new): requests are built, the search runs, the YAML loads.
    rc, out = _hparams_cli(tmp_path, FM.facts_path("gpt2"), "--limit", "60", "--budget", "3",
                           "--calibration-facts", "3", "--test-facts", "3")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "built counterfactual requests" in captured.err and "sampled from the model itself" in captured.err
    assert "verdict:" in captured.out
    text = out.read_text()
    assert text.startswith("# Generated by `rome-locate hparams` (validated)")
    h = yaml.safe_load(text)
    v = json.loads((tmp_path / "h.validation.json").read_text())
    assert h["layers"] == [v["chosen"]["layer"]] and h["layers"][0] in v["candidates"]
    assert h["v_lr"] == 0.5 and h["mom2_adjustment"] is True and h["mom2_dataset"] == "self_sample"
    # bind_model's absolute paths, as the trace-only YAML: the model, and the statistics where --stats-dir said.
    assert h["model_name"] == str(FM.fact_model_dir("gpt2").resolve())
    assert h["stats_dir"] == str((tmp_path / "stats").resolve()) and (tmp_path / "stats").is_dir()
    assert v["trace_settings"]["samples"] == 3 and v["model_fingerprint"]["digest"]
    assert v["n_calibration"] == 3 and v["n_test"] == 3 and v["requests_built"] is True
    assert len(v["test_ids"]) == 3 and not set(v["test_ids"]) & set(v["calibration_ids"])
    assert [m["name"] for m in v["test"]][:3] == ["fixed", "traced", "validated"]
    assert (tmp_path / "h.validation.md").read_text().startswith("# Validated ROME hyperparameters")
    assert 0 <= v["test"][0]["efficacy"]["mean"] <= 1 and not math.isnan(v["test"][0]["efficacy"]["low"])


def test_hparams_clear_errors(tmp_path, capsys):
    few = tmp_path / "few.json"
    facts = json.loads(FM.facts_path("gpt2").read_text())
    few.write_text(json.dumps(facts[:3]))
    rc, out = _hparams_cli(tmp_path, few, "--budget", "3")
    assert rc == 2 and "too few facts to split" in capsys.readouterr().err and not out.exists()
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([dict(r, attribute="nothing", prediction=" nothing") for r in facts[:8]]))
    rc, _ = _hparams_cli(tmp_path, unknown, "--budget", "3")
    assert rc == 2 and "no fact" in capsys.readouterr().err
    rc, _ = _hparams_cli(tmp_path, FM.facts_path("gpt2"), "--limit", "40", "--budget", "1")
    assert rc == 2 and "too small" in capsys.readouterr().err and not out.exists()


def test_edit_per_fact_layers_stay_among_validated_candidates(tmp_path, capsys):
    from rome_locate.cli import main
    from rome_locate.hparams import generate_hparams, write_hparams

    model, _ = FM.load_fact_model("gpt2")
    yaml_path = tmp_path / "v.yaml"
    h = generate_hparams(model, None, 2, str(FM.fact_model_dir("gpt2")), v_num_grad_steps=20, v_lr=1.0,
                         clamp_norm_factor=100.0, v_weight_decay=0.0, context_template_length_params=[])
    write_hparams(h, yaml_path)
    (tmp_path / "v.validation.json").write_text(json.dumps({"candidates": [1, 2, 3], "threshold": None}))
    base = ["edit", "--model", str(FM.fact_model_dir("gpt2")), "--device", "cpu", "--facts",
            str(FM.counterfact_path("gpt2")), "--hparams", str(yaml_path), "--limit", "3", "--samples", "3",
            "--quiet"]
    # Threshold "inf" (None): every fact falls back to the validated layer.
    assert main(base + ["--layers", "traced", "--out", str(tmp_path / "t")]) == 0
    assert "candidates [1, 2, 3], fallback layer 2" in capsys.readouterr().err
    data = json.loads((tmp_path / "t" / "results.json").read_text())
    assert [o["layer"] for o in data["records"]] == [2, 2, 2]
    assert main(base + ["--layers", "validated", "--out", str(tmp_path / "v")]) == 0
    data = json.loads((tmp_path / "v" / "results.json").read_text())
    assert len(data["records"]) == 3 and all(o["layer"] in (1, 2, 3) for o in data["records"])
    # Without a validation file: the plain traced argmax, never the last layer.
    (tmp_path / "v.validation.json").unlink()
    assert main(base + ["--layers", "traced", "--out", str(tmp_path / "p")]) == 0
    data = json.loads((tmp_path / "p" / "results.json").read_text())
    assert all(0 <= o["layer"] < 7 for o in data["records"])


def test_validated_always_tries_the_validated_layer():
    # The trace prefers layers 1 and 2, but the validated layer 0 is always among the tries.
    assert LayerRule("validated", 0, (0, 1, 2), 0.0, "t").tries([0.1, 0.5, 0.4, 0.9]) == [0, 1]
    assert LayerRule("validated", 1, (0, 1, 2), 0.0, "t").tries([0.1, 0.5, 0.4, 0.9]) == [1, 2]


def test_hparams_never_writes_over_validation_files_it_did_not_write(tmp_path, capsys):
    for name, text in (("h.validation.json", '{"mine": 1}\n'), ("h.validation.md", "# my notes\n")):
        foreign = tmp_path / name
        foreign.write_text(text)
        rc, out = _hparams_cli(tmp_path, FM.facts_path("gpt2"), "--budget", "3")
        assert rc == 2 and "was not written by rome-locate" in capsys.readouterr().err
        assert foreign.read_text() == text and not out.exists()
        foreign.unlink()


def test_generation_objective_reads_the_generation_metrics():
    # Issue 20: the same trials, judged by generation efficacy and paraphrase in place of the teacher-forced ones.
    s = [TrialScores(1.0, 1.0, 1.0, 0.3, gen_efficacy=0.0, gen_paraphrase=0.5),
         TrialScores(1.0, 1.0, 0.5, 0.2, gen_efficacy=1.0, gen_paraphrase=None)]
    assert objective(s) == pytest.approx(3 / (1 + 1 + 1 / 0.75))
    assert objective(s, "generation") == pytest.approx(3 / (2 + 2 + 1 / 0.75))
    with pytest.raises(ValidationError, match="--objective must be one of"):
        objective(s, "bleu")


def test_validation_record_written_before_the_generation_metrics_still_loads():
    # Such a record's modes have no generation figures and it names no objective: CounterFact's was the only one.
    from rome_locate.configure import markdown
    from rome_locate.validation_records import Validation

    new = json.loads((ROOT / "hparams" / "ROME" / "fact-gpt2.validation.json").read_text())
    assert new["objective_name"] == "counterfact" and new["test"][0]["gen_score"]["mean"] is not None
    old = {k: v for k, v in new.items() if k != "objective_name"}
    old["test"] = [{k: v for k, v in m.items() if not k.startswith("gen_")} for m in new["test"]]
    v = Validation.from_json(old)
    assert v.objective_name == "counterfact" and v.test[0].gen_efficacy is None and v.test[0].score.mean is not None
    # JSON's null threshold stands for infinity (every fact at the chosen layer).
    assert "| n/a | n/a | n/a |" in markdown(dataclasses.replace(v, threshold=math.inf))


def test_hparams_generation_objective_reports_both(tmp_path, capsys):
    rc, out = _hparams_cli(tmp_path, FM.facts_path("gpt2"), "--limit", "60", "--budget", "3",
                           "--calibration-facts", "3", "--test-facts", "3", "--objective", "generation")
    assert rc == 0, capsys.readouterr().err
    v = json.loads((tmp_path / "h.validation.json").read_text())
    assert v["objective_name"] == "generation" and v["objective"].startswith("generation score")
    for mode in v["test"]:
        assert mode["score"]["mean"] is not None and mode["gen_score"]["mean"] is not None
        assert 0 <= mode["gen_efficacy"]["mean"] <= 1 and mode["gen_efficacy"]["n"] == 3
        assert mode["gen_paraphrase"]["n"] == mode["paraphrase"]["n"]  # the facts with rephrasings
    md = (tmp_path / "h.validation.md").read_text()
    assert "| gen efficacy | gen paraphrase | gen score |" in md and "Objective (generation" in md
    assert "objective (generation)" in out.read_text()
    # A rerun over its own files is allowed: they are recognised as rome-locate's.
    out.unlink()
    rc, _ = _hparams_cli(tmp_path, FM.facts_path("gpt2"), "--limit", "60", "--budget", "3",
                         "--calibration-facts", "3", "--test-facts", "3")
    assert rc == 0 and json.loads((tmp_path / "h.validation.json").read_text())["objective_name"] == "counterfact"


def test_hparams_objective_is_one_of_two(capsys):
    from rome_locate.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["hparams", "--model", "m", "--facts", "f", "-o", "o.yaml", "--objective", "bleu"])
    assert exit_.value.code == 2
    assert "argument --objective: invalid choice: 'bleu' (choose from 'counterfact', 'generation')" in \
        capsys.readouterr().err


def test_a_miss_never_reads_as_equal_to_its_target():
    """0.848 against 0.85 prints a third decimal; a clear miss and a hit keep two."""
    from types import SimpleNamespace

    from rome_locate.configure import target_state

    iv = lambda mean: SimpleNamespace(mean=mean)  # noqa: E731
    figures = SimpleNamespace(efficacy=iv(0.5), paraphrase=iv(0.85), neighborhood=iv(0.848))
    assert target_state(figures, {"efficacy": 0.9, "paraphrase": 0.8, "neighborhood": 0.85}) == \
        "MISSES efficacy 0.50 < 0.90, neighborhood 0.848 < 0.85"
    assert target_state(figures, {"paraphrase": 0.8}) == "meets the targets"
    assert target_state(SimpleNamespace(efficacy=iv(None)), {"efficacy": 0.9}) == "meets the targets"
