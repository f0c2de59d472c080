"""Causal tracing: clean, corrupted and restored runs of facts, as in ROME (Meng et al. 2022, sec. 2.1).

This module holds the settings and results, and what happens to a fact before
any run: its tokens, subject range, answer source and corruption (Gaussian noise
on the subject's embeddings, or another subject's). The runs themselves are
`runs.py`'s: every group of `S` rows (the noise samples) restores one (token,
layer) site and receives the very same corruption as the corrupted baseline, so
the comparison is paired; facts of one prompt length share forwards.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from .arch import KINDS, Arch, Kind, arch_for
from .facts import Fact
from .hooks import get_module
from .models import ModelFingerprint, context_length, input_device, model_dtype
from .records import Record, non_finite
from .costs import batch_size, max_rows
from .runs import Caller, Corruption, FirstRun, Prompt, effective_window, first_run, restored_scores
from .tokens import char_range_tokens, continuation, find_subject_range, subject_starts

NoiseDraws = Literal["torch", "rome", "replace"]
AnswerSource = Literal["top1", "target"]
Method = Literal["exact", "atp"]
NOISE_DRAWS: tuple[str, ...] = ("torch", "rome", "replace")
ANSWERS: tuple[str, ...] = ("top1", "target")
METHODS: tuple[str, ...] = ("exact", "atp")


_SIGMA = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*sigma\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TraceSettings(Record):
    """How facts are traced: built once (from CLI flags or code), passed to tracing, stored with every result.

    `noise` is a fixed level (a number) or "Ksigma": K times the standard deviation
    of the subjects' token embeddings, computed once per model and dataset.
    `full` traces every token (the heatmap's table), not only the last subject
    token's row, about T times the work.
    `method` "exact" makes the restored runs; "atp" estimates the whole table by
    attribution patching (atp.py: one forward and backward per batch of facts), and then
    `verify_top` K re-checks with exact runs the K largest estimated effects at
    the last subject token, the row the layer choice reads.
    Both change the numbers, so they are recorded and checked on resume like the rest.
    `chat_template` reads every prompt as a user turn of the tokenizer's chat template (`prompts.model_input`):
    the tokens, the subject range and the answer are the templated prompt's.
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
    chat_template: bool = False

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
        if not isinstance(self.chat_template, bool):
            raise ValueError(f"chat_template must be true or false, got {self.chat_template!r}")
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


# ---- noise --------------------------------------------------------------------


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
    arch = arch_for(model, arch)
    subjects = [f if isinstance(f, str) else f.subject for f in facts]
    return _sigma_level(model, tok, subjects, arch, factor)


def _sigma_level(model: nn.Module, tok, subjects: Iterable[str], arch: Arch, factor: float) -> float:
    return float(factor * _subject_embedding_values(model, tok, subjects, arch).std().item())


def _noise_corruption(b: int, e: int, hidden: int, samples: int, noise: float, draws: str, seed: int,
                      device: torch.device, dtype: torch.dtype) -> Corruption:
    if draws == "rome":
        # ROME's causal_trace.py: a fresh RandomState(1) per run, randn(S, e-b, hidden) scaled by the level.
        # The same draws for every run is exactly what repeating them for every restored site reproduces.
        prng = np.random.RandomState(1)
        vals = noise * torch.from_numpy(prng.randn(samples, e - b, hidden))
        vals = vals.to(device)  # stays float64: the add casts once, as ROME's in-place add does
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        vals = (noise * torch.randn(samples, e - b, hidden, generator=gen)).to(device=device, dtype=dtype)
    return Corruption(b, e, vals, "add")


def _replacement_corruption(model: nn.Module, tok, arch: Arch, prompt: str, subject: str, occurrence: int,
                            b: int, e: int, ids: list[int], replacements: Sequence[str] | None,
                            samples: int, seed: int, chat_template: bool) -> Corruption:
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
        rids, rng = char_range_tokens(tok, text, cs, cs + len(rep), chat_template)
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
    return Corruption(b, e, vals, "set")


# ---- one fact, before any run --------------------------------------------------------


@dataclass
class _Prepared:
    """A fact's tokens, subject range, answer source and corruption: everything but the model's runs."""

    fact: Fact
    ids: list[int]
    b: int
    e: int
    used: int  # the subject occurrence found
    prompt: Prompt
    target_first: int | None  # the target's first token
    level: float
    target_logprob: float | None = None  # computed apart when the target's tokens do not extend the prompt's


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


def _prepare(model: nn.Module, tok, fact: Fact, settings: TraceSettings, arch: Arch, noise_level: float | None,
             replacements: Sequence[str] | None, occurrence: int, hidden: int) -> _Prepared:
    """Tokens, subject range, target and corruption of one fact; a ValueError names what is wrong with it."""
    if fact.prompt != fact.prompt.rstrip():
        warnings.warn(f"prompt {fact.prompt!r} ends with whitespace: byte-level BPE models see it as its own "
                      f"token, which wrecks the next-token prediction", stacklevel=4)
    device, dtype = input_device(model), model_dtype(model)
    chat = settings.chat_template
    (b, e), used, ids = find_subject_range(tok, fact.prompt, fact.subject, occurrence, chat_template=chat)
    _check_context(model, fact, len(ids), "prompt")
    clean_ids, target_positions, target_first, apart = ids, [], None, None
    if fact.target:
        t_full, t_pos = continuation(tok, fact.prompt, fact.target, chat)
        _check_context(model, fact, len(t_full), "prompt + target")
        target_first = t_full[t_pos[0]]
        if t_full[:len(ids)] == ids and t_pos[0] >= len(ids):
            clean_ids, target_positions = t_full, t_pos  # the clean row reads the target too
        else:
            apart = (t_full, t_pos)
    if settings.answer == "target" and target_first is None:
        raise ValueError(f"answer='target' but fact {fact.id!r} ({fact.prompt!r}) has no target")
    if settings.noise_draws == "replace":
        corruption = _replacement_corruption(model, tok, arch, fact.prompt, fact.subject, used, b, e, ids,
                                             replacements, settings.samples, settings.seed, chat)
        level = 0.0
    else:
        level = noise_level if noise_level is not None else settings.fixed_noise
        if level is None:
            level = _sigma_level(model, tok, [fact.subject], arch, settings.noise_factor)
        level = float(level)
        corruption = _noise_corruption(b, e, hidden, settings.samples, level, settings.noise_draws, settings.seed,
                                       device, dtype)
    answer = target_first if settings.answer == "target" else None
    prep = _Prepared(fact=fact, ids=ids, b=b, e=e, used=used,
                     prompt=Prompt(ids, clean_ids, target_positions, corruption, answer),
                     target_first=target_first, level=level)
    if apart is not None:
        prep.target_logprob = _sequence_logprob(model, *apart)
    return prep


def _result(tok, u: _Prepared, run: FirstRun, i: int, settings: TraceSettings, window: int,
            scores: Sequence[float], table: Sequence[Sequence[float]] | None) -> TraceResult:
    """The TraceResult of prompt `i` of `run`; non-finite numbers are a ValueError naming the prompt."""
    high, p_corrupt, answer_id, top1_id = run.p_clean[i], run.p_corrupt[i], run.answers[i], run.top1[i]
    target_logprob = run.target_logprob[i] if u.prompt.target_positions else u.target_logprob
    scores = tuple(scores)
    table = tuple(tuple(row) for row in table) if table is not None else None
    bad = non_finite({"p_clean": high, "p_corrupt": p_corrupt, "scores": scores,
                      "table": table, "target_logprob": target_logprob, "noise": u.level})
    if bad:
        raise ValueError(f"the model gives non-finite numbers (NaN or inf) for prompt {u.fact.prompt!r}: "
                         f"{', '.join(bad[:5])}; check its weights and --dtype")
    return TraceResult(
        fact_id=str(u.fact.id), prompt=u.fact.prompt, subject=u.fact.subject, kind=settings.kind,
        tokens=tuple(tok.decode([t]) for t in u.ids), subject_range=(u.b, u.e), subject_occurrence=u.used,
        answer=tok.decode([answer_id]), answer_id=answer_id, answer_source=settings.answer,
        top1=tok.decode([top1_id]), target=u.fact.target,
        known=None if u.target_first is None else top1_id == u.target_first,
        high_score=high, low_score=p_corrupt, scores=scores, table=table,
        noise=u.level, samples=u.prompt.corruption.samples, window=window, noise_draws=settings.noise_draws,
        target_logprob=target_logprob, settings=settings,
    )


# ---- batches of facts -----------------------------------------------------------------


def prepare_batches(model: nn.Module, tok, facts: Sequence[Fact], settings: TraceSettings, arch: Arch,
                    noise_level: float | None, replacements: Sequence[str] | None, occurrence: int,
                    batch_facts: int | None, gradients: bool = False
                    ) -> tuple[list[ValueError | None], list[list[tuple[int, _Prepared]]]]:
    """Prepare every fact (its ValueError where it cannot be traced) and group the others into batches of one
    prompt length, at most `batch_facts` each (default: `costs.batch_size`), in the facts' order."""
    if batch_facts is not None and (isinstance(batch_facts, bool) or not isinstance(batch_facts, int)
                                    or batch_facts < 1):
        raise ValueError(f"batch_facts must be an integer >= 1, got {batch_facts!r}")
    hidden = get_module(model, arch.embed)(torch.zeros((1, 1), dtype=torch.long, device=input_device(model))).shape[-1]
    errors: list[ValueError | None] = [None] * len(facts)
    by_length: dict[int, list[tuple[int, _Prepared]]] = {}
    for i, fact in enumerate(facts):
        try:
            prep = _prepare(model, tok, fact, settings, arch, noise_level, replacements, occurrence, hidden)
        except ValueError as exc:
            errors[i] = exc
            continue
        by_length.setdefault(len(prep.ids), []).append((i, prep))
    batches = []
    for T, members in by_length.items():
        n = batch_facts or batch_size(model, arch.n_layers, settings.samples, T, max_rows(model, T), gradients)
        batches += [members[k:k + n] for k in range(0, len(members), n)]
    batches.sort(key=lambda batch: batch[0][0])
    return errors, batches


def trace_each(model: nn.Module, tok, facts: Sequence[Fact], settings: TraceSettings = TraceSettings(), *,
               arch: Arch | None = None, noise_level: float | None = None,
               replacements: Sequence[str] | None = None, occurrence: int = 0, max_batch: int | None = None,
               reuse_prefix: bool | None = None, batch_facts: int | None = None) -> list[TraceResult | ValueError]:
    """Trace every fact, several facts per forward: one outcome per fact, its TraceResult or the ValueError that
    says why it cannot be traced (subject not in the prompt, prompt too long, non-finite numbers).

    Facts of one prompt length share forwards (`batch_facts` at most; default as many as fill a forward);
    arguments mean what they mean for `trace_fact`.
    """
    if not isinstance(settings, TraceSettings):
        raise TypeError(f"settings must be a TraceSettings, got {type(settings).__name__}")
    if settings.method != "exact":
        # atp builds on this module's runs, so it lives above it: rome_locate.atp.trace_by_method.
        raise ValueError(f"trace_fact makes exact restored runs; method={settings.method!r} is traced by "
                         f"rome_locate.atp (trace_by_method or attribution_trace)")
    arch = arch_for(model, arch)
    L = arch.n_layers
    w = effective_window(settings.window, L, settings.kind)
    outcomes: list[TraceResult | ValueError | None] = [None] * len(facts)
    caller = Caller.of(model)
    with _evaluating(model), torch.no_grad():
        errors, batches = prepare_batches(model, tok, facts, settings, arch, noise_level, replacements, occurrence,
                                          batch_facts)
        for i, err in enumerate(errors):
            if err is not None:
                outcomes[i] = err
        for batch in batches:
            preps = [u for _, u in batch]
            run = first_run(model, arch, settings.kind, [u.prompt for u in preps], caller)
            rows = [range(len(u.ids)) if settings.full else [u.e - 1] for u in preps]
            # A site before the subject restores what the corruption never changed (causal attention):
            # its p_restored is p_corrupt, so no run is made for it.
            sites = [(j, t, layer) for j, u in enumerate(preps) for t in rows[j] if t >= u.b for layer in range(L)]
            got = iter(restored_scores(model, arch, settings.kind, run, sites, w, caller, max_batch, reuse_prefix))
            for j, (i, u) in enumerate(batch):
                grid = [[next(got) if t >= u.b else run.p_corrupt[j] for _ in range(L)] for t in rows[j]]
                try:
                    outcomes[i] = _result(tok, u, run, j, settings, w, grid[u.e - 1] if settings.full else grid[0],
                                          grid if settings.full else None)
                except ValueError as exc:
                    outcomes[i] = exc
    return outcomes  # type: ignore[return-value]


def trace_facts(model: nn.Module, tok, facts: Sequence[Fact], settings: TraceSettings = TraceSettings(),
                **kwargs) -> list[TraceResult]:
    """Trace every fact, several per forward (see `trace_each`); the first fact that cannot be traced raises its
    ValueError."""
    outcomes = trace_each(model, tok, facts, settings, **kwargs)
    for out in outcomes:
        if isinstance(out, ValueError):
            raise out
    return list(outcomes)  # type: ignore[arg-type]


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
    `reuse_prefix` False runs every position of the prompt in every restored
    run instead of reading the positions before the restored token from the
    corrupted run's key/value cache (models without a sliceable cache always
    do). Restored runs start at the bottom of their window, fed the corrupted
    run's states, so they skip the blocks below it. `trace_facts` traces many
    facts, several per forward. Attribution patching (`settings.method="atp"`)
    is `atp.attribution_trace`; `atp.trace_by_method` picks by the settings.
    """
    [out] = trace_each(model, tok, [fact], settings, arch=arch, noise_level=noise_level, replacements=replacements,
                       occurrence=occurrence, max_batch=max_batch, reuse_prefix=reuse_prefix)
    if isinstance(out, ValueError):
        raise out
    return out


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
