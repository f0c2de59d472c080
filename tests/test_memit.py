"""The built-in MEMIT and AlphaEdit editors: the update against MEMIT's equations written here independently, the
null-space projection, restoring, and batch against one-by-one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import SENTENCES, build_tiny_model, params_hash
from rome_locate import memit
from rome_locate.editors import BuiltinEditor
from rome_locate.facts import Fact
from rome_locate.hooks import hook_count
from rome_locate.memit_hparams import memit_hparams_from_arch
from rome_locate.arch import arch_for
from rome_locate.rome import EditError
from rome_locate.stats import compute_mom2

FACTS = [
    Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
         target_new="Paris", id="needle"),
    Fact(prompt="The Eiffel Tower is in the city of", subject="The Eiffel Tower", target="Paris",
         target_new="Rome", id="eiffel"),
    Fact(prompt="The Colosseum is in the city of", subject="The Colosseum", target="Rome",
         target_new="Seattle", id="colosseum"),
]


def _setup(family, tok, tmp_path, window=(1, 2), alg="MEMIT", **kw):
    model = build_tiny_model(family, len(tok))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES))
    compute_mom2(model, tok, None, list(window), corpus, tmp_path, model_name="tiny", mom2_dataset="tiny",
                 n_samples=50)
    kw.setdefault("v_num_grad_steps", 4)
    hp = memit_hparams_from_arch(arch_for(model), list(window), "tiny", alg_name=alg, stats_dir=str(tmp_path),
                                 mom2_dataset="tiny", mom2_n_samples=50, **kw)
    return model, hp


def _reference_update(keys: np.ndarray, resid: np.ndarray, cov: np.ndarray, lam: float) -> np.ndarray:
    """MEMIT's equation 14 (Meng et al. 2023): ΔW = R K^T (λ C0 + K K^T)^-1, with K (d_in, n) and R (d_out, n)."""
    K, R = keys.T, resid.T
    return R @ K.T @ np.linalg.inv(lam * cov + K @ K.T)


