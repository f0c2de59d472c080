"""The built-in MEMIT editor, and AlphaEdit as its null-space-projected variant (Meng et al. 2023; Fang et al. 2025).

For a batch of facts and a window of layers l_1 < ... < l_m (z layer L = l_m):

1. z_i = h_i + delta_i, where h_i is the residual stream (block L's output) at
   fact i's subject last token on its bare prompt and delta_i is optimised as
   ROME's v* is (`rome.compute_value` with the block as the module: NLL of
   target_new over the context templates, KL on "{subject} is a", weight decay,
   clamp), one fact at a time on the unedited model.
2. For each layer l_j in order: K = the keys (the rewrite module's input at the
   subject's last token; mean of the bare prompt's key and of the context
   templates' mean, as EasyEdit's `compute_ks`) on the model with layers
   before l_j already edited; R = (Z - H_now) / (m - j + 1), the residual
   still missing at L, spread over the layers left;
   MEMIT:     ΔW = R K^T (λ C + K K^T)^-1, λ = `mom2_update_weight`, C the
              mom2 statistics (the identity without `mom2_adjustment`);
   AlphaEdit: ΔW = R K^T P (K K^T P + C_prev P + L2 I)^-1 with P the
              projection onto the null space of C (its eigenvectors with
              eigenvalue < `nullspace_threshold`) and C_prev the sum of K K^T
              of the edits already kept (sequential editing).
   Written in the closed form of EasyEdit's code: ΔW^T = (P(K K^T + C_prev) + L2 I)^-1 P K R^T.

Context templates are EasyEdit's MEMIT ones: "{}" and five sampled texts of ten
tokens ("The", "Therefore", "Because", "I", "You"), seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .arch import check_layer, count_layers
from .facts import Fact
from .hooks import captured, captured_inputs, get_module
from .models import input_device, set_weight, weight_value
from .rome import EditError, check_fact, compute_value, context_templates, lookup_index, restore
from .stats import check_mom2, mom2_for
from .tokens import pad_id, prompt_ids, right_pad

MEMIT_TEMPLATES = [[10, 5]]  # EasyEdit's MEMIT: [(10, 5)], one sampled text of 10 tokens per prefix
KEY_CHUNK = 64  # prompts per forward pass when reading keys


@dataclass
class NullSpaceState:
    """AlphaEdit's per-model memory: P per layer (from the statistics) and C_prev, the K K^T of the kept edits."""

    projections: dict[int, torch.Tensor] = field(default_factory=dict)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)


def template_groups(model: nn.Module, tok: Any, seed: int = 0) -> list[list[str]]:
    """EasyEdit's MEMIT context templates as groups: [["{}"], [five sampled texts + ". {}"]]."""
    return [["{}"], context_templates(model, tok, MEMIT_TEMPLATES, seed=seed)[1:]]


def _read_at(model: nn.Module, tok: Any, texts: Sequence[str], lookups: Sequence[int], name: str,
             inputs: bool, chat_template: bool) -> torch.Tensor:
    """(len(texts), d): the input (`inputs`) or main output of module `name` at each text's lookup token."""
    device = input_device(model)
    out = []
    for start in range(0, len(texts), KEY_CHUNK):
        rows = [prompt_ids(tok, t, chat_template) for t in texts[start:start + KEY_CHUNK]]
        ids, mask = right_pad(rows, pad_id(tok), device)
        reader = captured_inputs(model, [name], tokens=tuple(ids.shape), stop=True) if inputs else \
            captured(model, [name], tokens=tuple(ids.shape))
        with torch.no_grad(), reader as cache:
            model(input_ids=ids, attention_mask=mask)
        at = torch.tensor(lookups[start:start + KEY_CHUNK], device=cache[name].device)
        out.append(cache[name][torch.arange(len(rows), device=at.device), at].float().cpu())
    return torch.cat(out)


def _lookups(tok: Any, facts: Sequence[Fact], hparams: Any, template: str, chat_template: bool) -> list[int]:
    texts = [template.format(f.prompt) for f in facts]
    return [lookup_index(tok, t, f.subject, hparams.fact_token, search_from=len(t) - len(f.prompt),
                         chat_template=chat_template) for t, f in zip(texts, facts)]


