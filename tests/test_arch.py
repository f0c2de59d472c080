"""The architecture map against tiny random models of every family it lists (built here, never downloaded)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from rome_locate.arch import ARCH, KINDS, Arch, UnknownArchitectureError, arch_for
from rome_locate.hooks import (UnknownModuleError, captured, captured_inputs, get_module, hook_count, hooked,
                               patched)

HIDDEN, VOCAB, N_LAYERS, BATCH, SEQ = 32, 128, 2, 2, 5

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
_GPT2_STYLE = dict(n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=64)
# Per-family config overrides. Scalings applied to the logits after lm_head are switched off so the
# ln_f -> lm_head check below can demand exact logits; they do not change any module name.
_EXTRA: dict[str, dict] = {
    "gpt2": _GPT2_STYLE,
    "gpt_bigcode": _GPT2_STYLE,
    "gptj": dict(_GPT2_STYLE, rotary_dim=4),
    "gpt_neo": dict(num_layers=N_LAYERS, attention_types=[[["global", "local"], 1]], window_size=16),
    "gemma2": dict(final_logit_softcapping=None),
    "gemma3_text": dict(final_logit_softcapping=None),
    "cohere": dict(logit_scale=1.0),
    "cohere2": dict(logit_scale=1.0),
    "granite": dict(logits_scaling=1.0),
}
_DROP = {"falcon": ("head_dim",)}  # FalconConfig.head_dim is a read-only property

# Families that norm (or scale) each sublayer's output outside the module before the residual add,
# so block_out - block_in is not attention + MLP as captured.
_NOT_ADDITIVE = {"gemma2", "gemma3_text", "olmo2", "olmo3", "glm4", "exaone4"}

_MODELS: dict[str, nn.Module] = {}


def tiny(model_type: str) -> nn.Module:
    """A seeded 2-layer random model of `model_type`, built once per test session."""
    if model_type not in _MODELS:
        kwargs = {**_COMMON, **_EXTRA.get(model_type, {})}
        for key in _DROP.get(model_type, ()):
            kwargs.pop(key)
        config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(0)
        _MODELS[model_type] = AutoModelForCausalLM.from_config(config).eval()
    return _MODELS[model_type]


def _ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _out_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.nf
    assert isinstance(module, nn.Linear), f"rewrite module is {type(module).__name__}, not Linear/Conv1D"
    return module.out_features


def test_table_has_the_required_families():
    required = {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "falcon"}
    assert required <= set(ARCH)


@pytest.mark.parametrize("model_type", sorted(ARCH))
def test_row_names_real_modules(model_type):
    model = tiny(model_type)
    arch = arch_for(model)
    assert arch.n_layers == model.config.num_hidden_layers == N_LAYERS
    for layer in (0, arch.n_layers - 1):
        for tmp in (arch.layer_module_tmp, arch.mlp_module_tmp, arch.attn_module_tmp, arch.rewrite_module_tmp):
            assert isinstance(get_module(model, tmp.format(layer)), nn.Module)
        # ROME rewrites the MLP down-projection: its output lives in the residual stream.
        assert _out_features(get_module(model, arch.rewrite_module(layer))) == HIDDEN
    for name in (arch.embed, arch.ln_f_module, arch.lm_head_module):
        assert isinstance(get_module(model, name), nn.Module)


@pytest.mark.parametrize("model_type", sorted(ARCH))
def test_sites_are_per_token_hidden_vectors(model_type):
    model = tiny(model_type)
    arch = arch_for(model)
    sites = [arch.module(kind, layer) for kind in KINDS for layer in range(arch.n_layers)]
    names = [arch.embed, arch.ln_f_module, arch.lm_head_module, *sites]
    with torch.no_grad(), captured(model, names, tokens=(BATCH, SEQ)) as cache:
        logits = model(_ids()).logits
    assert hook_count(model) == 0
    for name in [arch.embed, arch.ln_f_module, *sites]:
        assert tuple(cache[name].shape) == (BATCH, SEQ, HIDDEN), name
    assert tuple(logits.shape) == (BATCH, SEQ, VOCAB)
    # ln_f's output through the head must be the model's logits: ln_f and lm_head are the real last steps.
    with torch.no_grad():
        head_logits = get_module(model, arch.lm_head_module)(cache[arch.ln_f_module])
    torch.testing.assert_close(head_logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[arch.lm_head_module], logits, rtol=0, atol=1e-6)


# Falcon adds attention into the MLP output in place; this passes only because captured() copies.
_ADDITIVE = sorted(set(ARCH) - _NOT_ADDITIVE)


@pytest.mark.parametrize("model_type", _ADDITIVE)
def test_block_is_residual_plus_attn_plus_mlp(model_type):
    # The sites are the sublayers' contributions: block 1's output minus block 0's is exactly their sum.
    model = tiny(model_type)
    arch = arch_for(model)
    names = [arch.module("hidden", 0), arch.module("hidden", 1), arch.module("attn", 1), arch.module("mlp", 1)]
    with torch.no_grad(), captured(model, names, tokens=(BATCH, SEQ)) as cache:
        model(_ids())
    h0, h1, attn, mlp = (cache[n] for n in names)
    assert attn.abs().max() > 1e-4 and mlp.abs().max() > 1e-4
    torch.testing.assert_close(h1 - h0, attn + mlp, rtol=0, atol=1e-5)


class _Fake(nn.Module):
    def __init__(self, model_type: str):
        super().__init__()
        self.config = type("Config", (), {"model_type": model_type})()


def test_unknown_family_says_what_and_how():
    with pytest.raises(UnknownArchitectureError) as err:
        arch_for(_Fake("made_up_lm"))
    msg = str(err.value)
    assert "'made_up_lm'" in msg and "'llama'" in msg and "'gpt2'" in msg
    assert "Arch(" in msg and ".json" in msg and "rewrite_module_tmp" in msg


def test_flattened_mlp_is_seen_per_token_and_patched_back():
    # OPT's fc2 sees (batch*seq, d); with tokens=... hooks show (batch, seq, d) and restore the flat shape.
    model = tiny("opt")
    arch = arch_for(model)
    name = arch.module("mlp", 0)
    seen = []

    def zero_last_token(t):
        seen.append(tuple(t.shape))
        t = t.clone()
        t[:, -1] = 0
        return t

    with torch.no_grad():
        clean = model(_ids()).logits
        with patched(model, {name: zero_last_token}, tokens=(BATCH, SEQ)):
            edited = model(_ids()).logits
    assert seen == [(BATCH, SEQ, HIDDEN)]
    # Only the last position changes: the per-token view lined tokens up correctly.
    torch.testing.assert_close(edited[:, :-1], clean[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(edited[:, -1], clean[:, -1])
    assert hook_count(model) == 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_captured_inputs_can_stop_the_forward_pass(model_type):
    model = tiny(model_type)
    arch = arch_for(model)
    names = [arch.rewrite_module(0), arch.rewrite_module(1)]
    with torch.no_grad():
        with captured_inputs(model, names, tokens=(BATCH, SEQ)) as whole:
            model(_ids())
        ran = []
        with captured(model, [arch.lm_head_module]) as head:
            with captured_inputs(model, names, tokens=(BATCH, SEQ), stop=True) as stopped:
                model(_ids())
                ran.append("after the forward")  # never reached: the forward stopped
    assert ran == [] and head == {}  # the head never ran
    for name in names:
        torch.testing.assert_close(stopped[name], whole[name], rtol=0, atol=0)
    assert hook_count(model) == 0


def test_registrar_leaves_nothing_on_a_bad_name_or_a_failing_forward():
    model = tiny("llama")
    arch = arch_for(model)
    with pytest.raises(UnknownModuleError, match="'model.nope'"):
        with hooked(model, {arch.module("mlp", 0): lambda *a: None, "model.nope": lambda *a: None}):
            pass
    assert hook_count(model) == 0

    def boom(_t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with patched(model, {arch.module("mlp", 0): boom}):
            model(_ids())
    assert hook_count(model) == 0


def test_wrong_module_name_is_named():
    model = tiny("llama")
    bad = replace(ARCH["llama"], mlp_module_tmp="model.layers.{}.feed_forward")
    with pytest.raises(UnknownArchitectureError, match=r"model\.layers\.0\.feed_forward"):
        arch_for(model, arch=bad)
    with pytest.raises(UnknownArchitectureError, match=r"'model\.blocks'"):
        arch_for(model, arch=replace(ARCH["llama"], layer_module_tmp="model.blocks.{}"))
    # Another family's row is checked too, not trusted.
    with pytest.raises(UnknownArchitectureError, match=r"'transformer\.h'.*--arch FILE\.json"):
        arch_for(model, arch=ARCH["gpt2"].to_json())


def test_explicit_names_from_dict_and_json_file(tmp_path):
    model = tiny("gpt2")
    names = ARCH["gpt2"].to_json()
    del names["n_layers"]
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(names))
    expected = replace(ARCH["gpt2"], n_layers=N_LAYERS)
    assert arch_for(model, arch=names) == expected
    assert arch_for(model, arch=path) == expected
    assert arch_for(model, arch=str(path)) == expected
    assert arch_for(model, arch=ARCH["gpt2"]) == expected


def test_from_json_rejects_unknown_and_missing_keys():
    good = ARCH["llama"].to_json()
    assert Arch.from_json(good) == ARCH["llama"]
    with pytest.raises(ValueError, match="mlp_modul_tmp"):
        Arch.from_json({**good, "mlp_modul_tmp": "x"})
    incomplete = dict(good)
    del incomplete["lm_head_module"]
    with pytest.raises(ValueError, match="lm_head_module"):
        Arch.from_json(incomplete)


def test_module_names_and_range():
    arch = arch_for(tiny("llama"))
    assert arch.module("mlp", 1) == "model.layers.1.mlp"
    assert arch.module("hidden", 0) == "model.layers.0"
    assert arch.module("attn", 1) == "model.layers.1.self_attn"
    assert arch.rewrite_module(1) == "model.layers.1.mlp.down_proj"
    with pytest.raises(IndexError, match="layer 2 out of range"):
        arch.module("mlp", 2)
    with pytest.raises(ValueError, match="kind"):
        arch.module("resid", 0)
