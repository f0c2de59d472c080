"""Attribution patching: the whole token x layer table of indirect effects from one forward and backward.

Restoring the clean value `c` of a site whose corrupted value is `x` changes
p(answer) by about `(c - x) · ∂p/∂x`, the gradient taken on the corrupted run
(Nanda 2023, "Attribution Patching"; Syed et al. 2023). One corrupted forward
of the S noise samples, kept with its graph, and one backward to every site
give that first-order estimate for every (token, layer) at once; a window of
layers sums its sites' estimates. The estimate is only a screen: it is exact
for a linear model and can miss where the network saturates, so `verify_top`
re-checks the largest estimates with exact restored runs (trace.py's).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .arch import KINDS, Kind, arch_for
from .facts import Fact
from .hooks import captured, get_module, patched
from .tokens import continuation, find_subject_range
from .trace import (
    NOISE_DRAWS,
    AnswerSource,
    NoiseDraws,
    TraceResult,
    _device_dtype,
    _keeps_last_logits,
    _last_probs,
    _noise_corruption,
    _replacement_corruption,
    _restored_scores,
    _sequence_logprob,
    effective_window,
    noise_level,
    trace_fact,
    window_layers,
)

METHODS: tuple[str, ...] = ("exact", "atp")


@dataclass(frozen=True)
class VerifiedSite:
    """One site whose estimate was re-checked by an exact restored run; effects are p_restored - p_corrupt."""

    token: int
    layer: int
    estimated: float
    exact: float


@dataclass(frozen=True)
class AtpResult:
    """Attribution-patching trace of one fact.

    `trace` is a TraceResult whose table (every token) and scores hold p_corrupt + the estimated effect,
    the verified sites' exact values written over their estimates, so layer choice and plots read it
    as they read an exact trace. `estimated` keeps the unverified estimates.
    """

    trace: TraceResult
    estimated: tuple[tuple[float, ...], ...]  # [token][layer] p_corrupt + estimated indirect effect
    verified: tuple[VerifiedSite, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"method": "atp", "trace": self.trace.to_json(), "estimated": [list(r) for r in self.estimated],
                "verified": [asdict(v) for v in self.verified]}


def _site_gradients(model: nn.Module, input_ids: torch.Tensor, embed: str, corruption, names: list[str],
                    answer_id: int, keep_last: bool) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One corrupted forward of the S samples and one backward: (p_corrupt, site values, d p_corrupt / d site)."""
    S, T = corruption.samples, input_ids.shape[1]
    kept: dict[str, torch.Tensor] = {}

    def keep(name):
        def edit(h: torch.Tensor) -> torch.Tensor:
            # A tensor of our own enters the rest of the forward, so the gradient is taken with respect to it.
            h = h.clone()
            kept[name] = h
            return h

        return edit

    def corrupt_with_grad(x: torch.Tensor) -> torch.Tensor:
        return corruption.edit(1)(x).detach().requires_grad_(True)

    edits = {embed: corrupt_with_grad, **{n: keep(n) for n in names}}
    with torch.enable_grad(), patched(model, edits, tokens=(S, T)):
        p = _last_probs(model, input_ids.expand(S, -1), keep_last)[:, answer_id].mean()
        values = {n: kept[n].detach().clone() for n in names}
        grads = torch.autograd.grad(p, [kept[n] for n in names], allow_unused=True)
    return float(p.detach()), values, {n: (torch.zeros_like(values[n]) if g is None else g.detach())
                              for n, g in zip(names, grads)}


