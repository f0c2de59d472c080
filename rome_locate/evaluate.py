"""Evaluation of edits: generations before/after, CounterFact and EasyEdit metrics, and the layer sweep.

Probabilities of a target string are whole-sequence: the prompt and `" " + target`
are tokenized together and the log-probabilities of the target tokens summed.
Comparisons (`P(new) > P(true)`) use the mean per-token negative log-likelihood,
as ROME's CounterFact evaluation does, so that targets of different token
lengths compare fairly; probabilities reported as magnitudes are the matching
per-token geometric means `exp(-mean NLL)` (ROME's `exp(-nll)`).

Metric names (in `EvalRecord.metrics`; a `_pre` suffix is the same measure on
the unedited model):
- ROME/CounterFact: `efficacy_score`, `efficacy_magnitude` (P(new) - P(true)),
  `paraphrase_score`, `paraphrase_magnitude`, `neighborhood_score`
  (P(true) > P(new) on neighbourhood prompts), `neighborhood_magnitude`,
  `ngram_entropy` (fluency of the generations), `rewrite_score`
  ((P_after(new) - P_before(new)) / (1 - P_before(new)), Hase et al.'s
  continuous edit success) and `score` (ROME's harmonic mean of the three
  success rates).
- EasyEdit: `rewrite_acc`, `rephrase_acc` (teacher-forced token accuracy of
  target_new), `locality` (share of teacher-forced top-1 tokens unchanged on
  locality prompts).
- `neighborhood_kl`: mean KL(before || after) of the next-token distribution
  on the neighbourhood prompts.
- `success`: 1.0 when the first token of target_new is the top-1 next token
  after the edit prompt (what `rome-locate edit` counts as a successful edit).

Facts and their layers are matched by position (`place`); ids only cross-check.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import ExitStack, nullcontext
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from .arch import check_layer
from .facts import Fact
from .hparams import with_layer
from .intervals import Interval, bootstrap, overlap, rate
from .models import input_device
from .records import Record
from .scoring import PairScore, score_targets, token_accuracy, top1_agreement
from .tokens import pad_id

GenerationMode = Literal["greedy", "beam", "sample"]
LayerSource = Literal["traced", "fixed", "given", "validated"]
LAYER_MODES = ("fixed", "traced", "validated")

# ROME's fluency measure: weights of the 2- and 3-gram entropies.
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


# ---- records -----------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings(Record):
    """How generations are decoded: greedy (default), beam search or seeded sampling."""

    mode: GenerationMode = "greedy"
    max_new_tokens: int = 12
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("greedy", "beam", "sample"):
            raise ValueError(f"generation mode must be greedy, beam or sample, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mode == "beam" and self.num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {self.num_beams}")
        if self.mode == "sample" and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")


@dataclass(frozen=True)
class Generation(Record):
    """What the model says on one prompt before and after the edit."""

    prompt: str
    group: str  # "edit", "paraphrase" or "neighborhood"
    before: str
    after: str


@dataclass(frozen=True)
class LayerScore(Record):
    """Edit success when the fact is edited at one layer (one step of the sweep)."""

    layer: int
    effect: float | None  # traced indirect effect at this layer (p_restored - p_corrupt), if traced
    efficacy_score: float | None
    efficacy_magnitude: float | None
    paraphrase_score: float | None
    paraphrase_magnitude: float | None
    neighborhood_score: float | None
    neighborhood_magnitude: float | None
    rewrite_score: float | None
    score: float | None


@dataclass(frozen=True)
class EvalRecord(Record):
    """Everything measured for one fact edited at one layer: THE outcome record of `edit`, `eval` and the demo.

    `generations` is empty when generations are switched off (`rome-locate edit`),
    `sweep` when the layer sweep is. `metrics["success"]` is 1.0 when the first
    token of target_new is the top-1 next token after the edit prompt.
    """

    fact_id: str
    prompt: str
    subject: str
    target_true: str | None
    target_new: str
    layer: int  # the layer the main edit was made at
    layer_source: LayerSource
    editor: str
    generations: tuple[Generation, ...]
    metrics: dict[str, float | None]
    sweep: tuple[LayerScore, ...] = ()
    traced_layer: int | None = None
    fixed_layer: int | None = None
    margin: float | None = None  # traced effect of the chosen layer minus the runner-up's
    effects: tuple[float, ...] | None = None  # traced indirect effect per layer
    seconds: float = 0.0
    # The editor's own report of the edit: EasyEdit's returned pre/post rewrite_acc, rephrase_acc, locality and
    # the layer it edited at (`rome_locate.easyedit.easyedit_metrics`); None for the built-in editor.
    editor_metrics: dict[str, Any] | None = None
    # Sequential editing: the metrics of this fact after the LAST edit, against the unedited model, and, at the
    # checkpoints (1, 2, 5, 10, ... edits and the last), the means over every edit so far, measured after this one.
    final_metrics: dict[str, float | None] | None = None
    after_n_edits: dict[str, float | None] | None = None

    @property
    def best_layer(self) -> int | None:
        """The sweep's best layer (highest ROME score, then efficacy magnitude), or None without a sweep."""
        best = best_layer_score(self.sweep)
        return None if best is None else best.layer

    @property
    def success(self) -> bool:
        """The edit made target_new's first token the top-1 next token after the prompt."""
        return bool(self.metrics.get("success"))

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, with the derived `best_layer` (ignored when read back)."""
        return {**super().to_json(), "best_layer": self.best_layer}


@dataclass(frozen=True)
class Placement:
    """Where one fact is edited: its layer, why that layer, and the trace and choice behind it (if any)."""

    layer: int
    source: LayerSource
    trace: Any = None  # TraceResult (or anything with `effects`), for the sweep's effects and the report
    choice: Any = None  # LayerChoice (or anything with `layer`, `fact_id`, `margin`)


class EvaluationError(RuntimeError):
    """Evaluation stopped at one fact; `records` holds the facts that finished before it."""

    def __init__(self, fact_id: str, cause: BaseException, records: list[EvalRecord]):
        super().__init__(f"evaluation failed on fact {fact_id!r} after {len(records)} finished fact(s): "
                         f"{type(cause).__name__}: {cause}")
        self.fact_id = fact_id
        self.cause = cause
        self.records = records


# ---- pure metrics ----------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def success_rate(nll_winner: Sequence[float], nll_loser: Sequence[float]) -> float | None:
    """Share of prompts where the `winner` target is more likely (lower mean NLL) than the `loser`."""
    if len(nll_winner) != len(nll_loser):
        raise ValueError(f"success_rate: {len(nll_winner)} winner NLLs but {len(nll_loser)} loser NLLs")
    if not nll_winner:
        return None
    return float(np.mean([w < l for w, l in zip(nll_winner, nll_loser)]))


def mean_margin(p_a: Sequence[float], p_b: Sequence[float]) -> float | None:
    """Mean of P(a) - P(b) over prompts (ROME's magnitude)."""
    if len(p_a) != len(p_b):
        raise ValueError(f"mean_margin: {len(p_a)} and {len(p_b)} probabilities")
    return float(np.mean(np.asarray(p_a) - np.asarray(p_b))) if p_a else None


def kl_divergence(logp_before: torch.Tensor, logp_after: torch.Tensor) -> float:
    """Mean over rows of KL(before || after) between log-probability rows (nats)."""
    if logp_before.shape != logp_after.shape:
        raise ValueError(f"kl_divergence: shapes {tuple(logp_before.shape)} and {tuple(logp_after.shape)} differ")
    lb, la = logp_before.double(), logp_after.double()
    return float((lb.exp() * (lb - la)).sum(-1).mean())


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's fluency: the weighted mean of the n-gram entropies (bits) of a text's words.

    Words are runs of word characters or single punctuation marks (ROME uses
    NLTK's word tokenizer, which splits the same way on plain text).
    """
    words = _WORD.findall(text)
    entropies = []
    for n in orders:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if total == 0:
            entropies.append(0.0)
            continue
        freqs = np.array(list(grams.values()), dtype=float) / total
        entropies.append(float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(np.asarray(entropies) * np.asarray(weights)))


def _ranks(x: np.ndarray) -> np.ndarray:
    # Average ranks for ties, so that Spearman equals Pearson on these ranks.
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None when undefined (n < 2 or a constant side)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"spearman: {a.shape} and {b.shape} values")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return None if denom == 0 else float((ra * rb).sum() / denom)


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the given values (None ignored); 0 if any is 0."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if min(vals) <= 0:
        return 0.0
    return float(len(vals) / sum(1.0 / v for v in vals))


def rewrite_score(p_new_before: float, p_new_after: float) -> float:
    """Hase et al.'s edit success: the share of the missing probability of the new target the edit gained."""
    if p_new_before >= 1.0:
        return 0.0
    return float((p_new_after - p_new_before) / (1.0 - p_new_before))


# ---- scoring a model state -------------------------------------------------------


def _groups(fact: Fact) -> dict[str, tuple[str, ...]]:
    return {"edit": (fact.prompt,), "paraphrase": tuple(fact.rephrase_prompts),
            "neighborhood": tuple(fact.locality_prompts)}


def _locality_answer(fact: Fact, i: int) -> str | None:
    if i < len(fact.locality_answers) and fact.locality_answers[i]:
        return fact.locality_answers[i]
    return fact.target


def _state_scores(model, tok, fact: Fact, *, full: bool) -> dict[str, list[dict[str, PairScore]]]:
    """Scores of target_new / target_true (and, if `full`, the locality answers) on every prompt group."""
    pairs: list[tuple[str, str | None]] = []
    slots: list[tuple[str, int, str]] = []
    for group, prompts in _groups(fact).items():
        for i, prompt in enumerate(prompts):
            pairs.append((prompt, fact.target_new)); slots.append((group, i, "new"))
            if fact.target:
                pairs.append((prompt, fact.target)); slots.append((group, i, "true"))
            if full and group == "neighborhood":
                pairs.append((prompt, _locality_answer(fact, i))); slots.append((group, i, "answer"))
    scores = score_targets(model, tok, pairs, keep_next=full)
    out: dict[str, list[dict[str, PairScore]]] = {g: [{} for _ in p] for g, p in _groups(fact).items()}
    for (group, i, key), s in zip(slots, scores):
        out[group][i][key] = s
    return out


def _cf_metrics(state: dict[str, list[dict[str, PairScore]]]) -> dict[str, float | None]:
    """CounterFact success rates and magnitudes of one model state."""
    def rate(group: str, winner: str, loser: str) -> float | None:
        rows = [r for r in state[group] if winner in r and loser in r]
        return success_rate([r[winner].nll for r in rows], [r[loser].nll for r in rows])

    def margin(group: str, a: str, b: str) -> float | None:
        rows = [r for r in state[group] if a in r and b in r]
        return mean_margin([r[a].prob for r in rows], [r[b].prob for r in rows])

    m = {
        "efficacy_score": rate("edit", "new", "true"),
        "efficacy_magnitude": margin("edit", "new", "true"),
        "paraphrase_score": rate("paraphrase", "new", "true"),
        "paraphrase_magnitude": margin("paraphrase", "new", "true"),
        "neighborhood_score": rate("neighborhood", "true", "new"),
        "neighborhood_magnitude": margin("neighborhood", "true", "new"),
    }
    m["score"] = harmonic_mean([m["efficacy_score"], m["paraphrase_score"], m["neighborhood_score"]])
    return m


def _acc(state, group: str) -> float | None:
    rows = state[group]
    if not rows:
        return None
    return token_accuracy([r["new"].predicted for r in rows], [r["new"].target_ids for r in rows])


def metrics_between(before: dict, after: dict, gens_before: Sequence[str] = (),
                    gens_after: Sequence[str] = ()) -> dict[str, float | None]:
    """All metrics of one edit from the scores of the model before and after it."""
    post, pre = _cf_metrics(after), _cf_metrics(before)
    m: dict[str, float | None] = dict(post)
    m.update({k + "_pre": v for k, v in pre.items()})
    p_before, p_after = before["edit"][0]["new"].prob, after["edit"][0]["new"].prob
    m["p_new_pre"], m["p_new"] = p_before, p_after
    if "true" in after["edit"][0]:
        m["p_true_pre"], m["p_true"] = before["edit"][0]["true"].prob, after["edit"][0]["true"].prob
    m["rewrite_score"] = rewrite_score(p_before, p_after)
    new_after, new_before = after["edit"][0]["new"], before["edit"][0]["new"]
    m["success"] = float(new_after.predicted[0] == new_after.target_ids[0])
    m["success_pre"] = float(new_before.predicted[0] == new_before.target_ids[0])
    m["rewrite_acc"], m["rewrite_acc_pre"] = _acc(after, "edit"), _acc(before, "edit")
    m["rephrase_acc"], m["rephrase_acc_pre"] = _acc(after, "paraphrase"), _acc(before, "paraphrase")
    nb_b, nb_a = before["neighborhood"], after["neighborhood"]
    if nb_b and "answer" in nb_b[0]:
        m["locality"] = top1_agreement([r["answer"].predicted for r in nb_b], [r["answer"].predicted for r in nb_a])
        m["neighborhood_kl"] = kl_divergence(torch.stack([r["answer"].next_logp for r in nb_b]),
                                             torch.stack([r["answer"].next_logp for r in nb_a]))
    else:
        m["locality"] = m["neighborhood_kl"] = None
    m["ngram_entropy"] = _mean(ngram_entropy(t) for t in gens_after) if gens_after else None
    m["ngram_entropy_pre"] = _mean(ngram_entropy(t) for t in gens_before) if gens_before else None
    return m


# ---- generation ------------------------------------------------------------------


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], settings: GenerationSettings = GenerationSettings()) -> list[str]:
    """The continuation the model generates after each prompt (one prompt at a time: no padding to get wrong)."""
    device = input_device(model)
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id(tok))
    if settings.mode == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif settings.mode == "beam":
        kwargs.update(do_sample=False, num_beams=settings.num_beams)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    devices = [device] if device.type == "cuda" else []
    texts = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        # A private RNG stream per prompt: the same seed before and after the edit, global state untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            seq = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        texts.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def _generation_prompts(fact: Fact, max_neighborhood: int | None) -> list[tuple[str, str]]:
    out = [("edit", fact.prompt)] + [("paraphrase", p) for p in fact.rephrase_prompts]
    nb = fact.locality_prompts if max_neighborhood is None else fact.locality_prompts[:max_neighborhood]
    return out + [("neighborhood", p) for p in nb]


