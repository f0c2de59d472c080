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

import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from .arch import KINDS, Arch, Kind, arch_for
from .facts import Fact
from .hooks import captured, get_module, patched
from .models import ModelFingerprint, context_length, input_device, model_dtype
from .records import Record, non_finite
from .tokens import char_range_tokens, continuation, find_subject_range, subject_starts

NoiseDraws = Literal["torch", "rome", "replace"]
AnswerSource = Literal["top1", "target"]
NOISE_DRAWS: tuple[str, ...] = ("torch", "rome", "replace")
ANSWERS: tuple[str, ...] = ("top1", "target")
# Rows per forward. On CPU, activations of more rows fall out of cache and each row gets slower
# (measured on 1 thread: 24 layers, 30 tokens, 250 rows: 40-row chunks 1.6x faster than 256-row ones).
CPU_MAX_BATCH = 64
ACCELERATOR_MAX_BATCH = 1024


_SIGMA = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*sigma\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TraceSettings(Record):
    """How facts are traced: built once (from CLI flags or code), passed to tracing, stored with every result.

    `noise` is a fixed level (a number) or "Ksigma": K times the standard deviation
    of the subjects' token embeddings, computed once per model and dataset.
    `full` traces every token (the heatmap's table), not only the last subject
    token's row, about T times the work.
    """

    kind: Kind = "mlp"
    samples: int = 10
    window: int = 10
    noise: float | str = "3sigma"
    noise_draws: NoiseDraws = "torch"
    answer: AnswerSource = "top1"
    seed: int = 0
    full: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.noise_draws not in NOISE_DRAWS:
            raise ValueError(f"noise_draws must be one of {NOISE_DRAWS}, got {self.noise_draws!r}")
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {self.answer!r}")
        for name in ("samples", "window", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
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


def _prefix_cache(model: nn.Module, input_ids: torch.Tensor, corruption: _Corruption, stop: int, groups: int,
                  embed: str):
    """Key/value cache of the corrupted prompt positions [0, stop), repeated for `groups` groups, or None.

    Attention is causal, so restoring a token changes nothing before it: those
    positions are computed once per chunk instead of once per row.
    """
    S = corruption.samples
    with patched(model, {embed: corruption.edit(1, 0, stop)}, tokens=(S, stop)):
        out = model(input_ids=input_ids[:, :stop].expand(S, -1), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    if groups > 1:
        cache.batch_repeat_interleave(groups)
    return cache


def _restored_scores(model: nn.Module, input_ids: torch.Tensor, arch: Arch, kind: Kind, clean: dict[str, torch.Tensor],
                     corruption: _Corruption, sites: Sequence[tuple[int, int | None]], window: int, answer_id: int,
                     max_batch: int, keep_last: bool, reuse_prefix: bool = True) -> list[float]:
    """p_restored(answer) for each (token, layer) site (layer None: no restoration), several sites per forward."""
    S = corruption.samples
    L = arch.n_layers
    T = input_ids.shape[1]
    per_chunk = max(1, max_batch // S)
    device = input_ids.device
    out: list[float] = []
    for begin in range(0, len(sites), per_chunk):
        chunk = sites[begin:begin + per_chunk]
        g = len(chunk)
        start = min(t for t, _ in chunk) if reuse_prefix else 0
        cache = _prefix_cache(model, input_ids, corruption, start, g, arch.embed) if start > 0 else None
        if cache is None:
            start = 0
        # For each restored module: which rows (sample-major, row s·g + j) get which token's clean value.
        rows_of: dict[int, list[int]] = {}
        toks_of: dict[int, list[int]] = {}
        for j, (token, layer) in enumerate(chunk):
            for m in (window_layers(layer, window, L) if layer is not None else ()):
                rows_of.setdefault(m, []).extend(s * g + j for s in range(S))
                toks_of.setdefault(m, []).extend([token] * S)
        edits = {arch.embed: corruption.edit(g, start, T)}
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
        with patched(model, edits, tokens=(g * S, T - start)):
            probs = _last_probs(model, input_ids[:, start:].expand(g * S, -1), keep_last, cache)[:, answer_id]
        out.extend(probs.view(S, g).mean(dim=0).tolist())
    return out


def trace_fact(model: nn.Module, tok, fact: Fact, settings: TraceSettings = TraceSettings(), *,
               arch: Arch | None = None, noise_level: float | None = None,
               replacements: Sequence[str] | None = None, occurrence: int = 0,
               max_batch: int | None = None, reuse_prefix: bool = True) -> TraceResult:
    """Trace one fact: p_clean, p_corrupt and p_restored at the last subject token (or every token if `settings.full`).

    `noise_level` is the level to add (`locate` computes the dataset's once);
    None uses `settings.noise`: its fixed level, or K × the std of this fact's
    subject embeddings for "Ksigma". `settings.noise_draws`: "torch" (seeded
    Gaussian), "rome" (ROME's numpy RandomState(1) draws, comparable number for
    number with its code) or "replace" (subject token replacement from
    `replacements`; the samples become the number of replacements used).
    The fast path (`full=False`) computes only the last-subject-token row;
    `full=True` computes the whole tokens × layers table, T times the work.
    `max_batch` bounds the rows of one forward (default 64 on CPU, 1024 on an
    accelerator); `reuse_prefix` computes the
    positions before the restored token once per forward, from a key/value
    cache (models without one fall back to whole-prompt runs).
    """
    if not isinstance(settings, TraceSettings):
        raise TypeError(f"settings must be a TraceSettings, got {type(settings).__name__}")
    kind, samples, window, seed = settings.kind, settings.samples, settings.window, settings.seed
    noise_draws, answer, full = settings.noise_draws, settings.answer, settings.full
    if fact.prompt != fact.prompt.rstrip():
        warnings.warn(f"prompt {fact.prompt!r} ends with whitespace: byte-level BPE models see it as its own "
                      f"token, which wrecks the next-token prediction", stacklevel=2)
    arch = arch if arch is not None and arch.n_layers else arch_for(model, arch)
    L = arch.n_layers
    device, dtype = input_device(model), model_dtype(model)
    if max_batch is None:
        max_batch = CPU_MAX_BATCH if device.type == "cpu" else ACCELERATOR_MAX_BATCH
    (b, e), used, ids = find_subject_range(tok, fact.prompt, fact.subject, occurrence)
    _check_context(model, fact, len(ids), "prompt")
    input_ids = torch.tensor([ids], device=device)
    keep_last = _keeps_last_logits(model)
    names = [arch.module(kind, layer) for layer in range(L)]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with captured(model, names, tokens=tuple(input_ids.shape)) as clean:
                p_clean = _last_probs(model, input_ids, keep_last)[0]
            top1_id = int(p_clean.argmax())
            target_logprob = None
            known = None
            target_first = None
            if fact.target:
                t_full, t_pos = continuation(tok, fact.prompt, fact.target)
                _check_context(model, fact, len(t_full), "prompt + target")
                target_first = t_full[t_pos[0]]
                known = top1_id == target_first
                target_logprob = _sequence_logprob(model, t_full, t_pos)
            if answer == "target":
                if target_first is None:
                    raise ValueError(f"answer='target' but fact {fact.id!r} ({fact.prompt!r}) has no target")
                answer_id = target_first
            else:
                answer_id = top1_id

            if noise_draws == "replace":
                corruption = _replacement_corruption(model, tok, arch, fact.prompt, fact.subject, used, b, e, ids,
                                                     replacements, samples, seed)
                level = 0.0
            else:
                level = noise_level if noise_level is not None else settings.fixed_noise
                if level is None:
                    level = _sigma_level(model, tok, [fact.subject], arch, settings.noise_factor)
                level = float(level)
                hidden = get_module(model, arch.embed)(input_ids[:, :1]).shape[-1]
                corruption = _noise_corruption(b, e, hidden, samples, level, noise_draws, seed, device, dtype)
            S = corruption.samples

            w = effective_window(window, L, kind)
            T = len(ids)
            rows = range(T) if full else [e - 1]
            # The corrupted baseline is the site that restores nothing; it rides in the first forward.
            sites: list[tuple[int, int | None]] = [(e - 1, None)]
            sites += [(t, layer) for t in rows for layer in range(L)]
            p_corrupt, *flat = _restored_scores(model, input_ids, arch, kind, clean, corruption, sites, w,
                                                answer_id, max_batch, keep_last, reuse_prefix)
    finally:
        model.train(was_training)

    grid = [tuple(flat[i * L:(i + 1) * L]) for i in range(len(rows))]
    table = tuple(grid) if full else None
    scores = grid[e - 1] if full else grid[0]
    bad = non_finite({"p_clean": float(p_clean[answer_id]), "p_corrupt": p_corrupt, "scores": scores,
                      "table": table, "target_logprob": target_logprob, "noise": level})
    if bad:
        raise ValueError(f"the model gives non-finite numbers (NaN or inf) for prompt {fact.prompt!r}: "
                         f"{', '.join(bad[:5])}; check its weights and --dtype")
    return TraceResult(
        fact_id=str(fact.id), prompt=fact.prompt, subject=fact.subject, kind=kind,
        tokens=tuple(tok.decode([t]) for t in ids), subject_range=(b, e), subject_occurrence=used,
        answer=tok.decode([answer_id]), answer_id=answer_id, answer_source=answer,
        top1=tok.decode([top1_id]), target=fact.target, known=known,
        high_score=float(p_clean[answer_id]), low_score=p_corrupt, scores=tuple(scores), table=table,
        noise=level, samples=S, window=w, noise_draws=noise_draws, target_logprob=target_logprob,
        settings=settings,
    )


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