def attribution_trace(model: nn.Module, tok, fact: Fact, *, arch=None, kind: Kind = "mlp", samples: int = 10,
                      window: int = 10, noise: float | None = None, noise_draws: NoiseDraws = "torch",
                      answer: AnswerSource = "top1", seed: int = 0, replacements: Sequence[str] | None = None,
                      occurrence: int = 0, verify_top: int = 0) -> AtpResult:
    """Estimate p_restored at every (token, layer) of one fact by attribution patching; re-check the
    `verify_top` largest estimated effects exactly. Arguments mean what they mean for `trace_fact`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if noise_draws not in NOISE_DRAWS:
        raise ValueError(f"noise_draws must be one of {NOISE_DRAWS}, got {noise_draws!r}")
    if answer not in ("top1", "target"):
        raise ValueError(f"answer must be 'top1' or 'target', got {answer!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if verify_top < 0:
        raise ValueError(f"verify_top must be >= 0, got {verify_top}")
    if fact.prompt != fact.prompt.rstrip():
        warnings.warn(f"prompt {fact.prompt!r} ends with whitespace: byte-level BPE models see it as its own "
                      f"token, which wrecks the next-token prediction", stacklevel=2)
    arch = arch if arch is not None and arch.n_layers else arch_for(model, arch)
    L = arch.n_layers
    device, dtype = _device_dtype(model)
    (b, e), used, ids = find_subject_range(tok, fact.prompt, fact.subject, occurrence)
    input_ids = torch.tensor([ids], device=device)
    T = len(ids)
    keep_last = _keeps_last_logits(model)
    names = [arch.module(kind, layer) for layer in range(L)]

    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            with captured(model, names, tokens=(1, T)) as clean:
                p_clean = _last_probs(model, input_ids, keep_last)[0]
            top1_id = int(p_clean.argmax())
            known = target_logprob = target_first = None
            if fact.target:
                t_full, t_pos = continuation(tok, fact.prompt, fact.target)
                target_first = t_full[t_pos[0]]
                known = top1_id == target_first
                target_logprob = _sequence_logprob(model, t_full, t_pos)
            if answer == "target" and target_first is None:
                raise ValueError(f"answer='target' but fact {fact.id!r} ({fact.prompt!r}) has no target")
            answer_id = target_first if answer == "target" else top1_id
            if noise_draws == "replace":
                corruption = _replacement_corruption(model, tok, arch, fact.prompt, fact.subject, used, b, e, ids,
                                                     replacements, samples, seed)
                level = 0.0
            else:
                level = float(noise) if noise is not None else noise_level(model, tok, [fact.subject], arch)
                hidden = get_module(model, arch.embed)(input_ids[:, :1]).shape[-1]
                corruption = _noise_corruption(b, e, hidden, samples, level, noise_draws, seed, device, dtype)
        p_corrupt, values, grads = _site_gradients(model, input_ids, arch.embed, corruption, names, answer_id,
                                                   keep_last)
        # per_site[m][t]: the estimated change of p from restoring module m at token t in every sample row.
        per_site = torch.stack([((clean[n][0].float() - values[n].float()) * grads[n].float()).sum(dim=(0, 2))
                                for n in names])
        w = effective_window(window, L, kind)
        est = torch.stack([per_site[list(window_layers(layer, w, L))].sum(dim=0) for layer in range(L)], dim=1)
        estimated = [[p_corrupt + float(x) for x in row] for row in est.tolist()]
        table = [list(row) for row in estimated]
        verified: list[VerifiedSite] = []
        if verify_top:
            order = torch.argsort(est.flatten(), descending=True)[:verify_top].tolist()
            sites = [(i // L, i % L) for i in order]
            with torch.no_grad():
                exact = _restored_scores(model, input_ids, arch, kind, clean, corruption, sites, w, answer_id,
                                         None, keep_last)
            for (t, layer), p in zip(sites, exact):
                verified.append(VerifiedSite(t, layer, estimated[t][layer] - p_corrupt, p - p_corrupt))
                table[t][layer] = p
    finally:
        if was_training:
            model.train()

    trace = TraceResult(
        fact_id=str(fact.id), prompt=fact.prompt, subject=fact.subject, kind=kind,
        tokens=tuple(tok.decode([t]) for t in ids), subject_range=(b, e), subject_occurrence=used,
        answer=tok.decode([answer_id]), answer_id=answer_id, answer_source=answer,
        top1=tok.decode([top1_id]), target=fact.target, known=known,
        high_score=float(p_clean[answer_id]), low_score=p_corrupt, scores=tuple(table[e - 1]),
        table=tuple(tuple(r) for r in table), noise=level, samples=corruption.samples, window=w,
        noise_draws=noise_draws, target_logprob=target_logprob,
    )
    return AtpResult(trace=trace, estimated=tuple(tuple(r) for r in estimated), verified=tuple(verified))


def tracer(method: str = "exact", verify_top: int = 0):
    """The per-fact trace function for `method` ("exact": `trace_fact`; "atp": attribution patching, its
    TraceResult), called as `trace_fact` is; atp always fills the whole table."""
    if method == "exact":
        return trace_fact
    if method != "atp":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def trace(model, tok, fact, full: bool = True, max_batch=None, reuse_prefix=None, **kwargs) -> TraceResult:
        return attribution_trace(model, tok, fact, verify_top=verify_top, **kwargs).trace

    return trace
