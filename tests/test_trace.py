"""Causal tracing on tiny seeded models: invariants, ROME's draws, tokens, answers and hygiene."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, params_hash

from rome_locate import runs
from rome_locate.arch import arch_for
from rome_locate.facts import Fact
from rome_locate.hooks import hook_count, patched
from rome_locate.tokens import find_subject_range
from rome_locate.runs import effective_window, window_layers
from rome_locate.trace import TraceResult, TraceSettings, noise_level, trace_fact

FACT = Fact(prompt="Dorven Kaltmoor was born in the city of", subject="Dorven Kaltmoor", target="Paris", id="7")
SHORT = Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", id="3")


def _bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a `<s>` prepended to every encoding, as the llama tokenizer does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(params=["gpt2", "llama"])
def sharp_model(request, tiny_tokenizer):
    """A tiny model whose output layer is scaled up (and untied), so predictions are peaked enough
    that restoring a site moves p(answer) measurably."""
    model = build_tiny_model(request.param, len(tiny_tokenizer))
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone() * 30)
    return model, tiny_tokenizer


# ---- invariants -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_zero_noise_corrupt_equals_clean(tiny_model, kind):
    model, tok = tiny_model
    r = trace_fact(model, tok, FACT, TraceSettings(kind=kind, noise=0.0, samples=3))
    assert r.noise == 0.0
    assert r.low_score == pytest.approx(r.high_score, abs=1e-6)
    # Nothing was corrupted, so restoring anything changes nothing either.
    assert np.allclose(r.scores, r.high_score, atol=1e-6)


def test_restoring_last_hidden_state_gives_clean(tiny_model):
    model, tok = tiny_model
    r = trace_fact(model, tok, SHORT, TraceSettings(kind="hidden", full=True, samples=4, noise=5.0))
    assert r.high_score - r.low_score != 0.0  # the noise did something
    last_token, last_layer = len(r.tokens) - 1, r.n_layers - 1
    assert r.table[last_token][last_layer] == pytest.approx(r.high_score, abs=1e-6)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_fast_row_equals_full_row(sharp_model, kind):
    model, tok = sharp_model
    fast = trace_fact(model, tok, SHORT, TraceSettings(kind=kind, samples=4))
    full = trace_fact(model, tok, SHORT, TraceSettings(kind=kind, samples=4, full=True))
    b, e = full.subject_range
    assert fast.table is None and len(full.table) == len(full.tokens)
    assert len(fast.scores) == model.config.num_hidden_layers
    np.testing.assert_allclose(fast.scores, full.table[e - 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(full.scores, full.table[e - 1], atol=0, rtol=0)
    assert fast.low_score == pytest.approx(full.low_score, abs=1e-6)
    # Restoring some site matters: otherwise this test could not tell rows apart.
    assert max(abs(x - full.low_score) for row in full.table for x in row) > 1e-4


def test_chunking_does_not_change_scores(tiny_model):
    model, tok = tiny_model
    one = trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0, full=True), max_batch=3)
    big = trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0, full=True), max_batch=1000)
    np.testing.assert_allclose(np.array(one.table), np.array(big.table), atol=1e-5, rtol=0)


def test_prefix_reuse_matches_whole_prompt_runs(sharp_model):
    model, tok = sharp_model
    for kind in ("hidden", "mlp"):
        cached = trace_fact(model, tok, FACT, TraceSettings(kind=kind, samples=3, full=True), max_batch=12)
        whole = trace_fact(model, tok, FACT, TraceSettings(kind=kind, samples=3, full=True), reuse_prefix=False)
        np.testing.assert_allclose(np.array(cached.table), np.array(whole.table), atol=1e-5, rtol=0)
        assert max(abs(x - whole.low_score) for row in whole.table for x in row) > 1e-4


def test_rome_draws_match_rome_batch_layout(sharp_model):
    """noise_draws='rome' gives the numbers ROME's own layout gives: row 0 clean, rows 1..S noised."""
    model, tok = sharp_model
    arch = arch_for(model)
    S, level, kind = 5, 0.1, "mlp"
    r = trace_fact(model, tok, SHORT, TraceSettings(kind=kind, samples=S, noise=level, noise_draws="rome", window=2))
    b, e = r.subject_range
    ids = tok(SHORT.prompt)["input_ids"]
    inp = torch.tensor([ids] * (S + 1))
    L = arch.n_layers

    def corrupt(x):
        rs = np.random.RandomState(1)
        x = x.clone()
        x[1:, b:e] += level * torch.from_numpy(rs.randn(S, e - b, x.shape[2]))
        return x

    def restore(h):
        h = h.clone()
        h[1:, e - 1] = h[0, e - 1]
        return h

    def run(layers):
        edits = {arch.embed: corrupt}
        edits.update({arch.module(kind, m): restore for m in layers})
        with torch.no_grad(), patched(model, edits):
            logits = model(inp).logits
        return float(torch.softmax(logits[1:, -1, :], dim=1).mean(dim=0)[r.answer_id])

    assert r.low_score == pytest.approx(run([]), abs=1e-6)
    expected = [run(range(max(0, l - 1), min(L, l + 1))) for l in range(L)]
    np.testing.assert_allclose(r.scores, expected, atol=1e-6, rtol=0)
    assert max(abs(x - r.low_score) for x in expected) > 1e-4


