"""locate(): JSONL output, resume, plots, noise once per dataset; and the `trace`/`locate` CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model

from rome_locate import cli
from rome_locate import locate as locate_mod
from rome_locate.choose import LayerChoice, choose_layer
from rome_locate.facts import Fact
from rome_locate.hooks import hook_count
from rome_locate.locate import locate
from rome_locate.models import fingerprint
from rome_locate.plots import average_effect_plot, heatmap, token_labels
from rome_locate.trace import TraceResult, TraceSettings, noise_level, trace_fact

FACTS = [
    Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Paris", id="0"),
    Fact(prompt="Alma Berridge speaks the language of", subject="Alma Berridge", target="French", id="1"),
    Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", id="2"),
    Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle", id="3"),
]
REQUIRED = {"prompt", "subject", "subject_range", "answer", "high_score", "low_score", "scores", "layer", "known",
            "fact_id", "runner_up", "margin", "effect", "noise", "samples", "window"}


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    return build_tiny_model("gpt2", len(tiny_tokenizer)), tiny_tokenizer


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _noise(noise):
    s = TraceSettings(noise=noise)
    return s.fixed_noise, s.noise_factor


def test_noise_setting_is_normalised():
    assert _noise("3sigma") == (None, 3.0)
    assert _noise("2.5SIGMA") == (None, 2.5)
    assert _noise("0.1") == (0.1, None)
    assert _noise(0.2) == (0.2, None)
    assert TraceSettings().noise == "3sigma"
    with pytest.raises(ValueError, match="'loud'"):
        TraceSettings(noise="loud")


def test_locate_writes_one_line_per_fact_and_resumes(gpt2, tmp_path, monkeypatch):
    model, tok = gpt2
    out = tmp_path / "res.jsonl"
    pairs = locate(model, tok, FACTS[:2], TraceSettings(samples=2), out=out, progress=False)
    lines = _lines(out)
    assert len(lines) == 2 and len(pairs) == 2
    for line, (result, choice) in zip(lines, pairs):
        assert REQUIRED <= set(line)
        assert len(line["scores"]) == model.config.n_layer
        assert line["layer"] == choose_layer(result).layer == choice.layer
        assert TraceResult.from_json(line) == result and LayerChoice.from_json(line) == choice
    # One level for the whole dataset: 3 sigma pooled over the given facts' subjects.
    expected = noise_level(model, tok, FACTS[:2])
    assert [line["noise"] for line in lines] == pytest.approx([expected, expected], rel=1e-6)
    assert expected != pytest.approx(noise_level(model, tok, FACTS[:1]), rel=1e-3)  # not a per-fact level

    calls = []
    real = locate_mod.trace_each_by_method

    def counting(model, tok, facts, settings, **kw):
        calls.extend(fact.id for fact in facts)
        return real(model, tok, facts, settings, **kw)

    monkeypatch.setattr(locate_mod, "trace_each_by_method", counting)
    again = locate(model, tok, FACTS[:2], TraceSettings(samples=2), out=out, progress=False)
    assert calls == [] and len(_lines(out)) == 2
    assert [r for r, _ in again] == [r for r, _ in pairs]
    # New facts are appended; the old ones are not traced again.
    more = locate(model, tok, FACTS, TraceSettings(samples=2), out=out, progress=False)
    assert calls == ["2", "3"]
    assert [line["fact_id"] for line in _lines(out)] == ["0", "1", "2", "3"]
    assert [r.fact_id for r, _ in more] == ["0", "1", "2", "3"]
    assert hook_count(model) == 0


def test_torn_last_line_is_dropped_and_retraced(gpt2, tmp_path):
    model, tok = gpt2
    out = tmp_path / "res.jsonl"
    locate(model, tok, FACTS[:2], TraceSettings(samples=2), out=out, progress=False)
    text = out.read_text()
    first, second = text.splitlines()
    out.write_text(first + "\n" + second[: len(second) // 2])  # interrupted mid-write
    locate(model, tok, FACTS[:2], TraceSettings(samples=2), out=out, progress=False)
    lines = _lines(out)
    assert [line["fact_id"] for line in lines] == ["0", "1"]
    assert lines[1] == json.loads(second)


def test_other_kind_in_out_file_is_an_error(gpt2, tmp_path):
    model, tok = gpt2
    out = tmp_path / "res.jsonl"
    locate(model, tok, FACTS[:1], TraceSettings(samples=2), out=out, progress=False)
    with pytest.raises(ValueError, match="kind='mlp'.*kind='attn'.*another --out or delete"):
        locate(model, tok, FACTS[:1], TraceSettings(samples=2, kind="attn"), out=out, progress=False)


def test_records_carry_settings_and_model_and_resume_only_when_they_match(gpt2, tiny_tokenizer, tmp_path):
    model, tok = gpt2
    out = tmp_path / "res.jsonl"
    settings = TraceSettings(samples=2, full=True)
    pairs = locate(model, tok, FACTS[:1], settings, out=out, progress=False)
    line = _lines(out)[0]
    assert TraceSettings.from_json(line["settings"]) == settings == pairs[0][0].settings
    assert line["model"] == fingerprint(model).to_json() and pairs[0][0].model == fingerprint(model)
    # A full table also serves a request for the last-subject-token row.
    again = locate(model, tok, FACTS[:1], TraceSettings(samples=2), out=out, progress=False)
    assert again[0][0] == pairs[0][0]
    with pytest.raises(ValueError, match="samples=2 there, samples=3 asked.*another --out or delete"):
        locate(model, tok, FACTS[:1], TraceSettings(samples=3), out=out, progress=False)
    other = build_tiny_model("gpt2", len(tiny_tokenizer), seed=1)
    with pytest.raises(ValueError, match="another model.*another --out or delete"):
        locate(other, tok, FACTS[:1], settings, out=out, progress=False)
    assert len(_lines(out)) == 1


def test_bad_fact_raises_or_is_skipped(gpt2):
    model, tok = gpt2
    bad = Fact(prompt="Nobody lives here", subject="Somebody", id="bad")
    with pytest.raises(ValueError, match="'bad'.*Somebody"):
        locate(model, tok, [FACTS[0], bad], TraceSettings(samples=2), progress=False)
    with pytest.warns(UserWarning, match="skipped fact 'bad'"):
        pairs = locate(model, tok, [FACTS[0], bad], TraceSettings(samples=2), progress=False, skip_errors=True)
    assert [r.fact_id for r, _ in pairs] == ["0"]
    assert hook_count(model) == 0


def test_replace_mode_uses_other_facts_subjects(gpt2):
    model, tok = gpt2
    # In the tiny tokenizer "Paris" and "Lind" are both two tokens: each is the other's replacement.
    facts = [Fact(prompt="Paris is in the city of", subject="Paris", id="a"),
             Fact(prompt="Lind is in the city of", subject="Lind", id="b")]
    pairs = locate(model, tok, facts, TraceSettings(samples=4, noise_draws="replace"), progress=False)
    assert [r.samples for r, _ in pairs] == [1, 1]
    assert all(r.noise_draws == "replace" for r, _ in pairs)


def test_plots_per_fact_and_average(gpt2, tmp_path):
    model, tok = gpt2
    plots = tmp_path / "plots"
    pairs = locate(model, tok, FACTS[:2], TraceSettings(samples=2), plots_dir=plots, progress=False)
    assert all(r.table is not None and len(r.table) == len(r.tokens) for r, _ in pairs)
    names = sorted(p.name for p in plots.iterdir() if p.name != "rome-locate-plots.json")  # the settings drawn with
    assert names == ["average_effect_mlp.pdf", "average_effect_mlp.png", "trace_0_mlp.pdf", "trace_0_mlp.png",
                     "trace_1_mlp.pdf", "trace_1_mlp.png"]
    assert all((plots / n).stat().st_size > 1000 for n in names)
    assert (plots / "trace_0_mlp.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(plots.glob("*.tmp"))


def test_heatmap_needs_full_table_and_stars_subject(gpt2, tmp_path):
    model, tok = gpt2
    fast = trace_fact(model, tok, FACTS[2], TraceSettings(samples=2))
    with pytest.raises(ValueError, match="full=True"):
        heatmap(fast, tmp_path / "h")
    assert not list(tmp_path.iterdir())
    full = trace_fact(model, tok, FACTS[2], TraceSettings(samples=2, full=True, kind="attn"))
    labels = token_labels(full)
    b, e = full.subject_range
    assert [lab.endswith("*") for lab in labels] == [b <= i < e for i in range(len(labels))]
    paths = heatmap(full, tmp_path / "h")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    with pytest.raises(ValueError, match="kinds"):
        average_effect_plot([full, fast], tmp_path / "avg")


def _save_tiny(tmp_path, tok, family="gpt2"):
    model = build_tiny_model(family, len(tok))
    path = tmp_path / f"model_{family}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_locate_twice_resumes(tiny_tokenizer, tmp_path, capsys):
    model_dir = _save_tiny(tmp_path, tiny_tokenizer)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([
        {"known_id": i, "subject": f.subject, "attribute": f.target, "template": f.prompt.replace(f.subject, "{}"),
         "prediction": f.target, "prompt": f.prompt, "relation_id": "P1"} for i, f in enumerate(FACTS)
    ]))
    out = tmp_path / "out.jsonl"
    argv = ["locate", "--model", str(model_dir), "--facts", str(facts), "--out", str(out), "--device", "cpu",
            "--samples", "2", "--limit", "3", "--quiet"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "dataset layer:" in text and "3 facts traced" in text
    assert len(_lines(out)) == 3
    assert cli.main(argv[:-3] + ["--quiet"]) == 0  # all four facts now: only one is new
    assert [line["fact_id"] for line in _lines(out)] == ["0", "1", "2", "3"]
    assert cli.main(argv + ["--noise", "loud"]) == 2
    assert "'loud'" in capsys.readouterr().err


def test_cli_trace_writes_three_heatmaps(tiny_tokenizer, tmp_path, capsys):
    model_dir = _save_tiny(tmp_path, tiny_tokenizer, "llama")
    plots = tmp_path / "p"
    code = cli.main(["trace", "--model", str(model_dir), "--prompt", FACTS[2].prompt, "--subject", "Miles Davis",
                     "--target", "trumpet", "--plots", str(plots), "--device", "cpu", "--samples", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "choice (mlp): layer" in text
    assert "KNOWN" in text or "NOT known by the model" in text
    assert text.count("p_restored at token") == 3
    assert sorted(p.name for p in plots.glob("*.png")) == ["trace_attn.png", "trace_hidden.png", "trace_mlp.png"]
    code = cli.main(["trace", "--model", str(model_dir), "--prompt", "abc", "--subject", "xyz", "--device", "cpu"])
    assert code == 2
    assert "'xyz'" in capsys.readouterr().err


def test_locate_keeps_parameters(gpt2):
    model, tok = gpt2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    locate(model, tok, FACTS[:2], TraceSettings(samples=2, kind="attn"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_names_a_bad_model_and_a_missing_gpu(tmp_path, capsys):
    from rome_locate.cli import main

    facts = tmp_path / "f.json"
    facts.write_text('[{"prompt": "A is in", "subject": "A"}]')
    assert main(["locate", "--model", str(tmp_path), "--facts", str(facts), "--device", "cpu"]) == 2
    assert f"--model '{tmp_path}' is not a loadable local directory" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["locate", "--model", str(tmp_path), "--facts", str(facts), "--device", "cuda"]) == 2
        assert "--device cuda: this torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("error, user", [
    (FileNotFoundError("facts file not found: x.json"), True),
    (ValueError("noise must be a finite level"), True),
    (IsADirectoryError("out is a directory"), True),
    (RuntimeError("CUDA out of memory"), False),
    (KeyError("layer"), False),
    (AttributeError("'NoneType' object has no attribute 'x'"), False),
])
def test_cli_error_boundary_one_line_for_bad_input_traceback_for_bugs(monkeypatch, capsys, error, user):
    from rome_locate.facts import FactFormatError

    def failing(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_locate", failing)
    argv = ["locate", "--model", "m", "--facts", "f"]
    if user:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rome-locate locate: error: ")
    else:
        with pytest.raises(type(error)):
            cli.main(argv)
    assert issubclass(FactFormatError, ValueError)


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rome_locate", "locate", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--facts" in done.stdout


def test_cli_arch_file_errors_name_the_file(tiny_tokenizer, tmp_path, capsys):
    model_dir = _save_tiny(tmp_path, tiny_tokenizer)
    facts = tmp_path / "f.json"
    facts.write_text('[{"prompt": "Miles Davis plays the", "subject": "Miles Davis"}]')
    for text in ("5", "{broken", '{"embed": "transformer.wte"}'):
        arch = tmp_path / "arch.json"
        arch.write_text(text)
        code = cli.main(["locate", "--model", str(model_dir), "--facts", str(facts), "--arch", str(arch),
                         "--device", "cpu", "--samples", "2", "--quiet"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert code == 2 and len(errors) == 1 and f"architecture file {arch}" in errors[0], err
