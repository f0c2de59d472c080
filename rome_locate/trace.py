"""Causal tracing: clean, corrupted and restored runs of one fact, as in ROME (Meng et al. 2022, sec. 2.1).

Batch layout. The clean run is a batch of one; its module outputs are captured
once. Every corrupted run is a batch of `S` rows (the noise samples) or of
`k·S` rows, where each group of `S` rows restores a different (token, layer)
site. All groups receive the very same corruption, so the comparison with the
corrupted baseline is paired. Corruption is a hook on the embedding module
(`arch.embed`) that changes the subject positions `[b, e)`; restoration is a
hook on each restored module that writes the captured clean values back.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from .arch import KINDS, Arch, Kind, arch_for
from .facts import Fact
from .hooks import captured, get_module, patched, started_at
from .models import ModelFingerprint, context_length, input_device, model_dtype
from .records import Record, non_finite
from .tokens import char_range_tokens, continuation, find_subject_range, subject_starts

NoiseDraws = Literal["torch", "rome", "replace"]
AnswerSource = Literal["top1", "target"]
Method = Literal["exact", "atp"]
NOISE_DRAWS: tuple[str, ...] = ("torch", "rome", "replace")
ANSWERS: tuple[str, ...] = ("top1", "target")
METHODS: tuple[str, ...] = ("exact", "atp")
# Rows per forward on an accelerator; on CPU see `CPU_CHUNK_BYTES`.
ACCELERATOR_MAX_BATCH = 1024


_SIGMA = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*sigma\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TraceSettings(Record):
    """How facts are traced: built once (from CLI flags or code), passed to tracing, stored with every result.

    `noise` is a fixed level (a number) or "Ksigma": K times the standard deviation
    of the subjects' token embeddings, computed once per model and dataset.
    `full` traces every token (the heatmap's table), not only the last subject
    token's row, about T times the work.
    `method` "exact" makes the restored runs; "atp" estimates the whole table by
    attribution patching (atp.py: one forward and backward per fact), and then
    `verify_top` K re-checks its K largest estimated effects with exact runs.
    Both change the numbers, so they are recorded and checked on resume like the rest.
    """

    kind: Kind = "mlp"
    samples: int = 10
    window: int = 10
    noise: float | str = "3sigma"
    noise_draws: NoiseDraws = "torch"
    answer: AnswerSource = "top1"
    seed: int = 0
    full: bool = False
    method: Method = "exact"
    verify_top: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.noise_draws not in NOISE_DRAWS:
            raise ValueError(f"noise_draws must be one of {NOISE_DRAWS}, got {self.noise_draws!r}")
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {self.answer!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("samples", "window", "seed", "verify_top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.verify_top < 0:
            raise ValueError(f"verify_top must be >= 0, got {self.verify_top}")
        if self.verify_top and self.method != "atp":
            raise ValueError("verify_top re-checks attribution-patching estimates: it needs method='atp'")
        object.__setattr__(self, "noise", _normalised_noise(self.noise))

    @property
    def noise_factor(self) -> float | None:
        """K of a "Ksigma" noise setting; None for a fixed level."""
        return float(self.noise[:-5]) if isinstance(self.noise, str) else None

    @property
    def fixed_noise(self) -> float | None:
        """The fixed noise level; None for a "Ksigma" setting (the level depends on the subjects)."""
        return None if isinstance(self.noise, str) else float(self.noise)


def _normalised_noise(noise: float | str) -> float | str:
    """A finite, non-negative level as a float, or "Ksigma" with K written plainly; anything else is a ValueError."""
    if isinstance(noise, str):
        m = _SIGMA.match(noise)
        if m:
            return f"{float(m.group(1)):g}sigma"
        try:
            noise = float(noise)
        except ValueError:
            raise ValueError(f"noise must be a number or 'Ksigma' (e.g. '3sigma'), got {noise!r}") from None
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise ValueError(f"noise must be a number or 'Ksigma' (e.g. '3sigma'), got {noise!r}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite level >= 0 or 'Ksigma', got {noise!r}")
    return float(noise)


@dataclass(frozen=True)
class TraceResult(Record):
    """The outcome of tracing one fact for one kind; plain types only."""

    fact_id: str
    prompt: str
    subject: str
    kind: Kind
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]  # half-open [b, e); the last subject token is e - 1
    subject_occurrence: int  # 0-based index of the subject's occurrence in the prompt
    answer: str
    answer_id: int
    answer_source: str  # "top1" | "target"
    top1: str
    target: str | None
    known: bool | None  # clean top-1 == first token of the target; None without a target
    high_score: float  # p_clean(answer)
    low_score: float  # p_corrupt(answer), averaged over the samples
    scores: tuple[float, ...]  # p_restored(answer) at the last subject token, one per layer
    table: tuple[tuple[float, ...], ...] | None  # [token][layer] p_restored, only for full traces
    noise: float  # the level used (a "Ksigma" setting resolved to a number)
    samples: int  # the samples used ("replace" may use fewer than asked)
    window: int  # the effective window (after clipping); 1 for kind "hidden"
    noise_draws: str
    target_logprob: float | None  # log p(whole target | prompt) under the clean model
    settings: TraceSettings = TraceSettings()  # as asked (the fields above are what they resolved to)
    model: ModelFingerprint | None = None  # the traced model; `locate` fills it in, once per run

    @property
    def effects(self) -> tuple[float, ...]:
        """Indirect effects at the last subject token, p_restored - p_corrupt, one per layer (the one definition)."""
        return tuple(s - self.low_score for s in self.scores)

    @property
    def n_layers(self) -> int:
        """Number of layers traced."""
        return len(self.scores)


# ---- model plumbing ----------------------------------------------------------


def _keeps_last_logits(model: nn.Module) -> bool:
    # Computing the LM head on the last position only saves most of its cost on large vocabularies.
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _last_probs(model: nn.Module, input_ids: torch.Tensor, keep_last: bool, cache=None) -> torch.Tensor:
    """Next-token probabilities (float32) at the last position of every row (after `cache`, if given)."""
    kw: dict[str, Any] = {"logits_to_keep": 1} if keep_last else {}
    if cache is not None:
        kw["past_key_values"] = cache
    out = model(input_ids=input_ids, use_cache=cache is not None, **kw)
    return torch.softmax(out.logits[:, -1, :].float(), dim=-1)


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


def _subject_embedding_values(model: nn.Module, tok, subjects: Iterable[str], arch: Arch) -> torch.Tensor:
    embed = get_module(model, arch.embed)
    device = input_device(model)
    rows = []
    with torch.no_grad():
        for s in subjects:
            ids = tok(s, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            rows.append(embed(torch.tensor([ids], device=device)).float().reshape(-1).cpu())
    if not rows:
        raise ValueError("no subject tokens to measure the embedding spread on")
    return torch.cat(rows)


def noise_level(model: nn.Module, tok, facts: Sequence[Fact] | Sequence[str], arch: Arch | None = None,
                factor: float = 3.0) -> float:
    """`factor` × the standard deviation of the subjects' token embeddings, all elements pooled."""
    arch = arch if arch is not None and arch.n_layers else arch_for(model, arch)
    subjects = [f if isinstance(f, str) else f.subject for f in facts]
    return _sigma_level(model, tok, subjects, arch, factor)


def _sigma_level(model: nn.Module, tok, subjects: Iterable[str], arch: Arch, factor: float) -> float:
    return float(factor * _subject_embedding_values(model, tok, subjects, arch).std().item())


# ---- corruption ----------------------------------------------------------------


@dataclass
class _Corruption:
    """What the embedding hook does to the subject positions of each sample row."""

    b: int
    e: int
    values: torch.Tensor  # (S, e-b, hidden)
    mode: str  # "add" (noise) or "set" (token replacement)

    @property
    def samples(self) -> int:
        return self.values.shape[0]

    def edit(self, groups: int, start: int = 0, stop: int | None = None):
        """An embedding-output edit for `groups` × S rows (sample-major: row s·groups + j) holding
        prompt positions [start, stop); every group is corrupted alike."""
        lo = max(self.b, start)
        hi = self.e if stop is None else min(self.e, stop)
        vals = self.values[:, lo - self.b:hi - self.b]
        if groups > 1:
            vals = vals.repeat_interleave(groups, dim=0)

        def fn(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != vals.shape[0]:
                raise RuntimeError(f"embedding batch {x.shape[0]} != corruption rows {vals.shape[0]}")
            if hi <= lo:
                return x
            x = x.clone()
            if self.mode == "add":
                # In-place add keeps ROME's float64 draws exact until the single cast to x's dtype.
                x[:, lo - start:hi - start] += vals
            else:
                x[:, lo - start:hi - start] = vals.to(x.dtype)
            return x

        return fn


def _noise_corruption(b: int, e: int, hidden: int, samples: int, noise: float, draws: str, seed: int,
                      device: torch.device, dtype: torch.dtype) -> _Corruption:
    if draws == "rome":
        # ROME's causal_trace.py: a fresh RandomState(1) per run, randn(S, e-b, hidden) scaled by the level.
        # The same draws for every run is exactly what our tiling over groups reproduces.
        prng = np.random.RandomState(1)
        vals = noise * torch.from_numpy(prng.randn(samples, e - b, hidden))
        vals = vals.to(device)  # stays float64: the add casts once, as ROME's in-place add does
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        vals = (noise * torch.randn(samples, e - b, hidden, generator=gen)).to(device=device, dtype=dtype)
    return _Corruption(b, e, vals, "add")


def _replacement_corruption(model: nn.Module, tok, arch: Arch, prompt: str, subject: str, occurrence: int,
                            b: int, e: int, ids: list[int], replacements: Sequence[str] | None,
                            samples: int, seed: int) -> _Corruption:
    """Swap the subject's token embeddings for those of other subjects of the same token length."""
    if not replacements:
        raise ValueError(f"noise_draws='replace' needs replacement subjects (e.g. the other facts' subjects) "
                         f"for subject {subject!r}")
    cs = subject_starts(prompt, subject)[occurrence]
    fits: list[list[int]] = []
    seen = set()
    for rep in replacements:
        if not rep or rep == subject or rep in seen:
            continue
        seen.add(rep)
        text = prompt[:cs] + rep + prompt[cs + len(subject):]
        rids, rng = char_range_tokens(tok, text, cs, cs + len(rep))
        # Same length and the same tokens around it: only the subject's embeddings change.
        if rng == (b, e) and len(rids) == len(ids) and rids[:b] == ids[:b] and rids[e:] == ids[e:]:
            fits.append(rids[b:e])
    if not fits:
        raise ValueError(
            f"no replacement subject has the same token length ({e - b} tokens) as subject {subject!r} "
            f"in prompt {prompt!r}; {len(seen)} candidates given"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(len(fits), generator=gen).tolist()[:samples]
    device = input_device(model)
    embed = get_module(model, arch.embed)
    with torch.no_grad():
        vals = embed(torch.tensor([fits[i] for i in order], device=device))
    return _Corruption(b, e, vals, "set")


# ---- restored runs -------------------------------------------------------------
#
# Every restored run shares work with the corrupted run: nothing below the bottom of its restoration
# window differs from it, and (causal attention) nothing before the restored token. So the corrupted
# run is made once, keeping each block's output; a group of restored sites then starts at the lowest
# window bottom among them, fed the corrupted state there (`started_at`), and optionally at the
# earliest restored token, with the positions before it read from a key/value cache.


@dataclass(frozen=True)
class _Costs:
    """Forward costs the chunking plan weighs, in row-positions through one block."""

    forward: float  # per forward, blocks aside (embedding, LM head on one position, mask building)
    block: float  # per block run, however small the batch (reading its weights, kernel launches)
    token: float  # per row-position through one block


# Fixed figures, not timings taken at run time: the plan decides which rows share a forward, which
# changes the last bits of the numbers, and a fact must give the same bytes in every run (resumes,
# torchrun shards against one process). On this project's CPU (1 thread; the fact models and a 24-layer
# d1024 GPT-2) a block run cost 22-140 row-positions and a forward's fixed part 8-35, timed by
# issue 13's run-time measurement; 32 stands for both. On an accelerator (not measured here) a block's
# kernel launches outweigh hundreds of rows, so chunks there are as large as `max_batch` allows.
CPU_COSTS = _Costs(forward=32.0, block=32.0, token=1.0)
ACCELERATOR_COSTS = _Costs(forward=4096.0, block=4096.0, token=1.0)
# Activation bytes of one forward that still stay in a CPU core's caches: on 1 thread, 24 layers d128,
# 30 tokens, 40-row chunks ran 1.6x faster than 256-row ones (4 MiB is 64 rows there). Larger models
# read more weight bytes per forward, which more rows share, so 64 rows is the least a chunk may hold.
CPU_CHUNK_BYTES = 4 << 20
CPU_MIN_ROWS = 64


def _costs(model: nn.Module) -> _Costs:
    """The `_Costs` the plan uses for `model`'s device."""
    return CPU_COSTS if input_device(model).type == "cpu" else ACCELERATOR_COSTS


def _prefix_cache(model: nn.Module, input_ids: torch.Tensor, corruption: _Corruption, stop: int, embed: str,
                  keep_last: bool):
    """Key/value cache of the corrupted prompt positions [0, stop) for the S sample rows, or None."""
    S = corruption.samples
    kw: dict[str, Any] = {"logits_to_keep": 1} if keep_last else {}
    with patched(model, {embed: corruption.edit(1, 0, stop)}, tokens=(S, stop)):
        out = model(input_ids=input_ids[:, :stop].expand(S, -1), use_cache=True, **kw)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return cache


def _repeated(cache, groups: int):
    """A fresh copy of `cache` with each row repeated `groups` times (sample-major), for one forward."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        # The forward replaces a layer's tensors (concatenation) instead of writing into them, so copying
        # the layer objects is enough; a deep copy of the tensors would cost more than the forward saves.
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in layers]
    else:
        cache = copy.deepcopy(cache)
    if groups > 1:
        cache.batch_repeat_interleave(groups)
    return cache


def _plan_cost(chunks: list[list[tuple[int, int, int]]], S: int, L: int, T: int, costs: _Costs,
               reuse_prefix: bool) -> float:
    """Modelled seconds of the forwards `chunks` need, prefix caches included."""
    total = 0.0
    starts = set()
    for chunk in chunks:
        blocks = L - min(lo for _, lo, _ in chunk)
        start = min(t for t, _, _ in chunk) if reuse_prefix else 0
        starts.add(start)
        total += costs.forward + blocks * (costs.block + costs.token * len(chunk) * S * (T - start))
    return total + sum(costs.forward + L * (costs.block + costs.token * S * t) for t in starts if t > 0)


def _chunks(sites: list[tuple[int, int, int]], S: int, L: int, T: int, costs: _Costs, max_rows: int,
            reuse_prefix: bool) -> list[list[tuple[int, int, int]]]:
    """Split (token, bottom block, index) sites, in order, into forwards of equal site count, the count
    chosen to minimise the modelled time (`_Costs`)."""
    plans = [[sites[i:i + k] for i in range(0, len(sites), k)] for k in range(1, max(1, max_rows // S) + 1)]
    return min(plans, key=lambda plan: _plan_cost(plan, S, L, T, costs, reuse_prefix))


def _max_rows(model: nn.Module, T: int) -> int:
    """Rows per forward: on CPU as many as keep one MLP's activations within `CPU_CHUNK_BYTES` (at least
    `CPU_MIN_ROWS`)."""
    device, dtype = input_device(model), model_dtype(model)
    if device.type != "cpu":
        return ACCELERATOR_MAX_BATCH
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 1024
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) \
        or getattr(cfg, "ffn_dim", None) or 4 * d
    per_row = T * int(inner) * torch.finfo(dtype).bits // 8
    return max(CPU_MIN_ROWS, min(ACCELERATOR_MAX_BATCH, CPU_CHUNK_BYTES // max(per_row, 1)))


def _restored_scores(model: nn.Module, input_ids: torch.Tensor, arch: Arch, kind: Kind, clean: dict[str, torch.Tensor],
                     corruption: _Corruption, sites: Sequence[tuple[int, int | None]], window: int, answer_id: int,
                     max_batch: int | None, keep_last: bool, reuse_prefix: bool | None = None) -> list[float]:
    """p_restored(answer) for each (token, layer) site (layer None: no restoration), several sites per forward.

    The first forward holds the corrupted baseline (which restores nothing) and starts at block 0; the
    states its baseline rows hand from block to block feed the forwards that start higher.
    """
    S = corruption.samples
    L = arch.n_layers
    T = input_ids.shape[1]
    device = input_ids.device
    blocks = [arch.layer_module_tmp.format(i) for i in range(L)]
    costs = _costs(model)
    max_rows = max(max_batch if max_batch is not None else _max_rows(model, T), S)

    restored = sorted((t, max(0, layer - window // 2), i) for i, (t, layer) in enumerate(sites) if layer is not None)
    # The baseline first, at the earliest token any site restores, so its states cover every later forward.
    first = min((t for t, _, _ in restored), default=0)
    plan = [(first, 0, -1)] + restored
    if reuse_prefix is None:
        # The cache saves the positions before the restored token but costs a forward per distinct start:
        # the cost model decides (on CPU it paid off for the 24-layer d1024 model's row and the fact models'
        # full tables, and about broke even for their rows).
        reuse_prefix = min((True, False), key=lambda r: _plan_cost(
            _chunks(plan, S, L, T, costs, max_rows, r), S, L, T, costs, r))
    out: list[float] = [0.0] * len(sites)
    states: dict[str, torch.Tensor] = {}
    arity: dict[str, int | None] = {}
    prefixes: dict[int, Any] = {}
    for n, chunk in enumerate(_chunks(plan, S, L, T, costs, max_rows, reuse_prefix)):
        g = len(chunk)
        bottom = min(lo for _, lo, _ in chunk)
        start = min(t for t, _, _ in chunk) if reuse_prefix else 0
        cache = None
        if start > 0:
            if start not in prefixes:
                prefixes[start] = _prefix_cache(model, input_ids, corruption, start, arch.embed, keep_last)
            cache = prefixes[start]
        if cache is None:
            start = 0
        else:
            cache = _repeated(cache, g)
        # For each restored module: which rows (sample-major, row s·g + j) get which token's clean value.
        rows_of: dict[int, list[int]] = {}
        toks_of: dict[int, list[int]] = {}
        for j, (token, _, i) in enumerate(chunk):
            for m in (window_layers(sites[i][1], window, L) if i >= 0 else ()):
                rows_of.setdefault(m, []).extend(s * g + j for s in range(S))
                toks_of.setdefault(m, []).extend([token] * S)
        edits = {arch.embed: corruption.edit(g, start, T)} if bottom == 0 else {}
        for m in sorted(rows_of):
            name = arch.module(kind, m)
            rows = torch.tensor(rows_of[m], device=device)
            toks = torch.tensor(toks_of[m], device=device)
            value = clean[name][0, toks.to(clean[name].device)]
            local = toks - start

            def restore(h: torch.Tensor, rows=rows, local=local, value=value) -> torch.Tensor:
                # Under a device map the module may sit on another device than the inputs.
                h = h.clone()
                h[rows.to(h.device), local.to(h.device)] = value.to(h.device, h.dtype)
                return h

            edits[name] = restore
        if n == 0:
            # Group 0 is the baseline: rows 0, g, 2g, ... of every block's output are the corrupted states.
            with patched(model, edits, tokens=(g * S, T - start)), \
                    captured(model, blocks, tokens=(g * S, T - start), arity=arity, rows=slice(0, None, g)) as kept:
                probs = _last_probs(model, input_ids[:, start:].expand(g * S, -1), keep_last, cache)[:, answer_id]
            states = kept
            base = start
        else:
            state = states[blocks[bottom - 1]][:, start - base:].repeat_interleave(g, dim=0) if bottom > 0 else None
            with patched(model, edits, tokens=(g * S, T - start)), \
                    started_at(model, blocks, bottom, state, arity.get(blocks[0])):
                probs = _last_probs(model, input_ids[:, start:].expand(g * S, -1), keep_last, cache)[:, answer_id]
        for j, p in enumerate(probs.view(S, g).mean(dim=0).tolist()):
            i = chunk[j][2]
            if i < 0:
                out = [p if site[1] is None else x for site, x in zip(sites, out)]
            else:
                out[i] = p
    return out


@dataclass
class _Setup:
    """What every method of tracing one fact starts from: the prompt, its clean run and its corruption."""

    fact: Fact
    ids: list[int]
    input_ids: torch.Tensor
    b: int
    e: int
    used: int  # the subject occurrence found
    keep_last: bool
    names: list[str]  # the traced modules, one per layer
    clean: dict[str, torch.Tensor]  # their clean outputs, (1, T, d)
    p_clean: torch.Tensor
    top1_id: int
    answer_id: int
    known: bool | None
    target_logprob: float | None
    corruption: _Corruption
    level: float


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Within the block the model is in eval mode; a model that was training is put back."""
    was_training = model.training
    if was_training or any(m.training for m in model.modules()):
        model.eval()  # walking every module costs more than a small model's forward: only when needed
    try:
        yield
    finally:
        if was_training:
            model.train()


def _set_up(model: nn.Module, tok, fact: Fact, settings: TraceSettings, arch: Arch, noise_level: float | None,
            replacements: Sequence[str] | None, occurrence: int) -> _Setup:
    """The clean run (module outputs captured), the answer and the corruption; call under no_grad and eval."""
    if fact.prompt != fact.prompt.rstrip():
        warnings.warn(f"prompt {fact.prompt!r} ends with whitespace: byte-level BPE models see it as its own "
                      f"token, which wrecks the next-token prediction", stacklevel=3)
    device, dtype = input_device(model), model_dtype(model)
    (b, e), used, ids = find_subject_range(tok, fact.prompt, fact.subject, occurrence)
    _check_context(model, fact, len(ids), "prompt")
    input_ids = torch.tensor([ids], device=device)
    keep_last = _keeps_last_logits(model)
    names = [arch.module(settings.kind, layer) for layer in range(arch.n_layers)]
    with captured(model, names, tokens=tuple(input_ids.shape)) as clean:
        p_clean = _last_probs(model, input_ids, keep_last)[0]
    top1_id = int(p_clean.argmax())
    target_logprob = known = target_first = None
    if fact.target:
        t_full, t_pos = continuation(tok, fact.prompt, fact.target)
        _check_context(model, fact, len(t_full), "prompt + target")
        target_first = t_full[t_pos[0]]
        known = top1_id == target_first
        target_logprob = _sequence_logprob(model, t_full, t_pos)
    if settings.answer == "target":
        if target_first is None:
            raise ValueError(f"answer='target' but fact {fact.id!r} ({fact.prompt!r}) has no target")
        answer_id = target_first
    else:
        answer_id = top1_id

    if settings.noise_draws == "replace":
        corruption = _replacement_corruption(model, tok, arch, fact.prompt, fact.subject, used, b, e, ids,
                                             replacements, settings.samples, settings.seed)
        level = 0.0
    else:
        level = noise_level if noise_level is not None else settings.fixed_noise
        if level is None:
            level = _sigma_level(model, tok, [fact.subject], arch, settings.noise_factor)
        level = float(level)
        hidden = get_module(model, arch.embed)(input_ids[:, :1]).shape[-1]
        corruption = _noise_corruption(b, e, hidden, settings.samples, level, settings.noise_draws, settings.seed,
                                       device, dtype)
    return _Setup(fact=fact, ids=ids, input_ids=input_ids, b=b, e=e, used=used, keep_last=keep_last, names=names,
                  clean=clean, p_clean=p_clean, top1_id=top1_id, answer_id=answer_id, known=known,
                  target_logprob=target_logprob, corruption=corruption, level=level)


def _result(tok, setup: _Setup, settings: TraceSettings, window: int, p_corrupt: float, scores: Sequence[float],
            table: Sequence[Sequence[float]] | None) -> TraceResult:
    """The TraceResult of a traced fact; non-finite numbers are a ValueError naming the prompt."""
    u = setup
    high = float(u.p_clean[u.answer_id])
    scores = tuple(scores)
    table = tuple(tuple(row) for row in table) if table is not None else None
    bad = non_finite({"p_clean": high, "p_corrupt": p_corrupt, "scores": scores,
                      "table": table, "target_logprob": u.target_logprob, "noise": u.level})
    if bad:
        raise ValueError(f"the model gives non-finite numbers (NaN or inf) for prompt {u.fact.prompt!r}: "
                         f"{', '.join(bad[:5])}; check its weights and --dtype")
    return TraceResult(
        fact_id=str(u.fact.id), prompt=u.fact.prompt, subject=u.fact.subject, kind=settings.kind,
        tokens=tuple(tok.decode([t]) for t in u.ids), subject_range=(u.b, u.e), subject_occurrence=u.used,
        answer=tok.decode([u.answer_id]), answer_id=u.answer_id, answer_source=settings.answer,
        top1=tok.decode([u.top1_id]), target=u.fact.target, known=u.known,
        high_score=high, low_score=p_corrupt, scores=scores, table=table,
        noise=u.level, samples=u.corruption.samples, window=window, noise_draws=settings.noise_draws,
        target_logprob=u.target_logprob, settings=settings,
    )


def trace_fact(model: nn.Module, tok, fact: Fact, settings: TraceSettings = TraceSettings(), *,
               arch: Arch | None = None, noise_level: float | None = None,
               replacements: Sequence[str] | None = None, occurrence: int = 0,
               max_batch: int | None = None, reuse_prefix: bool | None = None) -> TraceResult:
    """Trace one fact: p_clean, p_corrupt and p_restored at the last subject token (or every token if `settings.full`).

    `noise_level` is the level to add (`locate` computes the dataset's once);
    None uses `settings.noise`: its fixed level, or K × the std of this fact's
    subject embeddings for "Ksigma". `settings.noise_draws`: "torch" (seeded
    Gaussian), "rome" (ROME's numpy RandomState(1) draws, comparable number for
    number with its code) or "replace" (subject token replacement from
    `replacements`; the samples become the number of replacements used).
    The fast path (`full=False`) computes only the last-subject-token row;
    `full=True` computes the whole tokens × layers table, T times the work.
    `max_batch` bounds the rows of one forward (default: on CPU as many as keep
    one MLP's activations in cache, at least 64; 1024 on an accelerator);
    `reuse_prefix` computes the positions before the restored token once, from
    a key/value cache (default on; models without one fall back to whole-prompt
    runs). Restored runs start at the bottom of their window, fed the corrupted
    run's states, so they skip the blocks below it. Attribution patching
    (`settings.method="atp"`) is `atp.attribution_trace`; `atp.trace_by_method`
    picks by the settings.
    """
    if not isinstance(settings, TraceSettings):
        raise TypeError(f"settings must be a TraceSettings, got {type(settings).__name__}")
    if settings.method != "exact":
        # atp builds on this module's restored runs, so it lives above it: rome_locate.atp.trace_by_method.
        raise ValueError(f"trace_fact makes exact restored runs; method={settings.method!r} is traced by "
                         f"rome_locate.atp (trace_by_method or attribution_trace)")
    arch = arch if arch is not None and arch.n_layers else arch_for(model, arch)
    L = arch.n_layers
    with _evaluating(model), torch.no_grad():
        u = _set_up(model, tok, fact, settings, arch, noise_level, replacements, occurrence)
        w = effective_window(settings.window, L, settings.kind)
        rows = range(len(u.ids)) if settings.full else [u.e - 1]
        # The corrupted baseline is the site that restores nothing; it rides in the first forward.
        sites: list[tuple[int, int | None]] = [(u.e - 1, None)]
        sites += [(t, layer) for t in rows for layer in range(L)]
        p_corrupt, *flat = _restored_scores(model, u.input_ids, arch, settings.kind, u.clean, u.corruption, sites, w,
                                            u.answer_id, max_batch, u.keep_last, reuse_prefix)
    grid = [tuple(flat[i * L:(i + 1) * L]) for i in range(len(rows))]
    table = grid if settings.full else None
    return _result(tok, u, settings, w, p_corrupt, grid[u.e - 1] if settings.full else grid[0], table)


def _check_context(model: nn.Module, fact: Fact, n_tokens: int, what: str) -> None:
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        shown = fact.prompt if len(fact.prompt) <= 60 else fact.prompt[:57] + "..."
        raise ValueError(f"{what} {shown!r} is {n_tokens} tokens, longer than the model's context of {limit} "
                         f"positions; shorten it or leave the fact out (--skip-errors skips it)")


def _sequence_logprob(model: nn.Module, ids: list[int], positions: list[int]) -> float:
    """log p(the tokens at `positions` | what precedes them) under the clean model, in float32."""
    device = input_device(model)
    logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.tensor(positions, device=logp.device)
    return float(logp[pos - 1, torch.tensor([ids[p] for p in positions], device=logp.device)].sum())
