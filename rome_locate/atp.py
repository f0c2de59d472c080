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

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from .arch import Arch, arch_for
from .facts import Fact
from .hooks import patched
from .trace import (
    TraceResult,
    TraceSettings,
    _evaluating,
    _last_probs,
    _restored_scores,
    _result,
    _set_up,
    effective_window,
    trace_fact,
    window_layers,
)


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


def attribution_trace(model: nn.Module, tok, fact: Fact, settings: TraceSettings = TraceSettings(method="atp"), *,
                      arch: Arch | None = None, noise_level: float | None = None,
                      replacements: Sequence[str] | None = None, occurrence: int = 0) -> AtpResult:
    """Estimate p_restored at every (token, layer) of one fact by attribution patching; re-check the
    `settings.verify_top` largest estimated effects exactly. Arguments mean what they mean for `trace_fact`."""
    if not isinstance(settings, TraceSettings):
        raise TypeError(f"settings must be a TraceSettings, got {type(settings).__name__}")
    if settings.method != "atp":
        settings = replace(settings, method="atp")
    arch = arch if arch is not None and arch.n_layers else arch_for(model, arch)
    L, kind = arch.n_layers, settings.kind
    with _evaluating(model):
        with torch.no_grad():
            u = _set_up(model, tok, fact, settings, arch, noise_level, replacements, occurrence)
        p_corrupt, values, grads = _site_gradients(model, u.input_ids, arch.embed, u.corruption, u.names,
                                                   u.answer_id, u.keep_last)
        # per_site[m][t]: the estimated change of p from restoring module m at token t in every sample row.
        per_site = torch.stack([((u.clean[n][0].float().to(values[n].device) - values[n].float())
                                 * grads[n].float()).sum(dim=(0, 2)).cpu() for n in u.names])
        w = effective_window(settings.window, L, kind)
        est = torch.stack([per_site[list(window_layers(layer, w, L))].sum(dim=0) for layer in range(L)], dim=1)
        estimated = [[p_corrupt + float(x) for x in row] for row in est.tolist()]
        table = [list(row) for row in estimated]
        verified: list[VerifiedSite] = []
        if settings.verify_top:
            order = torch.argsort(est.flatten(), descending=True)[:settings.verify_top].tolist()
            sites = [(i // L, i % L) for i in order]
            with torch.no_grad():
                exact = _restored_scores(model, u.input_ids, arch, kind, u.clean, u.corruption, sites, w,
                                         u.answer_id, None, u.keep_last)
            for (t, layer), p in zip(sites, exact):
                verified.append(VerifiedSite(t, layer, estimated[t][layer] - p_corrupt, p - p_corrupt))
                table[t][layer] = p
    trace = _result(tok, u, settings, w, p_corrupt, table[u.e - 1], table)
    return AtpResult(trace=trace, estimated=tuple(tuple(r) for r in estimated), verified=tuple(verified))


def trace_by_method(model: nn.Module, tok, fact: Fact, settings: TraceSettings, **kwargs) -> TraceResult:
    """The trace `settings.method` asks for: exact restored runs (`trace.trace_fact`) or attribution patching."""
    if settings.method == "atp":
        return attribution_trace(model, tok, fact, settings, **kwargs).trace
    return trace_fact(model, tok, fact, settings, **kwargs)
