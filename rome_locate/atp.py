"""Attribution patching: the whole token x layer table of indirect effects from one forward and backward.

Restoring the clean value `c` of a site whose corrupted value is `x` changes
p(answer) by about `(c - x) · ∂p/∂x`, the gradient taken on the corrupted run
(Nanda 2023, "Attribution Patching"; Syed et al. 2023). One corrupted forward
of the S noise samples, kept with its graph, and one backward to every site
give that first-order estimate for every (token, layer) at once; a window of
layers sums its sites' estimates. The estimate is only a screen: it is exact
for a linear model and can miss where the network saturates, so `verify_top`
re-checks the largest estimates with exact restored runs (runs.py's), batched over facts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from .arch import Arch, arch_for
from .facts import Fact
from .runs import Caller, FirstRun, effective_window, first_run, restored_scores, window_layers
from .trace import TraceResult, TraceSettings, _evaluating, _result, prepare_batches, trace_each, trace_fact


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


def attribution_each(model: nn.Module, tok, facts: Sequence[Fact],
                     settings: TraceSettings = TraceSettings(method="atp"), *, arch: Arch | None = None,
                     noise_level: float | None = None, replacements: Sequence[str] | None = None,
                     occurrence: int = 0, batch_facts: int | None = None) -> list[AtpResult | ValueError]:
    """Attribution-patching traces of many facts, one forward and one backward per batch of facts of one prompt
    length: one outcome per fact, its AtpResult or the ValueError that says why it cannot be traced."""
    if not isinstance(settings, TraceSettings):
        raise TypeError(f"settings must be a TraceSettings, got {type(settings).__name__}")
    if settings.method != "atp":
        settings = replace(settings, method="atp")
    arch = arch_for(model, arch)
    L, kind = arch.n_layers, settings.kind
    w = effective_window(settings.window, L, kind)
    caller = Caller.of(model)
    outcomes: list[AtpResult | ValueError | None] = [None] * len(facts)
    # windows[m, layer] = 1 where restoring `layer`'s window restores module m.
    windows = torch.zeros(L, L)
    for layer in range(L):
        windows[list(window_layers(layer, w, L)), layer] = 1.0
    with _evaluating(model):
        with torch.no_grad():
            errors, batches = prepare_batches(model, tok, facts, settings, arch, noise_level, replacements,
                                              occurrence, batch_facts, gradients=True)
        for i, err in enumerate(errors):
            if err is not None:
                outcomes[i] = err
        for batch in batches:
            preps = [u for _, u in batch]
            run = first_run(model, arch, kind, [u.prompt for u in preps], caller,
                            keep_states=settings.verify_top > 0, gradients=True)
            # est[j, t, layer]: the estimated change of fact j's p from restoring the window around `layer` at
            # token t, summed over its sample rows; one pass over the modules for all the facts of the batch.
            est = torch.einsum("mjt,ml->jtl", _site_estimates(run, [arch.module(kind, m) for m in range(L)]),
                               windows).double()
            p_corrupt = torch.tensor(run.p_corrupt, dtype=torch.float64)
            estimated = (est + p_corrupt[:, None, None]).tolist()
            tables = [[list(row) for row in table] for table in estimated]
            checks = []
            for j, u in enumerate(preps):
                # The row the layer choice reads: with K >= the layers in contention the choice is exact.
                order = torch.argsort(est[j, u.e - 1], descending=True)[:settings.verify_top].tolist()
                checks += [(j, u.e - 1, layer) for layer in order]
            with torch.no_grad():
                exact = restored_scores(model, arch, kind, run, checks, w, caller)
            verified: list[list[VerifiedSite]] = [[] for _ in preps]
            for (j, t, layer), p in zip(checks, exact):
                p_corrupt = run.p_corrupt[j]
                verified[j].append(VerifiedSite(t, layer, estimated[j][t][layer] - p_corrupt, p - p_corrupt))
                tables[j][t][layer] = p
            for j, (i, u) in enumerate(batch):
                try:
                    trace = _result(tok, u, run, j, settings, w, tables[j][u.e - 1], tables[j])
                except ValueError as exc:
                    outcomes[i] = exc
                    continue
                outcomes[i] = AtpResult(trace=trace, estimated=tuple(tuple(r) for r in estimated[j]),
                                        verified=tuple(verified[j]))
    return outcomes  # type: ignore[return-value]


def _site_estimates(run: FirstRun, names: Sequence[str]) -> torch.Tensor:
    """(modules, prompts, T): sum over each prompt's sample rows of (clean - corrupted) . gradient, per token."""
    P, T = len(run.corrupt_rows), run.T
    rows = torch.tensor(run.sample_rows())
    prompt_of_row = torch.tensor([j for j in range(P) for _ in run.rows(j)])
    out = []
    for n in names:
        values, grads = run.values[n], run.grads[n]
        at = rows.to(values.device)
        clean = run.clean[n][:, :T].to(values.device)[prompt_of_row.to(values.device)].float()
        per_row = ((clean - values[at, :T].float()) * grads[at, :T].float()).sum(dim=-1).cpu()
        out.append(torch.zeros(P, T).index_add_(0, prompt_of_row, per_row))
    return torch.stack(out)


def attribution_trace(model: nn.Module, tok, fact: Fact, settings: TraceSettings = TraceSettings(method="atp"), *,
                      arch: Arch | None = None, noise_level: float | None = None,
                      replacements: Sequence[str] | None = None, occurrence: int = 0) -> AtpResult:
    """Estimate p_restored at every (token, layer) of one fact by attribution patching; re-check exactly the
    `settings.verify_top` largest estimated effects at the last subject token. Arguments mean what they mean for `trace_fact`."""
    [out] = attribution_each(model, tok, [fact], settings, arch=arch, noise_level=noise_level,
                             replacements=replacements, occurrence=occurrence)
    if isinstance(out, ValueError):
        raise out
    return out


def trace_by_method(model: nn.Module, tok, fact: Fact, settings: TraceSettings, **kwargs) -> TraceResult:
    """The trace `settings.method` asks for: exact restored runs (`trace.trace_fact`) or attribution patching."""
    if settings.method == "atp":
        return attribution_trace(model, tok, fact, settings, **kwargs).trace
    return trace_fact(model, tok, fact, settings, **kwargs)


def trace_each_by_method(model: nn.Module, tok, facts: Sequence[Fact], settings: TraceSettings,
                         **kwargs) -> list[TraceResult | ValueError]:
    """One outcome per fact, traced as `settings.method` asks, several facts per forward (see `trace.trace_each`)."""
    if settings.method == "atp":
        return [out if isinstance(out, ValueError) else out.trace
                for out in attribution_each(model, tok, facts, settings, **kwargs)]
    return trace_each(model, tok, facts, settings, **kwargs)
