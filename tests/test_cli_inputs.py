"""Bad input to trace/locate/hparams/stats (issue 11): one clear line naming the input and the fix, exit code 2,
checked before any tracing, and nothing written over a file rome-locate did not write."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import build_tiny_model
from rome_locate import cli
from rome_locate import locate as locate_mod
from rome_locate.facts import load_facts
from rome_locate.fact_models import fact_model_dir, facts_path
from rome_locate.files import safe_name

M = str(fact_model_dir("gpt2"))
LLAMA = str(fact_model_dir("llama"))
FACTS = str(facts_path("gpt2"))


def _run(argv, capsys):
    """(exit code, the error lines of stderr, stdout)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line.startswith("rome-locate") and "error" in line], out


def _locate(out, *extra):
    return ["locate", "--model", M, "--facts", FACTS, "--out", str(out), "--device", "cpu", "--samples", "2",
            "--limit", "2", "--quiet", *extra]


@pytest.fixture
def no_tracing(monkeypatch):
    """Fails the test if any fact is traced: the checks must come first."""
    def trace(*args, **kwargs):
        raise AssertionError("traced before the input was checked")

    monkeypatch.setattr(locate_mod, "trace_each_by_method", trace)


# ---- 1, 6, 7: the output path --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '[{"prompt": "A is in", "subject": "A"}]',  # a JSON facts file without a final newline
    '[\n  {\n    "prompt": "A is in",\n    "subject": "A"\n  }\n]\n',  # pretty JSON
    '{"prompt": "A is in", "subject": "A"}\n{"prompt": "B is in", "subject": "B"}',  # JSONL facts, torn-looking end
])
def test_out_that_rome_locate_did_not_write_is_never_touched(tmp_path, capsys, no_tracing, text):
    out = tmp_path / "facts.json"
    out.write_text(text)
    code, errors, _ = _run(_locate(out), capsys)
    assert code == 2 and len(errors) == 1 and str(out) in errors[0] and "not a locate output" in errors[0]
    assert out.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.json"]


def test_out_is_a_directory_or_under_a_file_or_not_writable(tmp_path, capsys, no_tracing):
    code, errors, _ = _run(_locate(tmp_path), capsys)
    assert code == 2 and len(errors) == 1 and "is a directory" in errors[0]
    a_file = tmp_path / "f"
    a_file.write_text("x")
    code, errors, _ = _run(_locate(a_file / "out.jsonl"), capsys)
    assert code == 2 and len(errors) == 1 and "not a directory" in errors[0] and str(a_file) in errors[0]
    code, errors, _ = _run(_locate("/sys/rome-locate-test.jsonl"), capsys)
    assert code == 2 and len(errors) == 1 and "cannot write" in errors[0]
    code, errors, _ = _run(_locate(tmp_path / "ok.jsonl", "--plots", str(a_file)), capsys)
    assert code == 2 and len(errors) == 1 and "--plots" in errors[0] and "not a directory" in errors[0]
    assert a_file.read_text() == "x" and not (tmp_path / "ok.jsonl").exists()