# ---- edits -----------------------------------------------------------------------


def fixed_layer(hparams) -> int:
    """The one edit layer the hyperparameters name (ROME edits one layer)."""
    layers = list(getattr(hparams, "layers", None) or [])
    if len(layers) != 1:
        raise ValueError(f"hyperparameters must name exactly one edit layer (ROME edits one), got layers={layers}")
    return int(layers[0])


def place(facts: Sequence[Fact], hparams, layers: str = "fixed", located: Sequence[Any] | None = None,
          n_layers: int | None = None, *, rule: Any = None, picks: Sequence[int] | None = None) -> list[Placement]:
    """The layer of every fact: `located` is aligned with `facts` BY POSITION; ids only cross-check it.

    An entry of `located` is locate()'s `(TraceResult, LayerChoice)` pair, a
    LayerChoice, or an int (a layer given by hand, used whatever `layers` says).
    With `layers="traced"` each fact is edited at its traced layer: with a `rule`
    (`validate.LayerRule`: the validated candidates and the calibrated fallback)
    `rule.traced(trace.effects)`, else the LayerChoice's layer; with "validated"
    at `picks` (aligned by position, from `validate.validated_layers`' trial
    edits); with "fixed" at the hyperparameters' layer (traces still feed the
    sweep and the report). A choice whose fact_id differs from its fact's is an
    error naming both; with `n_layers`, a layer outside the model is a LayerRangeError.
    """
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    fixed = fixed_layer(hparams)
    if n_layers is not None:
        check_layer(fixed, n_layers, "the hyperparameters' layer")
    if located is None:
        if layers != "fixed":
            raise ValueError(f"layers={layers!r} needs the located (TraceResult, LayerChoice) pairs of the facts")
        return [Placement(fixed, "fixed") for _ in facts]
    if layers == "validated" and (picks is None or len(picks) != len(facts)):
        raise ValueError("layers='validated' needs one trial-edit pick per fact (validate.validated_layers)")
    located = list(located)
    if len(located) != len(facts):
        raise ValueError(f"{len(located)} layer choices for {len(facts)} facts (they are matched by position)")
    out = []
    for i, (fact, entry) in enumerate(zip(facts, located)):
        if isinstance(entry, int) and not isinstance(entry, bool):
            placement = Placement(entry, "given")
        else:
            trace, choice = entry if isinstance(entry, tuple) else (None, entry)
            if str(choice.fact_id) != str(fact.id):
                raise ValueError(f"layer choice {i} is for fact {choice.fact_id!r} but fact {i} is {fact.id!r}; "
                                 f"the choices must be in the order of the facts")
            if layers == "validated":
                placement = Placement(int(picks[i]), "validated", trace, choice)
            elif layers == "traced":
                layer = choice.layer if rule is None or trace is None else rule.traced(trace.effects)
                placement = Placement(int(layer), "traced", trace, choice)
            else:
                placement = Placement(fixed, "fixed", trace, choice)
        if n_layers is not None:
            check_layer(placement.layer, n_layers, f"layer of fact {fact.id!r}")
        out.append(placement)
    return out