@pytest.mark.parametrize("family,window", [("gpt2", (1,)), ("llama", (1,)), ("gpt2", (1, 2)), ("llama", (1, 2))])
def test_first_layer_update_is_memits_equation(family, window, tiny_tokenizer, tmp_path, monkeypatch):
    tok = tiny_tokenizer
    model, hp = _setup(family, tok, tmp_path, window=window, mom2_update_weight=3.0)
    name = hp.rewrite_module_tmp.format(1)
    # The keys and the residual stream read independently here, through plain forward hooks.
    seen: dict = {}
    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, inp: seen.__setitem__("k", inp[0].detach().clone()))
    keys = []
    for f in FACTS:
        ids = tok(f.prompt, return_tensors="pt")["input_ids"]
        last = len(tok(f.prompt[:f.prompt.index(f.subject) + len(f.subject)])["input_ids"]) - 1
        with torch.no_grad():
            model(input_ids=ids)
        keys.append(seen["k"][0, last].double().numpy())
    handle.remove()
    h_now = memit.residuals_now(model, tok, FACTS, hp, window[-1]).double().numpy()
    targets = torch.tensor(h_now + np.random.default_rng(0).normal(size=h_now.shape), dtype=torch.float32)
    monkeypatch.setattr(memit, "compute_targets", lambda *a, **k: targets)
    monkeypatch.setattr(memit, "template_groups", lambda *a, **k: [["{}"]])  # keys on the bare prompt only
    cov = memit.mom2_for(model, hp, 1).double().numpy()
    before = model.get_submodule(name).weight.detach().clone().double()
    originals = memit.apply_memit(model, tok, FACTS, hp)
    after = model.get_submodule(name).weight.detach().double()
    got = (after - before).numpy()
    if family == "gpt2":
        got = got.T  # Conv1D stores (in, out)
    # The first of m layers takes 1/m of the residual still missing at the window's last layer.
    expected = _reference_update(np.stack(keys), (targets.double().numpy() - h_now) / len(window), cov, 3.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert sorted(originals) == sorted(f"{hp.rewrite_module_tmp.format(l)}.weight" for l in window)


def test_memit_delta_pins_every_term():
    rng = np.random.default_rng(1)
    keys, resid = rng.normal(size=(4, 6)), rng.normal(size=(4, 5))
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    got = memit.memit_delta(torch.tensor(keys), torch.tensor(resid), torch.tensor(cov), 2.0).numpy()
    np.testing.assert_allclose(got, _reference_update(keys, resid, cov, 2.0), rtol=1e-9)
    # λ and C change the update; without C it is the identity's.
    assert not np.allclose(got, memit.memit_delta(torch.tensor(keys), torch.tensor(resid), torch.tensor(cov), 20.0))
    np.testing.assert_allclose(memit.memit_delta(torch.tensor(keys), torch.tensor(resid), None, 2.0).numpy(),
                               _reference_update(keys, resid, np.eye(6), 2.0), rtol=1e-9)


def test_small_lambda_writes_every_key_exactly():
    # λ -> 0 with fewer facts than key dimensions: W' k_i = W k_i + r_i for every fact (MEMIT's least squares).
    rng = np.random.default_rng(2)
    keys, resid = torch.tensor(rng.normal(size=(3, 8))), torch.tensor(rng.normal(size=(3, 4)))
    delta = memit.memit_delta(keys, resid, torch.eye(8, dtype=torch.float64), 1e-9)
    torch.testing.assert_close(delta @ keys.T, resid.T, rtol=1e-6, atol=1e-6)


def test_alphaedit_update_leaves_the_preserved_space_alone():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    cov = torch.tensor(u @ np.diag([5.0, 3.0, 2.0, 1.0, 1e-4, 1e-5]) @ u.T)
    p = memit.null_space(cov, 1e-2)
    np.testing.assert_allclose(p.numpy(), u[:, 4:] @ u[:, 4:].T, atol=1e-10)  # the two smallest directions only
    keys, resid = torch.tensor(rng.normal(size=(2, 6))), torch.tensor(rng.normal(size=(2, 3)))
    delta = memit.alphaedit_delta(keys, resid, p, None, 0.1)
    # Keys of what is preserved (the large directions) are mapped as before: ΔW u_j = 0 for them.
    kept = torch.tensor(u[:, :4])
    assert float((delta @ kept).abs().max()) < 1e-9
    # Not a zero update: in the null space it writes the batch.
    assert float((delta @ p).abs().max()) > 1e-3
    # The keys of earlier edits (C_prev) change the update.
    prev = keys.T @ keys * 3
    assert not torch.allclose(delta, memit.alphaedit_delta(keys, resid, p, prev, 0.1))


@pytest.mark.parametrize("alg", ["MEMIT", "AlphaEdit"])
def test_editor_restores_bit_identically_and_leaves_no_hook(alg, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model, hp = _setup("gpt2", tok, tmp_path, alg=alg, mom2_update_weight=1.0,
                       **({"nullspace_threshold": 10.0} if alg == "AlphaEdit" else {}))
    digest = params_hash(model)
    editor = BuiltinEditor()
    with editor.edited_batch(model, tok, FACTS, hp):
        assert params_hash(model) != digest
    assert params_hash(model) == digest and hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with editor.edited_batch(model, tok, FACTS, hp):
            raise RuntimeError("boom")
    assert params_hash(model) == digest and hook_count(model) == 0
    if alg == "AlphaEdit":  # restoring also forgets the batch's keys
        assert all(float(v.abs().max()) == 0 for v in editor._states[model].kept.values()) or \
            not editor._states[model].kept


def test_batch_of_one_is_the_one_fact_edit_and_z_ignores_the_batch(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model, hp = _setup("gpt2", tok, tmp_path, mom2_update_weight=2.0)
    editor = BuiltinEditor()
    with editor.edited(model, tok, FACTS[0], hp):
        one = {n: p.detach().clone() for n, p in model.named_parameters()}
    with editor.edited_batch(model, tok, FACTS[:1], hp):
        assert all(torch.equal(one[n], p) for n, p in model.named_parameters())
    groups = memit.template_groups(model, tok)
    together = memit.compute_targets(model, tok, FACTS, hp, groups)
    alone = torch.stack([memit.compute_targets(model, tok, [f], hp, groups)[0] for f in FACTS])
    torch.testing.assert_close(together, alone)  # z is read on the unedited model, fact by fact


def test_z_cache_reuses_targets_only_when_asked(tiny_tokenizer, tmp_path, monkeypatch):
    tok = tiny_tokenizer
    model, hp = _setup("gpt2", tok, tmp_path, mom2_update_weight=2.0)
    calls = []
    real = memit.compute_value
    monkeypatch.setattr(memit, "compute_value", lambda *a, **k: calls.append(1) or real(*a, **k))
    reusing = BuiltinEditor(reuse_targets=True)
    for lam in (1.0, 5.0):  # λ does not change z
        with reusing.edited_batch(model, tok, FACTS, dataclasses.replace(hp, mom2_update_weight=lam)):
            pass
    assert len(calls) == len(FACTS)
    plain = BuiltinEditor()
    for _ in range(2):
        with plain.edited_batch(model, tok, FACTS, hp):
            pass
    assert len(calls) == 3 * len(FACTS)


def test_bad_windows_and_facts_are_named(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model, hp = _setup("gpt2", tok, tmp_path)
    with pytest.raises(ValueError, match=r"window \[1, 9\]: layer 9 out of range"):
        memit.apply_memit(model, tok, FACTS, dataclasses.replace(hp, layers=[1, 9]))
    with pytest.raises(EditError, match="increasing"):
        memit.apply_memit(model, tok, FACTS, dataclasses.replace(hp, layers=[2, 1]))
    with pytest.raises(EditError, match="not in prompt"):
        memit.apply_memit(model, tok, [dataclasses.replace(FACTS[0], subject="Big Ben")], hp)
    with pytest.raises(EditError, match="at least one"):
        memit.apply_memit(model, tok, [], hp)
