"""The built-in ROME editor: a rank-one update of one MLP output projection (Meng et al. 2022, section 3).

For a fact (subject s, prompt p, new object o*) and a layer l:

1. k* = mean over context templates x_j of the rewrite module's input at the
   subject's last token of x_j + p (the "key" of s at layer l).
2. v* = v0 + delta, where v0 is the MLP output at that token in the bare prompt
   and delta is optimised (Adam, `v_num_grad_steps` steps at `v_lr`) when added
   to the MLP output at the subject's last token of every templated prompt, to
   minimise the NLL of o*'s tokens at the final logits, plus `kl_factor` x the
   KL divergence of the next-token distribution after "{s} is a" from the
   unedited one (keeps s's other properties), plus `v_weight_decay` x
   ||delta|| / ||v0||^2 (ROME's released regulariser); ||delta|| is clamped to
   `clamp_norm_factor` x ||v0||.
3. W' = W + (v* - W k0) (C^-1 k*)^T / ((C^-1 k*)^T k0), with C the second
   moment of keys (`mom2_adjustment: true`, from `rome_locate.stats`) or the
   identity, and k0 the key on the bare prompt. Keys orthogonal to C^-1 k* are
   untouched. With k0 = k* this is the paper's W' k* = v*; with context
   templates, taking the residual at k0 (as the ROME authors' released code
   does) makes the edited layer output exactly v* on the edit prompt, and adds
   about delta (the optimised shift) on every templated key, which is what the
   optimisation of step 2 assumed. (The paper's residual v* - W k*, with k* the
   template average, adds v0 - mean_j(W k_j) on top: measured worse.)
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import check_layer, count_layers
from .facts import Fact
from .hooks import captured, captured_inputs, get_module, patched
from .hparams import RomeParams
from .models import input_device, set_weight, weight_value
from .stats import check_mom2, mom2_for
from .tokens import continuation, find_subject_range, pad_id, prompt_ids, right_pad

# ROME's template prefixes (its context templates start with these words).
TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")
KL_PROMPT = "{} is a"

# Per model object, never shared across models: (length_params, seed) -> templates.
_TEMPLATE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class EditError(ValueError):
    """A fact or hyperparameters the editor cannot use; the message names it."""


def lookup_index(tok: Any, text: str, subject: str, fact_token: str, search_from: int = 0,
                 chat_template: bool = False) -> int:
    """Token index where ROME reads the key: the subject's last/first token, or the text's last token (of the text's
    model input: with `chat_template`, the templated text's)."""
    if fact_token == "last":
        return len(prompt_ids(tok, text, chat_template)) - 1
    if fact_token not in ("subject_last", "subject_first"):
        raise EditError(f"fact_token must be subject_last, subject_first or last, got {fact_token!r}")
    try:
        (b, e), _, _ = find_subject_range(tok, text, subject, search_from=search_from, chat_template=chat_template)
    except ValueError as exc:
        raise EditError(str(exc)) from None
    return e - 1 if fact_token == "subject_last" else b


def target_tokens(tok: Any, prompt: str, target: str, chat_template: bool = False) -> tuple[list[int], list[int]]:
    """(ids of `prompt + " " + target`, positions of the target's tokens in it); `tokens.continuation`."""
    try:
        return continuation(tok, prompt, target, chat_template)
    except ValueError as exc:
        raise EditError(str(exc)) from None


@torch.no_grad()
def _sample(model: nn.Module, tok: Any, prefix: str, n: int, max_len: int, gen: torch.Generator,
            top_k: int = 5) -> list[str]:
    device = input_device(model)
    ids = torch.tensor([tok(prefix)["input_ids"]] * n, device=device)
    n_new = max(1, max_len - ids.shape[1])
    for _ in range(n_new):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :].float().to(device)
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    texts = []
    eos = tok.eos_token_id
    for row in ids.tolist():
        if eos is not None and eos in row[1:]:
            row = row[:row.index(eos, 1)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def context_templates(model: nn.Module, tok: Any, length_params: Sequence[Sequence[int]], seed: int = 0) -> list[str]:
    """ROME's context templates: "{}" plus texts sampled from the model (top-5, seeded), each + ". {}".

    `length_params` is [[max_length_in_tokens, count], ...]; count is spread over the
    five prefixes. Cached per model object (never across models) and per seed.
    """
    key = (tuple(tuple(int(x) for x in p) for p in length_params), int(seed))
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    if key not in per_model:
        gen = torch.Generator(device=input_device(model))
        gen.manual_seed(int(seed))
        templates = ["{}"]
        for length, count in key[0]:
            for prefix in TEMPLATE_PREFIXES:
                for text in _sample(model, tok, prefix, count // len(TEMPLATE_PREFIXES), length, gen):
                    templates.append(text.replace("{", "").replace("}", "") + ". {}")
        per_model[key] = templates
    return list(per_model[key])


def check_fact(fact: Fact) -> None:
    """An EditError naming the fact when it has no target_new, or its subject is not in its prompt."""
    if not fact.target_new:
        raise EditError(f"fact {fact.id!r} has no target_new to write")
    if fact.subject not in fact.prompt:
        raise EditError(f"fact {fact.id!r}: subject {fact.subject!r} is not in prompt {fact.prompt!r}")


def compute_key(model: nn.Module, tok: Any, fact: Fact, hparams: RomeParams, layer: int,
                templates: Sequence[str], chat_template: bool = False) -> torch.Tensor:
    """k*: the rewrite module's input at the fact token, averaged over the templated prompts."""
    name = hparams.rewrite_module_tmp.format(layer)
    texts = [t.format(fact.prompt) for t in templates]
    rows = [prompt_ids(tok, t, chat_template) for t in texts]
    idxs = [lookup_index(tok, t, fact.subject, hparams.fact_token, search_from=len(t) - len(fact.prompt),
                         chat_template=chat_template) for t in texts]
    ids, mask = right_pad(rows, pad_id(tok), input_device(model))
    # stop: the key is the rewrite module's input; the layers above it and the head need not run.
    with torch.no_grad(), captured_inputs(model, [name], tokens=tuple(ids.shape), stop=True) as cache:
        model(input_ids=ids, attention_mask=mask)
    keys = cache[name][torch.arange(len(rows), device=cache[name].device), torch.tensor(idxs, device=cache[name].device)]
    return keys.float().mean(0)


def compute_value(model: nn.Module, tok: Any, fact: Fact, hparams: RomeParams, layer: int,
                  templates: Sequence[str], chat_template: bool = False,
                  module: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """v*: the MLP output at the subject's last token that makes the model predict target_new.

    `module` is the module whose output is optimised (default the layer's MLP; MEMIT's z is the block's output,
    the residual stream). `templates[0]` must be "{}": v0 is read on the bare prompt.
    """
    device = input_device(model)
    mlp_name = module if module is not None else hparams.mlp_module_tmp.format(layer)
    rows, lookups, target_pos, target_ids = [], [], [], []
    for template in templates:
        prompt = template.format(fact.prompt)
        ids, positions = target_tokens(tok, prompt, fact.target_new, chat_template)
        # Feed the target's tokens except the last: each position predicts the next one.
        rows.append(ids[:positions[-1]])
        target_pos.append(positions)
        target_ids.extend(ids[p] for p in positions)
        lookups.append(lookup_index(tok, prompt, fact.subject, hparams.fact_token,
                                    search_from=len(prompt) - len(fact.prompt), chat_template=chat_template))
    kl_text = KL_PROMPT.format(fact.subject)
    rows.append(prompt_ids(tok, kl_text, chat_template))
    lookups.append(lookup_index(tok, kl_text, fact.subject, hparams.fact_token, chat_template=chat_template))
    n_rewrite = len(templates)
    ids, mask = right_pad(rows, pad_id(tok), device)

    # Which (row, position) gets delta, and the gather indices of the target tokens.
    where = torch.zeros(ids.shape + (1,), device=device)
    where[torch.arange(len(rows)), torch.tensor(lookups)] = 1.0
    tgt_rows = torch.tensor([i for i, ps in enumerate(target_pos) for _ in ps], device=device)
    tgt_prev = torch.tensor([p - 1 for ps in target_pos for p in ps], device=device)
    tgt_ids = torch.tensor(target_ids, device=device)
    tgt_weight = torch.tensor([1.0 / len(ps) for ps in target_pos for _ in ps], device=device) / n_rewrite

    with torch.no_grad(), captured(model, [mlp_name], tokens=tuple(ids.shape)) as cache:
        logits = model(input_ids=ids, attention_mask=mask).logits.to(device)  # the LM head may sit on another device
    v0 = cache[mlp_name][0, lookups[0]].float().to(device).clone()
    kl_init = F.log_softmax(logits[n_rewrite, lookups[-1]].float(), dim=-1)

    hidden = v0.shape[-1]
    delta = torch.zeros(hidden, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * v0.norm()

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        return out + where.to(out.device, out.dtype) * delta.to(out.device, out.dtype)

    info: dict[str, float] = {}
    # enable_grad: the caller may be inside torch.no_grad().
    with torch.enable_grad():
        for step in range(hparams.v_num_grad_steps):
            with patched(model, {mlp_name: add_delta}, tokens=tuple(ids.shape)):
                logits = model(input_ids=ids, attention_mask=mask).logits.float().to(device)
            log_probs = F.log_softmax(logits[tgt_rows, tgt_prev], dim=-1)
            nll = -(log_probs.gather(1, tgt_ids[:, None])[:, 0] * tgt_weight).sum()
            kl_now = F.log_softmax(logits[n_rewrite, lookups[-1]], dim=-1)
            kl = hparams.kl_factor * F.kl_div(kl_init, kl_now, log_target=True, reduction="sum")
            decay = hparams.v_weight_decay * delta.norm() / v0.norm() ** 2
            loss = nll + kl + decay
            info = {"steps": step + 1, "loss": loss.item(), "nll": nll.item(), "kl": kl.item(),
                    "p_target": math.exp(-nll.item())}
            if loss.item() < 5e-2:
                break
            # autograd.grad, not backward: no .grad is left on the model's parameters.
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            opt.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    info["delta_norm"] = delta.detach().norm().item()
    return (v0 + delta.detach()), info


def _solve(cov: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.solve(cov.double(), k.double())
    except RuntimeError:
        # A singular C (a small corpus leaves some directions unseen): least-norm solution.
        return torch.linalg.pinv(cov.double()) @ k.double()


def rank_one_update(model: nn.Module, hparams: RomeParams, layer: int, key: torch.Tensor, value: torch.Tensor,
                    prompt_key: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW (in the weight's own layout) with W' k0 = v*, along C^-1 k*; k0 = `prompt_key`, default k*."""
    name = hparams.rewrite_module_tmp.format(layer)
    module = get_module(model, name)
    k0 = key if prompt_key is None else prompt_key
    with torch.no_grad():
        current = module(k0.to(module.weight.dtype)[None])[0].float()  # W k0 (+ bias), any layout
    residual = (value.float().to(current.device) - current).double()
    if hparams.mom2_adjustment:
        cov = mom2_for(model, hparams, layer).to(key.device)
        if cov.shape != (key.numel(), key.numel()):
            raise EditError(f"mom2 statistics for {name} have shape {tuple(cov.shape)}, keys have {key.numel()}")
        u = _solve(cov, key)
    else:
        u = key.double()
    u = u / (u @ k0.double())
    if isinstance(module, nn.Linear):
        delta = torch.outer(residual, u)  # weight is (out, in)
    elif type(module).__name__ == "Conv1D":
        delta = torch.outer(u, residual)  # GPT-2's Conv1D stores (in, out)
    else:
        raise EditError(f"{name} is a {type(module).__name__}; ROME rewrites nn.Linear or GPT-2 Conv1D weights")
    return delta.to(module.weight.dtype)


def apply_rome(model: nn.Module, tok: Any, fact: Fact, hparams: RomeParams, seed: int = 0,
               info: dict | None = None, chat_template: bool = False) -> dict[str, torch.Tensor]:
    """Write `fact.target_new` into the model at each of `hparams.layers`; returns the original weights.

    With `chat_template` every prompt the edit reads (each context template + the fact's prompt, and the KL prompt)
    is a user turn of the tokenizer's chat template; the context templates themselves are sampled as plain text.
    """
    check_fact(fact)
    if hparams.alg_name != "ROME":
        raise EditError(f"hyperparameters are for {hparams.alg_name!r}, not ROME")
    n_layers = count_layers(model, hparams.layer_module_tmp)
    for layer in hparams.layers:
        check_layer(layer, n_layers, what="hyperparameters' layer")
    if hparams.mom2_adjustment:
        check_mom2(model, hparams, hparams.layers)  # every layer's, while no layer is edited yet
    templates = context_templates(model, tok, hparams.context_template_length_params, seed=seed)
    originals: dict[str, torch.Tensor] = {}
    try:
        for layer in sorted(hparams.layers):
            name = f"{hparams.rewrite_module_tmp.format(layer)}.weight"
            key = compute_key(model, tok, fact, hparams, layer, templates, chat_template)
            prompt_key = compute_key(model, tok, fact, hparams, layer, ["{}"], chat_template)
            value, v_info = compute_value(model, tok, fact, hparams, layer, templates, chat_template)
            if not bool(torch.isfinite(value).all()):
                raise EditError(
                    f"fact {fact.id!r}: v* (the output of {hparams.mlp_module_tmp.format(layer)} that the edit "
                    f"optimises) became non-finite (NaN or inf): the optimisation diverged; check v_lr "
                    f"({hparams.v_lr}), clamp_norm_factor, v_weight_decay and kl_factor, and --dtype (float16 "
                    f"overflows: float32 or bfloat16)")
            delta = rank_one_update(model, hparams, layer, key, value, prompt_key=prompt_key)
            if not bool(torch.isfinite(delta).all()):
                raise EditError(f"fact {fact.id!r}: the update of {name} became non-finite (NaN or inf): its key "
                                f"(C^-1 k*) cannot be solved; check the mom2 statistics and --dtype")
            if name not in originals:
                originals[name] = weight_value(model, name)
            # The weight's real storage: its device, or accelerate's CPU/disk copy when offloaded.
            current = weight_value(model, name)
            set_weight(model, name, current + delta.to(current.device))
            if info is not None:
                info[layer] = v_info
    except BaseException:
        restore(model, originals)
        raise
    return originals


def restore(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Copy the saved weights back (bit-identical), also into offloaded storage."""
    for name, value in originals.items():
        set_weight(model, name, value)