def evaluate_fact(model, tok, fact: Fact, hparams, *, placement: Placement | None = None,
                  sweep: bool | Sequence[int] = False, generation: GenerationSettings | None = GenerationSettings(),
                  editor: str = "builtin", edit_context: Callable | None = None, max_neighborhood: int | None = None,
                  sweep_progress: Callable[[int], None] | None = None, keep: ExitStack | None = None) -> EvalRecord:
    """Edit one fact at one layer, measure before and after, restore; optionally generate and sweep layers.

    `placement` defaults to the hyperparameters' own layer; `generation=None`
    switches generations off. `edit_context(model, tok, fact, hparams, editor=...)`
    is `edit.edited` unless a test double is given. With `keep` (sequential
    editing) the edit stays in place until that stack closes.
    """
    if keep is not None and sweep:
        raise ValueError("the layer sweep edits one fact at a time: it cannot run with sequential editing")
    check_editable(fact)
    if edit_context is None:
        from .edit import edited as edit_context
    t0 = time.perf_counter()
    fixed = fixed_layer(hparams)
    placement = placement or Placement(fixed, "fixed")
    trace, choice, layer = placement.trace, placement.choice, placement.layer
    effects = None if trace is None else tuple(float(e) for e in trace.effects)

    gen_prompts = _generation_prompts(fact, max_neighborhood) if generation is not None else []
    texts = [p for _, p in gen_prompts]
    before = _state_scores(model, tok, fact, full=True)
    gens_before = generate(model, tok, texts, generation) if texts else []
    context = edit_context(model, tok, fact, with_layer(hparams, layer), editor=editor)
    with context if keep is None else nullcontext() as handle:
        if keep is not None:
            handle = keep.enter_context(context)
        after = _state_scores(model, tok, fact, full=True)
        gens_after = generate(model, tok, texts, generation) if texts else []
    metrics = metrics_between(before, after, [t + g for t, g in zip(texts, gens_before)],
                              [t + g for t, g in zip(texts, gens_after)])

    scores: list[LayerScore] = []
    if sweep:
        from .arch import arch_for

        layers = list(range(arch_for(model).n_layers)) if sweep is True else [int(x) for x in sweep]
        for sweep_layer in layers:
            if sweep_layer == layer:
                state = after  # the main edit is this step's edit: no need to make it twice
            else:
                with edit_context(model, tok, fact, with_layer(hparams, sweep_layer), editor=editor):
                    state = _state_scores(model, tok, fact, full=False)
            cf = _cf_metrics(state)
            scores.append(LayerScore(
                layer=sweep_layer,
                effect=None if effects is None or sweep_layer >= len(effects) else effects[sweep_layer],
                rewrite_score=rewrite_score(before["edit"][0]["new"].prob, state["edit"][0]["new"].prob),
                **cf))
            if sweep_progress is not None:
                sweep_progress(sweep_layer)

    return EvalRecord(
        fact_id=fact.id, prompt=fact.prompt, subject=fact.subject, target_true=fact.target,
        target_new=fact.target_new, layer=int(layer), layer_source=placement.source, editor=editor,
        generations=tuple(Generation(prompt=t, group=g, before=b, after=a)
                          for (g, t), b, a in zip(gen_prompts, gens_before, gens_after)),
        metrics=metrics, sweep=tuple(scores),
        traced_layer=None if choice is None else int(choice.layer), fixed_layer=fixed,
        margin=None if choice is None else float(choice.margin), effects=effects,
        seconds=time.perf_counter() - t0, editor_metrics=_editor_report(handle),
    )