def test_one_writer_per_out_lock_and_no_duplicates(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    lock = tmp_path / "a.jsonl.lock"
    lock.write_text("pid 1 on another host\n")
    code, errors, _ = _run(_locate(out), capsys)
    assert code == 2 and len(errors) == 1 and str(lock) in errors[0] and "delete" in errors[0]
    assert not out.exists()
    lock.unlink()
    assert _run(_locate(out), capsys)[0] == 0
    assert not lock.exists()
    first = out.read_text()
    assert _run(_locate(out), capsys)[0] == 0
    assert out.read_text() == first and len(first.splitlines()) == 2


# ---- 2: stale records ------------------------------------------------------------------------------------------


def test_rerun_with_another_model_and_settings_refuses(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert _run(_locate(out), capsys)[0] == 0
    before = out.read_text()
    argv = ["locate", "--model", LLAMA, "--facts", str(facts_path("llama")), "--out", str(out), "--device", "cpu",
            "--samples", "10", "--limit", "2", "--quiet"]
    code, errors, _ = _run(argv, capsys)
    assert code == 2 and len(errors) == 1
    assert "start fresh" in errors[0] and "another --out or delete" in errors[0]
    assert out.read_text() == before


# ---- 4, 10: NaN and bad noise ----------------------------------------------------------------------------------


@pytest.mark.parametrize("noise, message", [("nan", "finite"), ("inf", "finite"), ("-1", ">= 0")])
def test_bad_noise_is_one_line(tmp_path, capsys, no_tracing, noise, message):
    code, errors, _ = _run(_locate(tmp_path / "a.jsonl", "--noise", noise), capsys)
    assert code == 2 and len(errors) == 1 and "noise" in errors[0] and message in errors[0]
    assert not (tmp_path / "a.jsonl").exists()


def _nan_model(tmp_path, tiny_tokenizer, name):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = float("nan")
    path = tmp_path / "nan_model"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("weight", ["transformer.h.1.mlp.c_fc.weight", "transformer.wte.weight"])
def test_nan_weight_is_an_error_naming_the_fact_and_nothing_non_finite_is_written(tmp_path, capsys,
                                                                                  tiny_tokenizer, weight):
    model_dir = _nan_model(tmp_path, tiny_tokenizer, weight)
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Miles Davis plays the", "subject": "Miles Davis", "id": "m1"}\n')
    out = tmp_path / "a.jsonl"
    code, errors, _ = _run(["locate", "--model", str(model_dir), "--facts", str(facts), "--out", str(out),
                            "--device", "cpu", "--samples", "2", "--quiet"], capsys)
    assert code == 2 and len(errors) == 1 and ("'m1'" in errors[0] or "NaN" in errors[0]), errors
    assert "nan" not in (out.read_text().lower() if out.exists() else "")
    yaml_out = tmp_path / "h.yaml"
    code, errors, _ = _run(["hparams", "--model", str(model_dir), "--facts", str(facts), "-o", str(yaml_out),
                            "--device", "cpu", "--samples", "2", "--quiet"], capsys)
    assert code == 2 and len(errors) == 1 and not yaml_out.exists()


def test_non_finite_record_is_refused_by_the_writer(tmp_path):
    from rome_locate.locate import record_line

    with pytest.raises(ValueError, match="'f1'.*scores"):
        record_line({"fact_id": "f1", "scores": [0.1, float("nan")]})


# ---- 5, 14, 16: facts input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_below_one_is_an_error(tmp_path, capsys, no_tracing, limit):
    code, errors, _ = _run(_locate(tmp_path / "a.jsonl", "--limit", limit), capsys)
    assert code == 2 and len(errors) == 1 and "--limit" in errors[0] and ">= 1" in errors[0]


def test_broken_jsonl_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "A is in", "subject": "A"}\n\n{"prompt": "B is in", "subject": "B"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"f\.jsonl:4: not valid JSON"):
        load_facts(path)


def test_jsonl_is_streamed_and_limit_stops_reading(tmp_path):
    path = tmp_path / "f.jsonl"
    good = '{"prompt": "A is in", "subject": "A"}\n'
    path.write_text(good * 3 + "this line is never read\n")
    assert len(load_facts(path, limit=3)) == 3
    with pytest.raises(ValueError, match=":4:"):
        load_facts(path)
    array = tmp_path / "f.json"
    array.write_text(json.dumps([json.loads(good)] * 3, indent=2))
    assert len(load_facts(array, limit=2)) == 2 and len(load_facts(array)) == 3
    with pytest.raises(ValueError, match=">= 1"):
        load_facts(path, limit=0)


# ---- 8: prompts longer than the model's context ------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_named_and_skippable(tmp_path, capsys):
    long_prompt = "Dorven Kaltmoor " + "and the river " * 30 + "was born in"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": long_prompt, "subject": "Dorven Kaltmoor", "id": "long"}) + "\n"
                     + json.dumps({"prompt": "Dorven Kaltmoor was born in", "subject": "Dorven Kaltmoor",
                                   "id": "short"}) + "\n")
    argv = ["locate", "--model", M, "--facts", str(facts), "--device", "cpu", "--samples", "2", "--quiet"]
    code, errors, _ = _run(argv, capsys)
    assert code == 2 and len(errors) == 1 and "'long'" in errors[0] and "64" in errors[0], errors
    with pytest.warns(UserWarning, match="skipped fact 'long'.*64"):
        code, _, out = _run(argv + ["--skip-errors"], capsys)
    assert code == 0 and [json.loads(line)["fact_id"] for line in out.splitlines() if line.startswith("{")] == [
        "short"]


