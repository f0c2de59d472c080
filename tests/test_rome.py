"""The built-in ROME editor: the rank-one algebra, weight layouts, seeding, restoring, and real edits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import SENTENCES, build_tiny_model
from rome_locate.facts import Fact
from rome_locate.hooks import hook_count
from rome_locate.hparams import generate_hparams
from rome_locate.rome import (EditError, apply_rome, compute_key, compute_value, context_templates, lookup_index,
                              rank_one_update, restore, target_tokens)
from rome_locate.stats import compute_mom2

FACT = Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
            target_new="Paris", id="needle")


def _hp(model, layer=1, **kw):
    kw.setdefault("context_template_length_params", [[5, 5]])
    kw.setdefault("v_num_grad_steps", 3)
    return generate_hparams(model, None, layer, "tiny", **kw)


def test_lookup_index_is_the_last_subject_token(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Because so. The Space Needle is in the city of"
    i = lookup_index(tok, text, "The Space Needle", "subject_last", search_from=len("Because so. "))
    enc = tok(text, return_offsets_mapping=True)
    start = text.index("The Space Needle")
    assert enc["offset_mapping"][i][1] == start + len("The Space Needle")
    first = lookup_index(tok, text, "The Space Needle", "subject_first", search_from=len("Because so. "))
    assert enc["offset_mapping"][first][0] == start
    assert lookup_index(tok, text, "The Space Needle", "last") == len(enc["input_ids"]) - 1
    with pytest.raises(EditError, match="does not occur"):
        lookup_index(tok, text, "Eiffel", "subject_last")


def test_target_tokens_follow_the_prompt(tiny_tokenizer):
    ids, pos = target_tokens(tiny_tokenizer, FACT.prompt, "Paris")
    assert ids == tiny_tokenizer(FACT.prompt + " Paris")["input_ids"]
    assert pos[0] == len(tiny_tokenizer(FACT.prompt)["input_ids"]) and pos[-1] == len(ids) - 1
    assert tiny_tokenizer.decode(ids[pos[0]:]).strip() == "Paris"


def test_context_templates_are_seeded_and_cached_per_model(tiny_tokenizer):
    a = build_tiny_model("gpt2", len(tiny_tokenizer), seed=0)
    b = build_tiny_model("gpt2", len(tiny_tokenizer), seed=1)
    ta = context_templates(a, tiny_tokenizer, [[5, 10]], seed=0)
    assert ta[0] == "{}" and len(ta) == 11 and all(t.endswith(". {}") for t in ta[1:])
    assert ta == context_templates(a, tiny_tokenizer, [[5, 10]], seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    from rome_locate import rome
    rome._TEMPLATE_CACHE.clear()
    assert context_templates(a, tiny_tokenizer, [[5, 10]], seed=0) == ta
    assert context_templates(a, tiny_tokenizer, [[5, 10]], seed=1) != ta
    assert context_templates(b, tiny_tokenizer, [[5, 10]], seed=0) != ta  # never shared across models


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mom2", [False, True])
def test_rank_one_update_maps_key_to_value(family, mom2, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    h = _hp(model, stats_dir=str(tmp_path), mom2_dataset="tiny", mom2_n_samples=20, mom2_adjustment=mom2)
    if mom2:
        corpus = tmp_path / "c.txt"
        corpus.write_text("\n".join(SENTENCES))
        compute_mom2(model, tok, None, [1], corpus, tmp_path, model_name="tiny", mom2_dataset="tiny", n_samples=20)
    module = model.get_submodule(h.rewrite_module_tmp.format(1))
    key = torch.randn(module.weight.shape[0 if family == "gpt2" else 1], generator=torch.Generator().manual_seed(0))
    value = torch.randn(32, generator=torch.Generator().manual_seed(1))
    delta = rank_one_update(model, h, 1, key, value)
    assert delta.shape == module.weight.shape  # Conv1D (in, out) for GPT-2, Linear (out, in) for LLaMA
    sv = torch.linalg.svdvals(delta.double())
    assert sv[1] < 1e-5 * sv[0]  # rank one, up to float32 rounding
    with torch.no_grad():
        module.weight.add_(delta)
        torch.testing.assert_close(module(key[None])[0], value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_apply_and_restore_is_bit_identical(family, tiny_tokenizer):
    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    h = _hp(model, layer=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info: dict = {}
    originals = apply_rome(model, tok, FACT, h, info=info)
    name = f"{h.rewrite_module_tmp.format(2)}.weight"
    assert list(originals) == [name] and info[2]["steps"] >= 1
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [name]
    restore(model, originals)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters()) and hook_count(model) == 0


def test_edited_layer_outputs_v_star_on_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    model = build_tiny_model("gpt2", len(tok))
    h = _hp(model, layer=1, v_weight_decay=0.0, clamp_norm_factor=100.0)
    templates = context_templates(model, tok, h.context_template_length_params)
    key = compute_key(model, tok, FACT, h, 1, templates)
    k0 = compute_key(model, tok, FACT, h, 1, ["{}"])
    value, info = compute_value(model, tok, FACT, h, 1, templates)
    assert info["delta_norm"] > 0 and not torch.allclose(key, k0)
    module = model.get_submodule(h.rewrite_module_tmp.format(1))
    with torch.no_grad():
        v0 = module(k0[None])[0]
        before_avg = module(key[None])[0]
        apply_rome(model, tok, FACT, h)
        # The bare prompt's key now gives v* exactly ...
        torch.testing.assert_close(module(k0[None])[0], value, rtol=1e-4, atol=1e-4)
        # ... and any key k moves by the optimised shift times (C^-1 k*)·k / (C^-1 k*)·k0, here C = I.
        ratio = (key @ key) / (key @ k0)
        torch.testing.assert_close(module(key[None])[0] - before_avg, (value - v0) * ratio, rtol=1e-3, atol=1e-4)


def test_bad_facts_and_hparams(tiny_tokenizer):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    h = _hp(model)
    with pytest.raises(EditError, match="no target_new"):
        apply_rome(model, tiny_tokenizer, dataclasses.replace(FACT, target_new=None), h)
    with pytest.raises(EditError, match="not in prompt"):
        apply_rome(model, tiny_tokenizer, dataclasses.replace(FACT, subject="Eiffel Tower"), h)
    with pytest.raises(EditError, match="ROME"):
        apply_rome(model, tiny_tokenizer, FACT, dataclasses.replace(h, alg_name="MEMIT"))
    with pytest.raises(FileNotFoundError, match="rome-locate stats"):
        apply_rome(model, tiny_tokenizer, FACT, dataclasses.replace(h, mom2_adjustment=True, stats_dir="/nonexistent"))
    assert hook_count(model) == 0


def test_edit_on_the_shipped_fact_model_succeeds_and_restores():
    from rome_locate.fact_models import counterfact_path, fact_model_dir, load_fact_model
    from rome_locate.facts import load_facts
    from rome_locate.hparams import bind_model, load_hparams
    from rome_locate.stats import load_mom2, mom2_path

    model, tok = load_fact_model("gpt2")
    root = fact_model_dir("gpt2").parent.parent.parent
    h = bind_model(load_hparams(root / "hparams" / "ROME" / "fact-gpt2.yaml", easyedit=False), fact_model_dir("gpt2"))
    # The shipped statistics are where EasyEdit looks for them.
    path = mom2_path(h.stats_dir, "gpt2", h.rewrite_module_tmp.format(h.layers[0]), h.mom2_dataset, h.mom2_n_samples, h.mom2_dtype)
    assert load_mom2(path, h.mom2_n_samples).shape == (256, 256)
    fact = load_facts(counterfact_path("gpt2"), limit=3)[2]  # a birthplace fact: Lisbon -> Prague
    ids, pos = target_tokens(tok, fact.prompt, fact.target_new)
    x = torch.tensor([ids[:pos[0]]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        p_before = model(x).logits[0, -1].softmax(-1)
    originals = apply_rome(model, tok, fact, h, seed=0)
    with torch.no_grad():
        p_after = model(x).logits[0, -1].softmax(-1)
    assert p_before.argmax() != ids[pos[0]] and p_after.argmax() == ids[pos[0]]
    assert p_after[ids[pos[0]]] > 0.5 and p_before[ids[pos[0]]] < 0.05
    restore(model, originals)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- each term of v*'s loss, and C in the update, pinned by its own effect -------------------------------------
# The tests above hold for any v* and any u with u.k0 = 1; these change one term and check what it is for.


def _v0_and_templates(model, tok, h, layer=1):
    """v0 (the MLP output at the subject's last token of the bare prompt) and the seeded templates."""
    templates = context_templates(model, tok, h.context_template_length_params)
    k0 = compute_key(model, tok, FACT, h, layer, ["{}"])
    with torch.no_grad():
        # The rewrite module is the MLP's last operation, so its output at k0 is the MLP output v0.
        v0 = model.get_submodule(h.rewrite_module_tmp.format(layer))(k0[None])[0]
    return v0, templates


def _essence_drift(model, tok, h, value, layer=1):
    """KL(edited || unedited) of the next-token distribution ROME's kl term reads: the "{subject} is a" prompt
    at the subject's last token (as ROME's released code reads it), with that token's MLP output set to `value`."""
    import torch.nn.functional as F

    from rome_locate.hooks import patched
    from rome_locate.rome import KL_PROMPT

    text = KL_PROMPT.format(FACT.subject)
    ids = torch.tensor([tok(text)["input_ids"]])
    at = lookup_index(tok, text, FACT.subject, h.fact_token)

    def put(out):
        out = out.clone()
        out[0, at] = value.to(out.dtype)
        return out

    with torch.no_grad():
        before = model(ids).logits[0, at].log_softmax(-1)
        with patched(model, {h.mlp_module_tmp.format(layer): put}):
            after = model(ids).logits[0, at].log_softmax(-1)
    return float(F.kl_div(before, after, log_target=True, reduction="sum"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kl_factor_keeps_the_subjects_essence(family, tiny_tokenizer):
    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    values, drifts = {}, {}
    for kl in (0.0625, 10.0):  # the paper's weight, and a much stronger one
        h = _hp(model, kl_factor=kl, v_num_grad_steps=20, v_weight_decay=0.0, clamp_norm_factor=100.0)
        _, templates = _v0_and_templates(model, tok, h)
        values[kl], _ = compute_value(model, tok, FACT, h, 1, templates)
        drifts[kl] = _essence_drift(model, tok, h, values[kl])
    assert not torch.allclose(values[0.0625], values[10.0], rtol=1e-3, atol=1e-4)
    assert drifts[0.0625] > 0 and drifts[10.0] < 0.2 * drifts[0.0625], drifts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weight_decay_shrinks_the_shift(family, tiny_tokenizer):
    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    norms = []
    for decay in (0.0, 1e-4, 1e-2):
        # A clamp far out of reach, so that only the decay bounds the shift.
        h = _hp(model, v_weight_decay=decay, clamp_norm_factor=1e4, v_num_grad_steps=10)
        v0, templates = _v0_and_templates(model, tok, h)
        value, info = compute_value(model, tok, FACT, h, 1, templates)
        norms.append(float((value - v0).norm()))
        assert norms[-1] == pytest.approx(info["delta_norm"], rel=1e-4)
        assert norms[-1] < 0.5 * h.clamp_norm_factor * float(v0.norm())
    assert norms[0] > norms[1] > norms[2] > 0, norms


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_clamp_bounds_the_shift_by_the_original_norm(family, tiny_tokenizer):
    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    norms = {}
    for clamp in (0.5, 1e4):
        h = _hp(model, clamp_norm_factor=clamp, v_weight_decay=0.0, v_num_grad_steps=10)
        v0, templates = _v0_and_templates(model, tok, h)
        value, _ = compute_value(model, tok, FACT, h, 1, templates)
        norms[clamp] = float((value - v0).norm())
    bound = 0.5 * float(v0.norm())
    # Binding: the shift sits on the bound (float32 rounding aside), not merely under it.
    assert 0.999 * bound <= norms[0.5] <= bound * (1 + 1e-5), (norms, bound)
    assert norms[1e4] > 2 * norms[0.5], norms


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_update_direction_is_the_inverse_covariance_times_the_key(family, tiny_tokenizer, monkeypatch):
    from rome_locate import rome

    tok = tiny_tokenizer
    model = build_tiny_model(family, len(tok))
    h = _hp(model, mom2_adjustment=True)
    module = model.get_submodule(h.rewrite_module_tmp.format(1))
    gen = torch.Generator().manual_seed(0)
    d_in = module.weight.shape[0 if family == "gpt2" else 1]
    key = torch.randn(d_in, generator=gen)
    k0 = key + 0.3 * torch.randn(d_in, generator=gen)  # the prompt's key differs from the template average
    value = torch.randn(32, generator=gen)
    a = torch.randn(d_in, d_in, generator=gen)
    covariances = {"identity": torch.eye(d_in), "correlated": a @ a.T / d_in + 0.1 * torch.eye(d_in)}
    with torch.no_grad():
        residual = (value - module(k0[None])[0]).double()
    directions = {}
    for name, cov in covariances.items():
        monkeypatch.setattr(rome, "mom2_for", lambda *_a, cov=cov: cov)
        delta = rank_one_update(model, h, 1, key, value, prompt_key=k0).double()
        # ROME's update: (v* - W k0) u^T with u = C^-1 k* / ((C^-1 k*) . k0); Conv1D stores it transposed.
        u = torch.linalg.solve(cov.double(), key.double())
        u = u / (u @ k0.double())
        expected = torch.outer(u, residual) if family == "gpt2" else torch.outer(residual, u)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)
        left = (delta @ residual if family == "gpt2" else delta.T @ residual) / (residual @ residual)
        directions[name] = left / left.norm()
    cosine = float(directions["identity"] @ directions["correlated"])
    assert cosine < 0.9, cosine