def _editor_report(handle: Any) -> dict[str, Any] | None:
    # An edit context may yield the editor's own metrics (a mapping); the built-in editor yields the model.
    return dict(handle) if isinstance(handle, Mapping) else None


def check_editable(fact: Fact) -> None:
    """A ValueError naming the fact when it cannot be an edit: no target_new, or target_new is the true answer."""
    if not fact.target_new:
        raise ValueError(f"fact {fact.id!r} ({fact.prompt!r}) has no target_new to edit towards "
                         f"(use a CounterFact-style facts file)")
    if fact.target is not None and fact.target_new.strip() == fact.target.strip():
        raise ValueError(f"fact {fact.id!r} ({fact.prompt!r}): target_new {fact.target_new!r} is the true answer; "
                         f"an edit to it would count as a success without changing anything")


def evaluate(model, tok, facts: Sequence[Fact], hparams, *, layers: str = "fixed",
             located: Sequence[Any] | None = None, placements: Sequence[Placement] | None = None,
             sweep: bool | Sequence[int] = False, generation: GenerationSettings | None = GenerationSettings(),
             editor: str = "builtin", edit_context: Callable | None = None, max_neighborhood: int | None = None,
             on_record: Callable[[list[EvalRecord]], None] | None = None,
             progress: bool = True) -> list[EvalRecord]:
    """Edit and measure every fact, one at a time (weights restored in between).

    Layers come from `placements`, else from `place(facts, hparams, layers, located)`
    (`located` aligned with the facts by position). `on_record` is called with the
    records so far after each fact. A failure raises `EvaluationError` carrying
    the finished records.
    """
    if placements is None:
        placements = place(facts, hparams, layers, located)
    if len(placements) != len(facts):
        raise ValueError(f"{len(placements)} placements for {len(facts)} facts")
    from tqdm.auto import tqdm

    records: list[EvalRecord] = []
    bar = tqdm(total=len(facts), desc=f"edit ({editor})", unit="fact", disable=not progress)
    try:
        for fact, placement in zip(facts, placements):
            try:
                rec = evaluate_fact(model, tok, fact, hparams, placement=placement, sweep=sweep,
                                    generation=generation, editor=editor, edit_context=edit_context,
                                    max_neighborhood=max_neighborhood)
            except Exception as exc:
                raise EvaluationError(fact.id, exc, list(records)) from exc
            records.append(rec)
            bar.update(1)
            if on_record is not None:
                on_record(list(records))
    finally:
        bar.close()
    return records