def compute_keys(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, layer: int,
                 groups: Sequence[Sequence[str]], chat_template: bool = False) -> torch.Tensor:
    """(n_facts, d_in): each fact's key at `layer`, the mean over template groups of each group's mean key."""
    name = hparams.rewrite_module_tmp.format(layer)
    per_group = []
    for group in groups:
        keys = torch.stack([_read_at(model, tok, [t.format(f.prompt) for f in facts],
                                     _lookups(tok, facts, hparams, t, chat_template), name, True, chat_template)
                            for t in group])
        per_group.append(keys.mean(0))
    return torch.stack(per_group).mean(0)


def residuals_now(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, z_layer: int,
                  chat_template: bool = False) -> torch.Tensor:
    """(n_facts, d): block `z_layer`'s output at each fact's lookup token on its bare prompt, on the model now."""
    return _read_at(model, tok, [f.prompt for f in facts], _lookups(tok, facts, hparams, "{}", chat_template),
                    hparams.layer_module_tmp.format(z_layer), False, chat_template)


def _z_key(fact: Fact, hparams: Any, groups: Sequence[Sequence[str]], chat_template: bool) -> tuple:
    # Everything z depends on: the fact, the z layer, v*'s settings, the templates, the prompt reading.
    return (fact.prompt, fact.subject, fact.target_new, hparams.layers[-1], hparams.layer_module_tmp,
            hparams.fact_token, hparams.v_lr, hparams.v_num_grad_steps, hparams.v_weight_decay,
            hparams.clamp_norm_factor, hparams.kl_factor, tuple(map(tuple, groups)), chat_template)


def compute_targets(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, groups: Sequence[Sequence[str]],
                    chat_template: bool = False, info: dict | None = None,
                    z_cache: dict | None = None) -> torch.Tensor:
    """(n_facts, d): each fact's z, the residual stream at the z layer that makes the model predict target_new.

    `z_cache` (only for edits that all start from the same unedited model, as the window search's trials do)
    keeps each z: the window's start and MEMIT's λ do not change it.
    """
    z_layer = hparams.layers[-1]
    flat = [t for g in groups for t in g]
    zs = []
    for fact in facts:
        key = _z_key(fact, hparams, groups, chat_template)
        if z_cache is not None and key in z_cache:
            zs.append(z_cache[key])
            continue
        z, z_info = compute_value(model, tok, fact, hparams, z_layer, flat, chat_template,
                                  module=hparams.layer_module_tmp.format(z_layer))
        if not bool(torch.isfinite(z).all()):
            raise EditError(f"fact {fact.id!r}: z (the residual stream at layer {z_layer} that MEMIT optimises) "
                            f"became non-finite (NaN or inf); check v_lr ({hparams.v_lr}), clamp_norm_factor and "
                            f"--dtype")
        zs.append(z.float().cpu())
        if z_cache is not None:
            z_cache[key] = zs[-1]
        if info is not None:
            info.setdefault("z", []).append(z_info)
    return torch.stack(zs)


