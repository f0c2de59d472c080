"""The forwards of causal tracing, batched over facts: the clean and the corrupted run of a batch of facts, then
the restored runs, planned into as few forwards as pay.

The first run (`first_run`) of a batch of prompts of one token length T holds a
clean row per prompt, which reads the prompt followed by its target (so the same
forward gives the target's log-probability), and each prompt's S corrupted rows
(the noise samples). The clean rows run in the corrupted forward when the cost
model finds padding the corrupted rows to their length cheaper than a forward of
their own (small batches), else apart. The first run keeps what every restored run
starts from: the clean outputs of the traced modules, and the corrupted run's
block outputs and key/value cache.

A restored run of site (prompt, token t, layer l) is the corrupted run with the clean
outputs of the window around l written back at t. Nothing below the window's bottom
differs from the corrupted run, and nothing before t: so the sites of a forward
(`restored_scores`) start at the lowest bottom among them, fed the corrupted run's block
states there (`hooks.started_at`), and at the earliest restored token, the positions
before it read from a slice of the first run's cache. Which sites share a forward is
planned by a cost model (`Costs`). Each group of S rows is one site; any prompt of
the batch may sit beside any other.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .arch import Arch, Kind
from .hooks import captured, patched, started_at
from .costs import PlannedSite, clean_rides_along, costs_for, flops_per_position, max_rows, plan
from .models import input_device

# ---- windows ----------------------------------------------------------------------


def effective_window(window: int, n_layers: int, kind: Kind) -> int:
    """The restoration window actually used.

    Rule: `w_eff = min(w, max(1, L // 2))` for mlp and attn, so a window never
    spans more than half the model (ROME's w=10 is kept for every model with
    at least 20 layers: GPT-2 XL, GPT-J; an 8-layer model gets 4, a 4-layer
    model 2). `hidden` restores a single block output, so its window is 1.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if kind == "hidden":
        return 1
    return min(window, max(1, n_layers // 2))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored around `layer`: [max(0, l - w//2), min(L, l + w - w//2))."""
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


# ---- corruption --------------------------------------------------------------------


@dataclass
class Corruption:
    """What the embedding hook does to the subject positions [b, e) of each sample row."""

    b: int
    e: int
    values: torch.Tensor  # (S, e-b, hidden)
    mode: str  # "add" (noise) or "set" (token replacement)

    @property
    def samples(self) -> int:
        """The number of sample rows (S)."""
        return self.values.shape[0]


def corrupting(groups: Sequence[tuple[int, Corruption]], start: int = 0):
    """An embedding-output rewrite for rows holding prompt positions [start, ...): each (row, corruption) of
    `groups` corrupts rows [row, row + S) with samples 0..S-1."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for row, c in groups:
            lo, hi = max(c.b, start), c.e
            if hi <= lo:
                continue
            vals = c.values[:, lo - c.b:hi - c.b].to(x.device)
            rows = slice(row, row + c.samples)
            if c.mode == "add":
                # In-place add keeps ROME's float64 draws exact until the single cast to x's dtype.
                x[rows, lo - start:hi - start] += vals
            else:
                x[rows, lo - start:hi - start] = vals.to(x.dtype)
        return x

    return fn


# ---- model calls -------------------------------------------------------------------


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


@dataclass(frozen=True)
class Caller:
    """How to call `model`: whether it keeps only the last logits, and its cache argument's name (transformers
    renamed `past_key_values` to `cache` in 5.25 and warns on the old name)."""

    keep_last: bool
    cache_arg: str

    @staticmethod
    def of(model: nn.Module) -> "Caller":
        """The Caller for `model`'s forward signature."""
        params = _forward_parameters(model)
        return Caller("logits_to_keep" in params, "cache" if "cache" in params else "past_key_values")

    def logits(self, model: nn.Module, input_ids: torch.Tensor, keep: int = 1, cache=None, use_cache=False):
        """(logits of the last `keep` positions of every row, the returned cache or None)."""
        kw: dict[str, Any] = {"logits_to_keep": keep} if self.keep_last else {}
        if cache is not None:
            kw[self.cache_arg] = cache
        out = model(input_ids=input_ids, use_cache=use_cache or cache is not None, **kw)
        returned = None
        if use_cache:
            returned = out.get("cache", None) if hasattr(out, "get") else None
            if returned is None:
                returned = getattr(out, "past_key_values", None)
        return out.logits[:, -keep:], returned


def _answer_logprob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """log p(answer) per row of (rows, vocab) logits, in float32, without a second (rows, vocab) tensor."""
    logits = logits.float()
    return logits.gather(1, answers[:, None].to(logits.device))[:, 0] - torch.logsumexp(logits, dim=-1)


# ---- the first run -----------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One fact's input to the runs: its prompt tokens, what its clean row reads and its corruption."""

    ids: list[int]
    clean_ids: list[int]  # the prompt, followed by the target's tokens when they extend it
    target_positions: list[int]  # positions of the target's tokens in clean_ids ([] without one)
    corruption: Corruption
    answer: int | None  # the answer token, or None for the clean run's top-1


@dataclass
class FirstRun:
    """The clean and the corrupted runs of a batch of prompts of one length T."""

    T: int
    input_ids: torch.Tensor  # (rows, T' >= T) the corrupted forward's rows
    corrupt_rows: list[int]  # each prompt's first corrupted row (its S rows follow)
    corruptions: list[Corruption]
    clean: dict[str, torch.Tensor]  # traced module -> (prompts, T' >= T, d): the clean rows' outputs
    top1: list[int]
    answers: list[int]
    p_clean: list[float]
    p_corrupt: list[float]
    target_logprob: list[float | None]
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # block -> (rows, T', d) outputs
    arity: int | None = None  # the blocks' output tuple length (None: a bare tensor)
    cache: Any = None  # the corrupted forward's key/value cache, when a slice of it can serve restored runs
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # with gradients: module -> (rows, T', d)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # d sum(p_corrupt) / d values

    def rows(self, prompt: int) -> range:
        """The corrupted rows of `prompt`."""
        start = self.corrupt_rows[prompt]
        return range(start, start + self.corruptions[prompt].samples)

    def sample_rows(self) -> list[int]:
        """Every corrupted row, prompt by prompt."""
        return _sample_rows(self.corrupt_rows, [c.samples for c in self.corruptions])


def _sample_rows(starts: Sequence[int], sizes: Sequence[int]) -> list[int]:
    return [r for start, n in zip(starts, sizes) for r in range(start, start + n)]


def _padded(ids: list[int], length: int) -> list[int]:
    # Right padding that repeats the row's last token: no real position reads a pad (causal attention), and no
    # pad token id appears (transformers warns of a missing attention mask when it sees one).
    return ids + [ids[-1]] * (length - len(ids))


def first_run(model: nn.Module, arch: Arch, kind: Kind, prompts: Sequence[Prompt], caller: Caller,
              keep_states: bool = True, gradients: bool = False) -> FirstRun:
    """Clean and corrupted runs of `prompts` (one token length); call under eval mode.

    The clean rows read each prompt followed by its target, so the same forward gives the target's
    log-probability; they run in a forward of their own, or in the corrupted forward where the cost model
    (`clean_rides_along`) finds that cheaper. With `keep_states`, the run also keeps every block's output and
    the cache for restored runs. With `gradients`, it also gives d sum_prompts p_corrupt / d (each traced
    module's output), for attribution patching; otherwise call it under no_grad.
    """
    T = len(prompts[0].ids)
    if any(len(p.ids) != T for p in prompts):
        raise ValueError("a first run batches prompts of one token length")
    L, P = arch.n_layers, len(prompts)
    names = [arch.module(kind, layer) for layer in range(L)]
    device = input_device(model)
    T1 = max(len(p.clean_ids) for p in prompts)
    clean_ids = [_padded(p.clean_ids, T1) for p in prompts]
    sizes = [p.corruption.samples for p in prompts]
    together = clean_rides_along(model, L, P, sum(sizes), T, T1, gradients)
    width = T1 if together else T
    rows = list(clean_ids) if together else []
    corrupt_rows = []
    for p in prompts:
        corrupt_rows.append(len(rows))
        rows += [_padded(p.ids, width)] * p.corruption.samples
    input_ids = torch.tensor(rows, device=device)
    R = len(rows)

    clean: dict[str, torch.Tensor] = {}
    if not together:
        with torch.no_grad(), captured(model, names, tokens=(P, T1)) as clean:
            clean_logits, _ = caller.logits(model, torch.tensor(clean_ids, device=device), keep=T1 - T + 1)

    blocks = [arch.layer_module_tmp.format(i) for i in range(L)] if keep_states else []
    corrupt = corrupting(list(zip(corrupt_rows, [p.corruption for p in prompts])))
    kept: dict[str, torch.Tensor] = {}
    if gradients:
        def leaf(x: torch.Tensor) -> torch.Tensor:
            # The graph starts at the corrupted embeddings, whether or not the weights require grad.
            return corrupt(x).detach().requires_grad_(True)

        def keep(name: str):
            def edit(h: torch.Tensor) -> torch.Tensor:
                # A tensor of our own enters the rest of the forward, so the gradient is taken with respect to it.
                h = h.clone()
                kept[name] = h
                return h

            return edit

        edits = {arch.embed: leaf, **{n: keep(n) for n in names}}
    else:
        edits = {arch.embed: corrupt}
    arity: dict[str, int | None] = {}
    corrupt_index = _sample_rows(corrupt_rows, sizes)
    with torch.enable_grad() if gradients else torch.no_grad():
        with patched(model, edits, tokens=(R, width)), \
                captured(model, blocks, tokens=(R, width), arity=arity) as states, \
                captured(model, names if together else [], tokens=(R, width), rows=slice(0, P)) as riding:
            # Kept logits start at position T - 1 in every row.
            logits, cache = caller.logits(model, input_ids, keep=width - T + 1, use_cache=keep_states)
        if together:
            clean = riding
            clean_logits = logits[:P].detach()
        top1, answers, p_clean, target_logprob = _clean_answers(prompts, clean_logits, T)
        row_answers = torch.tensor([a for a, n in zip(answers, sizes) for _ in range(n)])
        p_rows = _answer_logprob(logits[corrupt_index, 0], row_answers).exp()
        p_corrupt = torch.stack([chunk.mean() for chunk in torch.split(p_rows, sizes)])
        grads: dict[str, torch.Tensor] = {}
        if gradients:
            got = torch.autograd.grad(p_corrupt.sum(), [kept[n] for n in names], allow_unused=True)
            grads = {n: (torch.zeros_like(kept[n]) if g is None else g.detach()) for n, g in zip(names, got)}
    return FirstRun(
        T=T, input_ids=input_ids, corrupt_rows=corrupt_rows, corruptions=[p.corruption for p in prompts],
        clean=dict(clean), top1=top1, answers=answers, p_clean=p_clean, p_corrupt=p_corrupt.detach().tolist(),
        target_logprob=target_logprob, states=dict(states), arity=arity.get(blocks[0]) if blocks else None,
        cache=cache if keep_states and _sliceable(cache, width) else None,
        values={n: kept[n].detach() for n in kept} if gradients else {}, grads=grads,
    )


def _clean_answers(prompts: Sequence[Prompt], logits: torch.Tensor, T: int
                   ) -> tuple[list[int], list[int], list[float], list[float | None]]:
    """(top-1, answer, p_clean(answer), log p(target)) of each prompt, from its clean row's logits at positions
    T - 1 and after."""
    last = logits[:, 0]
    top1 = last.argmax(dim=-1).tolist()
    answers = [top if p.answer is None else p.answer for p, top in zip(prompts, top1)]
    p_clean = _answer_logprob(last, torch.tensor(answers)).exp().tolist()
    target_logprob: list[float | None] = []
    for i, p in enumerate(prompts):
        if not p.target_positions:
            target_logprob.append(None)
            continue
        # Position q's logits predict token q + 1.
        lp = torch.log_softmax(logits[i].float(), dim=-1)
        pos = torch.tensor([q - T for q in p.target_positions], device=lp.device)
        tgt = torch.tensor([p.clean_ids[q] for q in p.target_positions], device=lp.device)
        target_logprob.append(float(lp[pos, tgt].sum()))
    return top1, answers, p_clean, target_logprob


# ---- the key/value cache -----------------------------------------------------------


def _sliceable(cache, length: int) -> bool:
    """Whether every layer of `cache` holds plain key/value tensors of all `length` positions (DynamicCache,
    and sliding-window layers whose window was not reached); other caches are not sliced."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        return False
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4
                and keys.shape[-2] == length and values.shape[-2] == length):
            return False
        if getattr(layer, "cumulative_length", length) != length:
            return False
    return True


def _prefix(cache, rows: torch.Tensor, stop: int):
    """A new cache holding positions [0, stop) of `rows` of a sliceable `cache`."""
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        index = rows.to(layer.keys.device)
        part.keys = layer.keys[index, :, :stop]
        part.values = layer.values[index, :, :stop]
        if hasattr(layer, "cumulative_length"):
            part.cumulative_length = stop
        new.layers.append(part)
    return new


# ---- the restored runs -------------------------------------------------------------


def restored_scores(model: nn.Module, arch: Arch, kind: Kind, run: FirstRun, sites: Sequence[tuple[int, int, int]],
                    window: int, caller: Caller, rows_max: int | None = None,
                    reuse_prefix: bool | None = None) -> list[float]:
    """p_restored(answer) of each (prompt, token, layer) site of the first run's prompts, several sites per forward.

    `window` is the effective window (`effective_window`); `rows_max` bounds the rows of a forward (default `max_rows`); `reuse_prefix` False runs every
    position of the prompt instead of reading the positions before the restored token from the cache.
    """
    if not sites:
        return []
    L, T = arch.n_layers, run.T
    device = run.input_ids.device
    blocks = [arch.layer_module_tmp.format(i) for i in range(L)]
    per_position, head = flops_per_position(model)
    largest = max(run.corruptions[p].samples for p, _, _ in sites)
    rows_cap = max(rows_max if rows_max is not None else max_rows(model, T), largest)
    use_prefix = run.cache is not None and reuse_prefix is not False
    todo = [PlannedSite(window_layers(layer, window, L).start, token, run.corruptions[p].samples, i)
            for i, (p, token, layer) in enumerate(sites)]
    out: list[float] = [0.0] * len(sites)
    for chunk in plan(todo, L, T, costs_for(model), per_position, head, rows_cap, use_prefix):
        bottom = min(s.bottom for s in chunk)
        start = min(s.token for s in chunk) if use_prefix else 0
        source: list[int] = []  # first-run row of each row of this forward
        groups: list[tuple[int, Corruption]] = []
        restore_rows: dict[int, list[int]] = {}
        restore_tok: dict[int, list[int]] = {}
        restore_src: dict[int, list[int]] = {}  # the prompt whose clean value a row receives
        answers: list[int] = []
        for s in chunk:
            p, token, layer = sites[s.index]
            row0 = len(source)
            source.extend(run.rows(p))
            groups.append((row0, run.corruptions[p]))
            answers.extend([run.answers[p]] * s.rows)
            for m in window_layers(layer, window, L):
                restore_rows.setdefault(m, []).extend(range(row0, row0 + s.rows))
                restore_tok.setdefault(m, []).extend([token] * s.rows)
                restore_src.setdefault(m, []).extend([p] * s.rows)
        R = len(source)
        src = torch.tensor(source, device=device)
        edits = {arch.embed: corrupting(groups, start)} if bottom == 0 else {}
        for m in sorted(restore_rows):
            name = arch.module(kind, m)
            clean = run.clean[name]
            toks = torch.tensor(restore_tok[m])
            value = clean[torch.tensor(restore_src[m], device=clean.device), toks.to(clean.device)]
            rows = torch.tensor(restore_rows[m])
            local = toks - start

            def restore(h: torch.Tensor, rows=rows, local=local, value=value) -> torch.Tensor:
                # Under a device map the module may sit on another device than the inputs.
                h = h.clone()
                h[rows.to(h.device), local.to(h.device)] = value.to(h.device, h.dtype)
                return h

            edits[name] = restore
        cache = _prefix(run.cache, src, start) if start > 0 else None
        state = None
        if bottom > 0:
            kept = run.states[blocks[bottom - 1]]
            state = kept[src.to(kept.device), start:T]
        with patched(model, edits, tokens=(R, T - start)), started_at(model, blocks, bottom, state, run.arity):
            logits, _ = caller.logits(model, run.input_ids[src, start:T], cache=cache)
        p_rows = _answer_logprob(logits[:, -1], torch.tensor(answers)).exp()
        for s, p in zip(chunk, torch.split(p_rows, [s.rows for s in chunk])):
            out[s.index] = float(p.mean())
    return out