def checkpoints(n: int) -> list[int]:
    """Edit counts at which sequential editing re-measures every earlier edit: 1, 2, 5, 10, 20, 50, ... and n."""
    marks, base = {n}, 1
    while base <= n:
        marks |= {base * m for m in (1, 2, 5) if base * m <= n}
        base *= 10
    return sorted(marks)


SEQUENTIAL_FIELDS = ("success", "efficacy_score", "paraphrase_score", "rephrase_acc", "neighborhood_score",
                     "locality")


def evaluate_sequential(model, tok, facts: Sequence[Fact], hparams, *, placements: Sequence[Placement],
                        generation: GenerationSettings | None = None, editor: str = "builtin",
                        edit_context: Callable | None = None, max_neighborhood: int | None = None,
                        on_record: Callable[[list[EvalRecord]], None] | None = None,
                        progress: bool = True) -> list[EvalRecord]:
    """Edit the facts one after another, keeping every edit; the model is restored when all are measured.

    Each record holds its own edit's metrics (before/after that edit), at the
    checkpoints (`checkpoints`) `after_n_edits`, the means over every edit so far
    measured on the model at that moment, and after the last edit `final_metrics`,
    the fact's metrics on the final model against the unedited one.
    """
    if edit_context is None:
        from .edit import edited as edit_context
    from tqdm.auto import tqdm

    marks = set(checkpoints(len(facts)))
    unedited = [_state_scores(model, tok, f, full=True) for f in facts]
    records: list[EvalRecord] = []
    bar = tqdm(total=len(facts), desc=f"sequential edit ({editor})", unit="fact", disable=not progress)
    try:
        with ExitStack() as kept:
            for i, (fact, placement) in enumerate(zip(facts, placements)):
                try:
                    rec = evaluate_fact(model, tok, fact, hparams, placement=placement, generation=generation,
                                        editor=editor, edit_context=edit_context, max_neighborhood=max_neighborhood,
                                        keep=kept)
                    now: list[dict[str, float | None]] = []
                    if i + 1 in marks:
                        now = [metrics_between(b, _state_scores(model, tok, f, full=True))
                               for b, f in zip(unedited, facts[:i + 1])]
                        rec = replace(rec, after_n_edits={"n_edits": float(i + 1), **{
                            k: _mean(m.get(k) for m in now) for k in SEQUENTIAL_FIELDS}})
                except Exception as exc:
                    raise EvaluationError(fact.id, exc, list(records)) from exc
                records.append(rec)
                bar.update(1)
                if on_record is not None and i + 1 < len(facts):
                    on_record(list(records))
            # The last edit is always a checkpoint: `now` holds every fact on the final model.
            records = [replace(r, final_metrics=m) for r, m in zip(records, now)]
    finally:
        bar.close()
    if on_record is not None:
        on_record(list(records))
    return records