# ---- 12: stats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--model-name", "../escaped"], "--model-name"),
    (["--model-name", "a/b"], "--model-name"),
    (["--mom2-dataset", "../x"], "--mom2-dataset"),
    (["--n-samples", "-1"], "--n-samples"),
    (["--n-samples", "0"], "--n-samples"),
])
def test_stats_never_writes_outside_stats_dir(tmp_path, capsys, extra, message):
    stats = tmp_path / "stats"
    code, errors, _ = _run(["stats", "--model", M, "--corpus", str(fact_model_dir("gpt2") / "corpus.txt"),
                            "--layers", "1", "--stats-dir", str(stats), "--device", "cpu", *extra], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- 13: file names ----------------------------------------------------------------------------------------------


def test_safe_name_is_injective():
    names = ["x/1", "x_1", "x 1", "x:1", "a" * 80, "a" * 81, "0", "known-7.b"]
    assert len({safe_name(n) for n in names}) == len(names)
    assert safe_name("0") == "0" and safe_name("known-7.b") == "known-7.b"  # safe names are kept
    assert all(len(safe_name(n)) <= 60 + 9 for n in names)


# ---- 15: hand-written inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["v_lr=[1,", "v_lr=!!python/object/apply:os.system ['echo hi']"])
def test_hparams_set_with_bad_yaml_is_one_line(tmp_path, capsys, no_tracing, item):
    out = tmp_path / "h.yaml"
    code, errors, _ = _run(["hparams", "--model", M, "--facts", FACTS, "-o", str(out), "--layer", "1",
                            "--device", "cpu", "--set", item], capsys)
    assert code == 2 and len(errors) == 1 and "--set" in errors[0] and "v_lr" in errors[0], errors
    assert not out.exists()


def test_hparams_output_not_written_by_rome_locate_is_kept(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    out.write_text("alg_name: ROME\nlayers: [5]\n")
    code, errors, _ = _run(["hparams", "--model", M, "--facts", FACTS, "-o", str(out), "--layer", "1",
                            "--device", "cpu"], capsys)
    assert code == 2 and len(errors) == 1 and str(out) in errors[0]
    assert out.read_text() == "alg_name: ROME\nlayers: [5]\n"
    fresh = tmp_path / "fresh.yaml"
    argv = ["hparams", "--model", M, "--facts", FACTS, "-o", str(fresh), "--layer", "1", "--device", "cpu"]
    assert _run(argv, capsys)[0] == 0 and _run(argv, capsys)[0] == 0  # its own output is rewritten


# ---- 17: an unreachable hub --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [("some-org/some-model", "HF_HUB_OFFLINE"),
                                           ("./no/such/dir", "no such directory")])
def test_offline_hub_name_fails_at_once(tmp_path, capsys, monkeypatch, name, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, errors, _ = _run(["locate", "--model", name, "--facts", FACTS, "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0] and repr(name) in errors[0], errors
    assert time.perf_counter() - start < 10


def test_negative_max_neighborhood_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """`eval --max-neighborhood -1` used to drop the last neighbourhood prompt silently (a slice [:-1])."""
    from rome_locate import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --max-neighborhood was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    code, errors, _ = _run(["eval", "--model", M, "--facts", str(fact_model_dir("gpt2") / "counterfact.json"),
                            "--hparams", "hparams/ROME/fact-gpt2.yaml", "--out", str(tmp_path / "o"),
                            "--device", "cpu", "--max-neighborhood", "-1"], capsys)
    assert code == 2 and len(errors) == 1 and "--max-neighborhood must be >= 0 prompts, got -1" in errors[0]
    assert not (tmp_path / "o").exists()
