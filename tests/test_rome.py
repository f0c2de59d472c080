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