def _editor_means(records: Sequence[EvalRecord]) -> dict[str, dict[str, float | None]]:
    # The editor's own figures (EasyEdit's pre/post accuracies), averaged over the facts that have them.
    rows = [r.editor_metrics for r in records if r.editor_metrics]
    return {stage: {k: _mean(row.get(stage, {}).get(k) for row in rows)
                    for k in sorted({k for row in rows for k in row.get(stage, {})})}
            for stage in ("pre", "post") if rows}


def sequential_summary(records: Sequence[EvalRecord]) -> dict[str, Any] | None:
    """Retention, paraphrase and locality after the last edit, and efficacy after 1, 10 and all edits."""
    if not records or records[-1].final_metrics is None:
        return None
    earlier = [r for r in records[:-1] if r.metrics.get("success")]
    final = {k: _mean((r.final_metrics or {}).get(k) for r in records) for k in SEQUENTIAL_FIELDS}
    curve = [r.after_n_edits for r in records if r.after_n_edits]
    return {
        "n_edits": len(records),
        # Of the earlier edits that worked right after they were made, the share that still works after the last.
        "retention": _mean((r.final_metrics or {}).get("success") for r in earlier) if earlier else None,
        "retention_interval": _bounds(rate([(r.final_metrics or {}).get("success") for r in earlier])),
        "retention_of": len(earlier),
        "final": final,
        "efficacy_after": {str(int(p["n_edits"])): p.get("success") for p in curve
                           if int(p["n_edits"]) in (1, 10, len(records))},
        "curve": curve,
    }