def null_space(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P: the projection onto the eigenvectors of `cov` with eigenvalue below `threshold`."""
    u, s, _ = torch.linalg.svd(cov.double(), full_matrices=False)
    small = u[:, s < threshold]
    return small @ small.T


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor | None,
                update_weight: float) -> torch.Tensor:
    """MEMIT's ΔW (d_out, d_in) = R K^T (λ C + K K^T)^-1, keys (n, d_in), resid (n, d_out); C=None: identity."""
    k, r = keys.double().T, resid.double().T
    c = torch.eye(k.shape[0], dtype=torch.float64) if cov is None else cov.double().cpu()
    adj = torch.linalg.solve(update_weight * c + k @ k.T, k)  # (d_in, n)
    return r @ adj.T


def alphaedit_delta(keys: torch.Tensor, resid: torch.Tensor, projection: torch.Tensor, kept: torch.Tensor | None,
                    l2: float) -> torch.Tensor:
    """AlphaEdit's ΔW (d_out, d_in): ((P (K K^T + C_prev) + L2 I)^-1 P K R^T)^T."""
    k, r, p = keys.double().T, resid.double().T, projection.double()
    prev = torch.zeros_like(p) if kept is None else kept.double()
    lhs = p @ (k @ k.T + prev) + l2 * torch.eye(p.shape[0], dtype=torch.float64)
    return torch.linalg.solve(lhs, p @ k @ r.T).T


def _add(model: nn.Module, name: str, delta: torch.Tensor, originals: dict[str, torch.Tensor]) -> None:
    """Add ΔW (d_out, d_in) to weight `name` in its own layout (GPT-2's Conv1D stores (in, out))."""
    module = get_module(model, name.rsplit(".", 1)[0])
    if isinstance(module, nn.Linear):
        pass
    elif type(module).__name__ == "Conv1D":
        delta = delta.T
    else:
        raise EditError(f"{name} belongs to a {type(module).__name__}; MEMIT rewrites nn.Linear or GPT-2 Conv1D")
    if name not in originals:
        originals[name] = weight_value(model, name)
    current = weight_value(model, name)
    if not bool(torch.isfinite(delta).all()):
        raise EditError(f"the MEMIT update of {name} became non-finite (NaN or inf); check the mom2 statistics, "
                        f"mom2_update_weight and --dtype")
    set_weight(model, name, current + delta.to(current.device, current.dtype))


def _check(model: nn.Module, facts: Sequence[Fact], hparams: Any) -> None:
    if not facts:
        raise EditError("MEMIT needs at least one fact to edit")
    for fact in facts:
        check_fact(fact)
    n_layers = count_layers(model, hparams.layer_module_tmp)
    for layer in hparams.layers:
        check_layer(layer, n_layers, what=f"hyperparameters' window {list(hparams.layers)}: layer")
    if list(hparams.layers) != sorted(set(hparams.layers)):
        raise EditError(f"the window {list(hparams.layers)} must list distinct layers in increasing order")
    if hparams.mom2_adjustment:
        check_mom2(model, hparams, hparams.layers)


def _layer_delta(model: nn.Module, hparams: Any, layer: int, keys: torch.Tensor, resid: torch.Tensor,
                 state: NullSpaceState | None) -> torch.Tensor:
    if state is None:
        cov = mom2_for(model, hparams, layer) if hparams.mom2_adjustment else None
        if cov is not None and cov.shape[0] != keys.shape[1]:
            raise EditError(f"mom2 statistics for {hparams.rewrite_module_tmp.format(layer)} have shape "
                            f"{tuple(cov.shape)}, keys have {keys.shape[1]}")
        return memit_delta(keys, resid, cov, hparams.mom2_update_weight)
    if layer not in state.projections:
        state.projections[layer] = null_space(mom2_for(model, hparams, layer), hparams.nullspace_threshold)
    return alphaedit_delta(keys, resid, state.projections[layer], state.kept.get(layer), hparams.L2)


def apply_memit(model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any, seed: int = 0,
                info: dict | None = None, chat_template: bool = False,
                state: NullSpaceState | None = None, z_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Write every fact's target_new into the window `hparams.layers` in one update; returns the original weights.

    With `state` (AlphaEdit) the update is projected onto the statistics' null space and the batch's K K^T is added
    to `state.kept` (the caller removes it again when it restores the weights).
    """
    facts = list(facts)
    _check(model, facts, hparams)
    groups = template_groups(model, tok, seed)
    originals: dict[str, torch.Tensor] = {}
    try:
        zs = compute_targets(model, tok, facts, hparams, groups, chat_template, info, z_cache)
        layers = list(hparams.layers)
        for j, layer in enumerate(layers):
            keys = compute_keys(model, tok, facts, hparams, layer, groups, chat_template)
            resid = (zs - residuals_now(model, tok, facts, hparams, layers[-1], chat_template)) / (len(layers) - j)
            delta = _layer_delta(model, hparams, layer, keys, resid, state)
            _add(model, f"{hparams.rewrite_module_tmp.format(layer)}.weight", delta, originals)
        if state is not None:
            # C_prev grows by this batch's keys read on the edited model, as EasyEdit's cache_c does.
            for layer in layers:
                keys = compute_keys(model, tok, facts, hparams, layer, groups, chat_template).double()
                state.kept[layer] = state.kept.get(layer, 0) + keys.T @ keys
    except BaseException:
        restore(model, originals)
        raise
    return originals
