"""Attribution patching: shape, first-order exactness, exact re-checks and hygiene."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_model

from rome_locate.arch import arch_for
from rome_locate.atp import attribution_trace
from rome_locate.facts import Fact
from rome_locate.hooks import hook_count, patched
from rome_locate.trace import TraceSettings, trace_fact


def _atp(**kw) -> TraceSettings:
    """Trace settings for attribution patching."""
    return TraceSettings(method="atp", **kw)


FACT = Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Paris", id="7")


@pytest.fixture(params=["gpt2", "llama"])
def sharp_model(request, tiny_tokenizer):
    """A tiny model with a peaked output (scaled, untied head), in float64 so finite differences are exact."""
    model = build_tiny_model(request.param, len(tiny_tokenizer)).double()
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone() * 30)
    return model, tiny_tokenizer


def test_table_shape_and_baseline(sharp_model):
    model, tok = sharp_model
    r = attribution_trace(model, tok, FACT, _atp(samples=3, noise=3.0, noise_draws="rome"))
    exact = trace_fact(model, tok, FACT, TraceSettings(samples=3, noise=3.0, noise_draws="rome"))
    L, T = model.config.num_hidden_layers, len(r.trace.tokens)
    assert len(r.estimated) == T and all(len(row) == L for row in r.estimated)
    assert r.trace.table == r.estimated and r.verified == ()
    assert r.trace.scores == r.trace.table[r.trace.subject_range[1] - 1]
    assert r.trace.low_score == pytest.approx(exact.low_score, abs=1e-9)
    assert r.trace.high_score == pytest.approx(exact.high_score, abs=1e-9)
    assert r.trace.answer_id == exact.answer_id and r.trace.window == exact.window
    json.dumps(r.to_json())


def test_zero_noise_estimates_no_effect(sharp_model):
    model, tok = sharp_model
    r = attribution_trace(model, tok, FACT, _atp(samples=2, noise=0.0))
    assert r.trace.low_score == pytest.approx(r.trace.high_score, abs=1e-9)
    assert np.allclose(np.array(r.estimated), r.trace.low_score, atol=1e-12)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_estimate_is_the_first_order_term(tiny_tokenizer, kind):
    """Moving a site a small step alpha towards its clean value changes p by alpha times the estimate.

    GPT-2 only: it computes in float64 throughout (Llama's RMSNorm drops to float32), so a central
    difference is exact to many digits."""
    model = build_tiny_model("gpt2", len(tiny_tokenizer)).double()
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone() * 30)
    tok = tiny_tokenizer
    arch = arch_for(model)
    S, level, alpha = 3, 3.0, 1e-4
    r = attribution_trace(model, tok, FACT, _atp(kind=kind, samples=S, noise=level, noise_draws="rome", window=1))
    b, e = r.trace.subject_range
    ids = torch.tensor([tok(FACT.prompt)["input_ids"]])
    T = ids.shape[1]
    names = [arch.module(kind, m) for m in range(arch.n_layers)]
    from rome_locate.hooks import captured

    with torch.no_grad(), captured(model, names, tokens=(1, T)) as clean:
        model(ids)
    noise = level * torch.from_numpy(np.random.RandomState(1).randn(S, e - b, model.config.hidden_size))

    def corrupt(x):
        x = x.clone()
        x[:, b:e] += noise
        return x

    def p_nudged(t, layer, a):
        def nudge(h):
            h = h.clone()
            h[:, t] += a * (clean[names[layer]][0, t] - h[:, t])
            return h

        with torch.no_grad(), patched(model, {arch.embed: corrupt, names[layer]: nudge}, tokens=(S, T)):
            logits = model(ids.expand(S, -1)).logits
        return float(torch.softmax(logits[:, -1], -1)[:, r.trace.answer_id].mean())

    for t, layer in [(e - 1, 0), (e - 1, arch.n_layers - 1), (T - 1, 1), (0, 2)]:
        slope = (p_nudged(t, layer, alpha) - p_nudged(t, layer, -alpha)) / (2 * alpha)
        assert r.estimated[t][layer] - r.trace.low_score == pytest.approx(slope, rel=1e-4, abs=1e-9)


def test_verified_sites_are_exact(sharp_model):
    model, tok = sharp_model
    kw = dict(samples=3, noise=3.0, noise_draws="rome", window=2)
    r = attribution_trace(model, tok, FACT, _atp(verify_top=3, **kw))
    exact = trace_fact(model, tok, FACT, TraceSettings(full=True, **kw))
    assert len(r.verified) == 3
    assert len(attribution_trace(model, tok, FACT, _atp(verify_top=50, **kw)).verified) == model.config.num_hidden_layers
    est = np.array(r.estimated) - r.trace.low_score
    last = r.trace.subject_range[1] - 1
    assert all(v.token == last for v in r.verified)  # the row the layer choice reads
    top = sorted(((est[v.token, v.layer]) for v in r.verified), reverse=True)
    assert top[-1] >= np.sort(est[last])[-3] - 1e-15  # its three largest estimates were checked
    for v in r.verified:
        assert v.exact + r.trace.low_score == pytest.approx(exact.table[v.token][v.layer], abs=1e-9)
        assert r.trace.table[v.token][v.layer] == pytest.approx(exact.table[v.token][v.layer], abs=1e-9)
        assert v.estimated == pytest.approx(est[v.token, v.layer], abs=1e-12)
    assert hook_count(model) == 0


def test_no_hook_remains_after_failure(sharp_model, monkeypatch):
    model, tok = sharp_model
    ids = torch.tensor([tok(FACT.prompt)["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.autograd, "grad", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attribution_trace(model, tok, FACT, _atp(samples=2, noise=1.0))
    monkeypatch.undo()
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)
    attribution_trace(model, tok, FACT, _atp(samples=2, noise=1.0, verify_top=2))
    assert hook_count(model) == 0 and all(p.grad is None for p in model.parameters())


def test_bad_arguments_name_themselves(sharp_model):
    model, tok = sharp_model
    with pytest.raises(ValueError, match="verify_top"):
        _atp(verify_top=-1)
    with pytest.raises(ValueError, match="kind"):
        _atp(kind="resid")
    with pytest.raises(ValueError, match="method='atp'"):
        TraceSettings(verify_top=3)
    with pytest.raises(ValueError, match="method"):
        TraceSettings(method="fast")


def test_cli_trace_and_locate_take_method_atp(tiny_tokenizer, tmp_path, capsys):
    from test_locate import FACTS, _save_tiny

    from rome_locate import cli

    model_dir = _save_tiny(tmp_path, tiny_tokenizer, "gpt2")
    code = cli.main(["trace", "--model", str(model_dir), "--prompt", FACTS[2].prompt, "--subject", "Miles Davis",
                     "--device", "cpu", "--samples", "2", "--kinds", "mlp", "--method", "atp", "--verify-top", "3"])
    assert code == 0
    assert "choice (mlp): layer" in capsys.readouterr().out
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f.prompt, "subject": f.subject, "target_new": f.target}) + "\n"
                             for f in FACTS[:2]))
    out = tmp_path / "out.jsonl"
    code = cli.main(["locate", "--model", str(model_dir), "--facts", str(facts), "--out", str(out), "--device", "cpu",
                     "--samples", "2", "--quiet", "--method", "atp"])
    assert code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line["table"] is not None for line in lines)
    assert all(line["settings"]["method"] == "atp" and line["settings"]["verify_top"] == 0 for line in lines)
    # The method changes the numbers: an exact rerun on the same --out refuses to reuse the atp records.
    capsys.readouterr()
    code = cli.main(["locate", "--model", str(model_dir), "--facts", str(facts), "--out", str(out), "--device", "cpu",
                     "--samples", "2", "--quiet"])
    assert code != 0
    assert "method='atp' there, method='exact' asked" in capsys.readouterr().err


def test_trace_fact_makes_exact_runs_and_trace_by_method_picks_by_the_settings(tiny_tokenizer):
    """atp builds on trace.py's restored runs, so trace.py never imports it: the method is picked above both."""
    from rome_locate.atp import trace_by_method

    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    with pytest.raises(ValueError, match="trace_by_method"):
        trace_fact(model, tiny_tokenizer, FACT, _atp(samples=2, noise=1.0))
    by_atp = trace_by_method(model, tiny_tokenizer, FACT, _atp(samples=2, noise=1.0))
    assert by_atp.table is not None and by_atp.settings.method == "atp"
    exact = trace_by_method(model, tiny_tokenizer, FACT, TraceSettings(samples=2, noise=1.0))
    assert exact.scores == trace_fact(model, tiny_tokenizer, FACT, TraceSettings(samples=2, noise=1.0)).scores