def test_torch_draws_are_seeded(tiny_model):
    model, tok = tiny_model
    a = trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0, seed=1))
    b = trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0, seed=1))
    c = trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0, seed=2))
    assert a.scores == b.scores and a.low_score == b.low_score
    assert a.low_score != c.low_score


def test_noise_level_is_three_sigma_of_subject_embeddings(tiny_model):
    model, tok = tiny_model
    facts = [FACT, SHORT]
    emb = model.get_input_embeddings().weight.detach()
    ids = [i for f in facts for i in tok(f.subject, add_special_tokens=False)["input_ids"]]
    expected = 3 * emb[ids].std().item()
    assert noise_level(model, tok, facts) == pytest.approx(expected, rel=1e-5)
    assert noise_level(model, tok, facts, factor=1.0) == pytest.approx(expected / 3, rel=1e-5)
    # The default per-fact level is this fact's own 3 sigma.
    r = trace_fact(model, tok, SHORT, TraceSettings(samples=2))
    assert r.noise == pytest.approx(noise_level(model, tok, [SHORT]), rel=1e-6)


def test_replacement_swaps_subject_embeddings(tiny_model):
    model, tok = tiny_model
    fact = Fact(prompt="Paris is in the city of", subject="Paris", target="Paris", id="r")
    # In the tiny tokenizer "Paris" and "Lind" are two tokens each; "Rome" and "Miles" are not.
    r = trace_fact(model, tok, fact, TraceSettings(noise_draws="replace", samples=10),
                   replacements=["Rome", "Lind", "Paris", "Lind", "Miles"])
    assert r.noise_draws == "replace" and r.noise == 0.0
    assert r.samples == 1  # the subject itself, the duplicate and other lengths are not replacements
    # Swapping every subject embedding is exactly running the prompt with the other subject.
    ids = tok("Lind is in the city of")["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[r.answer_id]
    assert r.low_score == pytest.approx(float(p), abs=1e-6)
    assert r.low_score != pytest.approx(r.high_score, abs=1e-9)
    with pytest.raises(ValueError, match="same token length"):
        trace_fact(model, tok, FACT, TraceSettings(noise_draws="replace"), replacements=["Rome"])
    with pytest.raises(ValueError, match="replacement subjects"):
        trace_fact(model, tok, FACT, TraceSettings(noise_draws="replace"))


# ---- subject, tokens, answers ---------------------------------------------------------


def test_subject_range_matches_tokens(tiny_tokenizer):
    (b, e), occ, ids = find_subject_range(tiny_tokenizer, FACT.prompt, FACT.subject)
    assert occ == 0 and b == 0
    assert tiny_tokenizer.decode(ids[b:e]) == FACT.subject
    assert not tiny_tokenizer.decode(ids[e:]).startswith("n")  # the subject's last token is inside [b, e)


def test_subject_range_with_bos(tiny_tokenizer):
    tok = _bos_tokenizer(tiny_tokenizer)
    (b, e), _, ids = find_subject_range(tok, FACT.prompt, FACT.subject)
    assert ids[0] == tok.bos_token_id
    assert b == 1
    assert tok.decode(ids[b:e]) == FACT.subject
    (b2, e2), _, _ = find_subject_range(tiny_tokenizer, FACT.prompt, FACT.subject)
    assert (b, e) == (b2 + 1, e2 + 1)


def test_trace_with_bos_tokenizer(tiny_tokenizer):
    tok = _bos_tokenizer(tiny_tokenizer)
    model = build_tiny_model("llama", len(tok))
    r = trace_fact(model, tok, SHORT, TraceSettings(samples=2, noise=1.0, answer="target"))
    assert r.tokens[0] == "<s>" and r.subject_range[0] == 1
    first = tok(" trumpet", add_special_tokens=False)["input_ids"][0]
    assert r.answer_id == first


def test_repeated_subject_occurrence(tiny_tokenizer):
    prompt = "Paris is in France and Paris is"
    (b0, e0), occ0, ids = find_subject_range(tiny_tokenizer, prompt, "Paris")
    (b1, e1), occ1, _ = find_subject_range(tiny_tokenizer, prompt, "Paris", occurrence=-1)
    assert (occ0, occ1) == (0, 1)
    assert b0 == 0 and b1 > e0
    assert tiny_tokenizer.decode(ids[b0:e0]) == "Paris"
    assert tiny_tokenizer.decode(ids[b1:e1]).strip() == "Paris"
    with pytest.raises(ValueError, match="occurs 2 time"):
        find_subject_range(tiny_tokenizer, prompt, "Paris", occurrence=2)


def test_trace_records_occurrence(tiny_model):
    model, tok = tiny_model
    fact = Fact(prompt="Paris is in France and Paris is", subject="Paris", id="p")
    first = trace_fact(model, tok, fact, TraceSettings(samples=2, noise=1.0))
    last = trace_fact(model, tok, fact, TraceSettings(samples=2, noise=1.0), occurrence=-1)
    assert (first.subject_occurrence, last.subject_occurrence) == (0, 1)
    assert first.subject_range != last.subject_range


def test_missing_subject_names_subject_and_prompt(tiny_model):
    model, tok = tiny_model
    bad = Fact(prompt="The Space Needle is in", subject="Eiffel Tower")
    with pytest.raises(ValueError, match="Eiffel Tower") as info:
        trace_fact(model, tok, bad, TraceSettings(samples=2))
    assert "The Space Needle is in" in str(info.value)
    assert hook_count(model) == 0


def test_trailing_whitespace_warns(tiny_model):
    model, tok = tiny_model
    fact = Fact(prompt="Miles Davis plays the ", subject="Miles Davis")
    with pytest.warns(UserWarning, match="whitespace"):
        trace_fact(model, tok, fact, TraceSettings(samples=2, noise=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace_fact(model, tok, SHORT, TraceSettings(samples=2, noise=1.0))


def test_answers_top1_and_target(tiny_model):
    model, tok = tiny_model
    ids = tok(SHORT.prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    top1 = int(logits[-1].argmax())
    t_ids = tok(SHORT.prompt + " " + SHORT.target)["input_ids"][len(ids):]
    r = trace_fact(model, tok, SHORT, TraceSettings(samples=2, noise=1.0))
    assert r.answer_source == "top1" and r.answer_id == top1
    assert r.high_score == pytest.approx(float(torch.softmax(logits[-1], -1)[top1]), abs=1e-6)
    assert r.known == (top1 == t_ids[0])
    rt = trace_fact(model, tok, SHORT, TraceSettings(samples=2, noise=1.0, answer="target"))
    assert rt.answer_source == "target" and rt.answer_id == t_ids[0] and rt.top1 == r.top1
    with torch.no_grad():
        full = model(torch.tensor([ids + t_ids])).logits[0].float().log_softmax(-1)
    expected = sum(float(full[len(ids) - 1 + k, t]) for k, t in enumerate(t_ids))
    assert rt.target_logprob == pytest.approx(expected, abs=1e-4)
    no_target = Fact(prompt=SHORT.prompt, subject=SHORT.subject)
    r0 = trace_fact(model, tok, no_target, TraceSettings(samples=2, noise=1.0))
    assert r0.known is None and r0.target_logprob is None
    with pytest.raises(ValueError, match="no target"):
        trace_fact(model, tok, no_target, TraceSettings(samples=2, answer="target"))


def test_result_json_round_trip(tiny_model):
    model, tok = tiny_model
    r = trace_fact(model, tok, SHORT, TraceSettings(samples=2, noise=1.0, full=True))
    back = TraceResult.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r
    assert back.effects == tuple(s - r.low_score for s in r.scores)


def test_low_precision_model_gives_float_probabilities(tiny_tokenizer):
    model = build_tiny_model("gpt2", len(tiny_tokenizer)).to(torch.bfloat16)
    r = trace_fact(model, tiny_tokenizer, SHORT, TraceSettings(samples=2, noise=1.0))
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in r.scores)
    assert next(model.parameters()).dtype == torch.bfloat16


# ---- window -------------------------------------------------------------------------


def test_window_rule():
    assert effective_window(10, 48, "mlp") == 10
    assert effective_window(10, 28, "attn") == 10
    assert effective_window(10, 8, "mlp") == 4
    assert effective_window(10, 4, "mlp") == 2
    assert effective_window(10, 1, "mlp") == 1
    assert effective_window(10, 48, "hidden") == 1
    assert list(window_layers(0, 10, 48)) == list(range(0, 5))
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))
    assert list(window_layers(47, 10, 48)) == list(range(42, 48))
    assert list(window_layers(5, 3, 48)) == [4, 5, 6]
    with pytest.raises(ValueError):
        effective_window(0, 8, "mlp")


# ---- hygiene ------------------------------------------------------------------------


def test_exception_inside_traced_run_leaves_no_hooks(tiny_model, monkeypatch):
    model, tok = tiny_model
    ids = torch.tensor([tok(SHORT.prompt)["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    real = runs.Caller.logits
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first restored run, while corruption and restoration hooks are on
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(runs.Caller, "logits", failing)
    with pytest.raises(RuntimeError, match="boom"):
        trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0))
    assert calls["n"] == 2
    assert hook_count(model) == 0
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


def test_module_that_raises_leaves_no_hooks(tiny_model, monkeypatch):
    model, tok = tiny_model
    arch = arch_for(model)
    ids = torch.tensor([tok(SHORT.prompt)["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    mlp = model.get_submodule(arch.module("mlp", 1))
    real_forward = mlp.forward
    state = {"n": 0}

    def forward(*args, **kwargs):
        state["n"] += 1
        if state["n"] > 1:  # the clean-and-corrupted first run passes; a restored run fails
            raise RuntimeError("mlp failed")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", forward)
    with pytest.raises(RuntimeError, match="mlp failed"):
        trace_fact(model, tok, SHORT, TraceSettings(samples=3, noise=2.0))
    monkeypatch.undo()
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)


def test_tracing_changes_no_parameter(tiny_model):
    model, tok = tiny_model
    before = params_hash(model)
    for kind in ("hidden", "mlp", "attn"):
        trace_fact(model, tok, SHORT, TraceSettings(kind=kind, samples=2, full=True))
    trace_fact(model, tok, SHORT, TraceSettings(samples=2, noise_draws="rome"))
    assert params_hash(model) == before
    assert hook_count(model) == 0
    assert not model.training


def test_opt_traces_through_its_flattened_mlp(tiny_tokenizer):
    # OPT runs fc2 on (batch*seq, d); the trace must still restore the right token rows.
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                    pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = OPTForCausalLM(cfg).eval()
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone() * 30)
    zero = trace_fact(model, tiny_tokenizer, SHORT, TraceSettings(kind="mlp", noise=0.0, samples=2))
    assert zero.low_score == pytest.approx(zero.high_score, abs=1e-6)
    fast = trace_fact(model, tiny_tokenizer, SHORT, TraceSettings(kind="mlp", samples=3))
    full = trace_fact(model, tiny_tokenizer, SHORT, TraceSettings(kind="mlp", samples=3, full=True))
    np.testing.assert_allclose(fast.scores, full.table[full.subject_range[1] - 1], atol=1e-5, rtol=0)
    assert hook_count(model) == 0


# ---- fast paths against the plain path --------------------------------------------------


def _plain_table(model, tok, fact, kind, samples, level, window):
    """The whole table the plain way: one full forward per (token, layer), every block run, no cache."""
    arch = arch_for(model)
    L = arch.n_layers
    (b, e), _, ids = find_subject_range(tok, fact.prompt, fact.subject)
    inp = torch.tensor([ids])
    names = [arch.module(kind, m) for m in range(L)]
    from rome_locate.hooks import captured

    with torch.no_grad(), captured(model, names, tokens=(1, len(ids))) as clean:
        answer = int(model(inp).logits[0, -1].argmax())
    noise = level * torch.from_numpy(np.random.RandomState(1).randn(samples, e - b, clean[names[0]].shape[-1]))

    def corrupt(x):
        x = x.clone()
        x[:, b:e] += noise
        return x

    def run(t, layers):
        def restore(h, m):
            h = h.clone()
            h[:, t] = clean[arch.module(kind, m)][0, t].to(h.dtype)
            return h

        edits = {arch.embed: corrupt}
        edits.update({arch.module(kind, m): (lambda h, m=m: restore(h, m)) for m in layers})
        with torch.no_grad(), patched(model, edits, tokens=(samples, len(ids))):
            logits = model(inp.expand(samples, -1), use_cache=False).logits
        return float(torch.softmax(logits[:, -1].float(), -1)[:, answer].mean())

    w = effective_window(window, L, kind)
    low = run(0, [])
    return low, [[run(t, window_layers(layer, w, L)) for layer in range(L)] for t in range(len(ids))]


def _sharpen(model, scale=30.0):
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone() * scale)
    return model


def _arch_model(model_type, vocab):
    from test_arch import _COMMON, _DROP, _EXTRA
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**_COMMON, **_EXTRA.get(model_type, {}), "vocab_size": vocab}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in kwargs or key == "num_hidden_layers":
            kwargs[key] = 4
    if model_type == "gpt_neo":
        kwargs["attention_types"] = [[["global", "local"], 2]]
    for key in _DROP.get(model_type, ()):
        kwargs.pop(key)
    torch.manual_seed(0)
    return _sharpen(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval(), 9.0)


_ALL_OPTS = ({}, {"reuse_prefix": True, "max_batch": 3}, {"reuse_prefix": False, "max_batch": 6},
             {"reuse_prefix": True, "max_batch": 1000})


def _check_fast_equals_plain(model, tok, fact, kind="mlp", samples=3, level=3.0, window=2, options=_ALL_OPTS):
    """Full tables and rows under several caching and chunking choices equal the plain path's."""
    low, plain = _plain_table(model, tok, fact, kind, samples, level, window)
    e = find_subject_range(tok, fact.prompt, fact.subject)[0][1]
    for opts in options:
        settings = TraceSettings(kind=kind, samples=samples, noise=level, noise_draws="rome", window=window)
        full = trace_fact(model, tok, fact, dataclasses.replace(settings, full=True), **opts)
        row = trace_fact(model, tok, fact, settings, **opts)
        assert full.low_score == pytest.approx(low, abs=1e-5)
        np.testing.assert_allclose(np.array(full.table), np.array(plain), atol=1e-5, rtol=0)
        np.testing.assert_allclose(row.scores, plain[e - 1], atol=1e-5, rtol=0)
    assert hook_count(model) == 0
    arch = arch_for(model)
    assert all(type(model.get_submodule(arch.layer_module_tmp.format(i))).__name__ != "_Relay"
               for i in range(arch.n_layers))
    return low, plain


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_fast_paths_equal_plain_path(sharp_model, kind):
    model, tok = sharp_model
    low, plain = _check_fast_equals_plain(model, tok, FACT, kind=kind)
    assert max(abs(x - low) for row in plain for x in row) > 1e-4


def test_fast_paths_equal_plain_path_opt(tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                    pad_token_id=0, bos_token_id=0, eos_token_id=0)
    _check_fast_equals_plain(_sharpen(OPTForCausalLM(cfg).eval()), tiny_tokenizer, FACT)


def _arch_types():
    from rome_locate.arch import ARCH

    return sorted(ARCH)


@pytest.mark.parametrize("model_type", _arch_types())
def test_fast_paths_equal_plain_path_every_family(model_type, tiny_tokenizer):
    model = _arch_model(model_type, len(tiny_tokenizer))
    options = ({"reuse_prefix": True, "max_batch": 2}, {"reuse_prefix": False, "max_batch": 4})
    _check_fast_equals_plain(model, tiny_tokenizer, SHORT, samples=2, options=options)
    low, plain = _check_fast_equals_plain(model, tiny_tokenizer, SHORT, kind="hidden", samples=2, options=options)
    assert max(abs(x - low) for row in plain for x in row) > 1e-4  # the comparison can tell sites apart


def test_block_skipping_restores_blocks_after_exception(tiny_model, monkeypatch):
    model, tok = tiny_model
    arch = arch_for(model)
    blocks = [model.get_submodule(arch.layer_module_tmp.format(i)) for i in range(arch.n_layers)]
    real = runs.Caller.logits
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if any(type(model.get_submodule(arch.layer_module_tmp.format(i))).__name__ == "_Relay"
               for i in range(arch.n_layers)):
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(runs.Caller, "logits", failing)
    with pytest.raises(RuntimeError, match="boom"):
        trace_fact(model, tok, FACT, TraceSettings(samples=3, noise=2.0, window=2, full=True), max_batch=3)
    assert [model.get_submodule(arch.layer_module_tmp.format(i)) for i in range(arch.n_layers)] == blocks
    assert hook_count(model) == 0