# ---- dataset summary ---------------------------------------------------------------

STRATEGY_FIELDS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score",
                   "efficacy_magnitude", "rewrite_score")


def best_layer_score(sweep: Sequence[LayerScore]) -> LayerScore | None:
    """The sweep step with the highest ROME score, ties broken by efficacy magnitude then lower layer."""
    if not sweep:
        return None
    def key(s: LayerScore):
        return (s.score if s.score is not None else -1.0,
                s.efficacy_magnitude if s.efficacy_magnitude is not None else -2.0, -s.layer)
    return max(sweep, key=key)


def _at_layer(sweep: Sequence[LayerScore], layer: int | None) -> LayerScore | None:
    return next((s for s in sweep if s.layer == layer), None)


def _bounds(iv: Interval) -> list[float] | None:
    return None if iv.mean is None else [iv.low, iv.high]


def _strategy_row(values: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One strategy's means over its facts and their 95% bootstrap intervals (`intervals[field] = [low, high]`)."""
    ivs = {f: bootstrap([v.get(f) for v in values]) for f in STRATEGY_FIELDS}
    return {"n": len(values), **{f: iv.mean for f, iv in ivs.items()},
            "intervals": {f: _bounds(iv) for f, iv in ivs.items()}}


def _interval_of(row: Mapping[str, Any], field: str) -> Interval:
    bounds = (row.get("intervals") or {}).get(field)
    return Interval(row.get(field), *(bounds or (None, None)), row.get("n", 0))


def verdict(strategies: Mapping[str, Mapping[str, Any]], field: str = "score") -> str | None:
    """One line: the best layer choice by ROME score (the sweep-best oracle left out) and traced vs fixed."""
    ranked = {k: _interval_of(v, field) for k, v in strategies.items() if k != "sweep best"}
    ranked = {k: iv for k, iv in ranked.items() if iv.mean is not None}
    if not ranked:
        return None
    best = max(ranked, key=lambda k: ranked[k].mean)  # first listed wins a tie
    line = f"best layer choice by ROME score: {best} {ranked[best].text()}"
    others = [k for k in ranked if k != best]
    if others:
        line += " (" + ", ".join(f"{k} {ranked[k].text()}" for k in others) + ")"
    if "traced" in ranked and "fixed" in ranked:
        t, f = ranked["traced"], ranked["fixed"]
        how = "beats" if t.mean > f.mean else "trails" if t.mean < f.mean else "ties"
        line += (f"; the traced layer {how} the fixed one, "
                 + ("95% intervals overlap: not a clear difference" if overlap(t, f)
                    else "95% intervals do not overlap"))
    if "sweep best" in strategies:
        line += f"; sweep-best oracle {_interval_of(strategies['sweep best'], field).text()}"
    return line + "."


def summarize(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """Dataset summary: mean of every metric, traced vs fixed vs sweep-best, and effect/success rank correlations."""
    keys = sorted({k for r in records for k in r.metrics})
    means = {k: _mean(r.metrics.get(k) for r in records) for k in keys}

    strategies: dict[str, dict[str, Any]] = {}
    swept = [r for r in records if r.sweep]
    if swept:
        picks: dict[str, list[LayerScore | None]] = {}
        validated = [r for r in swept if r.layer_source == "validated"]
        if validated:  # the layer the trial edits picked, which is the layer the fact was edited at
            picks["validated"] = [_at_layer(r.sweep, r.layer) for r in validated]
        picks.update({
            "traced": [_at_layer(r.sweep, r.traced_layer) for r in swept],
            "fixed": [_at_layer(r.sweep, r.fixed_layer) for r in swept],
            "sweep best": [best_layer_score(r.sweep) for r in swept],
        })
        for name, chosen in picks.items():
            chosen = [c for c in chosen if c is not None]
            if chosen:
                strategies[name] = _strategy_row([{f: getattr(c, f) for f in STRATEGY_FIELDS} for c in chosen])
    else:
        for source in sorted({r.layer_source for r in records}):
            strategies[source] = _strategy_row([r.metrics for r in records if r.layer_source == source])

    per_fact, xs, ys = {}, [], []
    for r in swept:
        pts = [(s.effect, s.rewrite_score) for s in r.sweep if s.effect is not None and s.rewrite_score is not None]
        if pts:
            per_fact[r.fact_id] = spearman([p[0] for p in pts], [p[1] for p in pts])
            xs += [p[0] for p in pts]
            ys += [p[1] for p in pts]
    pooled = spearman(xs, ys) if xs else None
    sequential = sequential_summary(records)
    editor_means = _editor_means(records)
    traced_is_best = [r.traced_layer == r.best_layer for r in swept if r.traced_layer is not None]
    return {
        "n_facts": len(records),
        # The figures `rome-locate edit` prints (EasyEdit's names; "post" is after the edit).
        "success_rate": means.get("success"),
        "success_rate_interval": _bounds(rate([r.metrics.get("success") for r in records])),
        "pre_rewrite_acc": means.get("rewrite_acc_pre"),
        "post_rewrite_acc": means.get("rewrite_acc"),
        "post_rephrase_acc": means.get("rephrase_acc"),
        "post_locality": means.get("locality"),
        "layers": sorted({r.layer for r in records}),
        "means": means,
        "strategies": strategies,
        "verdict": verdict(strategies),
        "spearman_per_fact": per_fact,
        "spearman_per_fact_mean": _mean(per_fact.values()),
        "spearman_pooled": pooled,
        "traced_is_best_share": _mean(float(v) for v in traced_is_best) if traced_is_best else None,
        "correlation_measure": "Spearman rank correlation of traced indirect effect vs rewrite_score per layer",
        **({"sequential": sequential, "retention": sequential["retention"]} if sequential else {}),
        **({"editor_metrics": editor_means} if editor_means else {}),
    }
