"""Edit one fact (or a run of facts, one after another) and measure it before and after: one `EvalRecord` each.

Probabilities of a target string are whole-sequence: the prompt and `" " + target`
are tokenized together and the log-probabilities of the target tokens summed.
Comparisons (`P(new) > P(true)`) use the mean per-token negative log-likelihood,
as ROME's CounterFact evaluation does. The metrics are `rome_locate.metrics`, the
records `rome_locate.outcome`, the layers the placements of `rome_locate.choose`,
the editor an object of `rome_locate.editors`. With `chat_template` every prompt scored
or generated from is a user turn of the tokenizer's chat template (`prompts.model_input`),
and the editor must read the prompts so too.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from .choose import LayerDecision, Placement
from .editors import BuiltinRome, Editor
from .facts import Fact
from .hparams import fixed_layer, with_layer
from .metrics import GEN_EXTRA_TOKENS, cf_metrics, generation_metrics, mean_of, metrics_between, rewrite_score
from .models import input_device
from .outcome import SEQUENTIAL_FIELDS, EvalRecord, EvaluationError, Generation, GenerationSettings, LayerScore
from .scoring import PairScore, greedy_continuations, score_targets
from .stats import check_mom2
from .tokens import continuation, pad_id, prompt_ids


# ---- scoring a model state -------------------------------------------------------


def _groups(fact: Fact) -> dict[str, tuple[str, ...]]:
    # Every locality probe, whatever its key, is a CounterFact neighbourhood prompt as well.
    return {"edit": (fact.prompt,), "paraphrase": tuple(fact.rephrase_prompts),
            "neighborhood": fact.locality_prompts}


def probe_keys(fact: Fact) -> dict[str, tuple[str, ...]]:
    """The key of every "neighborhood" and "portability" row of `_state_scores` (`metrics_between`'s `keys`)."""
    return {"neighborhood": tuple(p.key for p in fact.locality), "portability": tuple(p.key for p in fact.portability)}


def _state_scores(model, tok, fact: Fact, *, full: bool,
                  chat_template: bool = False) -> dict[str, list[dict[str, PairScore]]]:
    """Scores of target_new / target_true on every prompt group and, if `full`, of each locality probe's answer
    (the fact's true answer where the probe has none) and each portability probe's answer (group "portability")."""
    pairs: list[tuple[str, str | None]] = []
    slots: list[tuple[str, int, str]] = []
    for group, prompts in _groups(fact).items():
        for i, prompt in enumerate(prompts):
            pairs.append((prompt, fact.target_new)); slots.append((group, i, "new"))
            if fact.target:
                pairs.append((prompt, fact.target)); slots.append((group, i, "true"))
            if full and group == "neighborhood":
                pairs.append((prompt, fact.locality[i].answer or fact.target)); slots.append((group, i, "answer"))
    if full:
        for i, probe in enumerate(fact.portability):
            if probe.answer:  # a probe without an answer has nothing to score
                pairs.append((probe.prompt, probe.answer)); slots.append(("portability", i, "answer"))
    scores = score_targets(model, tok, pairs, keep_next=full, chat_template=chat_template)
    out: dict[str, list[dict[str, PairScore]]] = {g: [{} for _ in p] for g, p in _groups(fact).items()}
    if full:
        out["portability"] = [{} for _ in fact.portability]
    for (group, i, key), s in zip(slots, scores):
        out[group][i][key] = s
    return out


def continuations(model, tok, fact: Fact, chat_template: bool = False) -> dict[str, list[str]]:
    """The greedy continuations the generation metrics read: of the edit prompt ("edit") and of each rephrasing
    ("paraphrase"), each at most target_new's token count after it + GEN_EXTRA_TOKENS new tokens."""
    prompts = [fact.prompt, *fact.rephrase_prompts]
    lengths = [len(continuation(tok, p, fact.target_new, chat_template)[1]) + GEN_EXTRA_TOKENS for p in prompts]
    texts = greedy_continuations(model, tok, prompts, lengths, chat_template=chat_template)
    return {"edit": texts[:1], "paraphrase": texts[1:]}



_SLOTS = {"new": "target_new", "true": "target", "answer": "locality answer"}
# What a non-finite number after an edit usually comes from, for the message.
_NON_FINITE_HINT = ("check the mom2 statistics and the v* settings (v_lr, clamp_norm_factor, v_weight_decay, "
                    "kl_factor), and --dtype (float16 overflows: float32 or bfloat16)")


def _non_finite_scores(state: dict[str, list[dict[str, PairScore]]]) -> list[str]:
    """Where the scores of a model state are NaN or infinite: "edit prompt 0: target_new", ..."""
    bad = []
    for group, rows in state.items():
        for i, row in enumerate(rows):
            for slot, score in row.items():
                nll_bad = bool(score.target_ids) and not math.isfinite(score.nll)
                if nll_bad or (score.next_logp is not None and bool(torch.isnan(score.next_logp).any())):
                    bad.append(f"{group} prompt {i}: {_SLOTS.get(slot, slot)}")
    return bad


def check_finite(model, fact: Fact, state: dict[str, list[dict[str, PairScore]]], edit: str | None) -> None:
    """A ValueError naming the fact and what is non-finite when `state` holds NaN or inf; `edit` says which edit
    made it (None: the unedited model), and then the non-finite weights are named too."""
    bad = _non_finite_scores(state)
    if not bad:
        return
    where = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    if edit is None:
        raise ValueError(f"fact {fact.id!r}: the unedited model gives non-finite outputs (NaN or inf) at {where}; "
                         f"check its weights and --dtype (float16 overflows: float32 or bfloat16)")
    weights = [name for name, p in model.named_parameters()
               if p.device.type != "meta" and not bool(torch.isfinite(p).all())]
    made = f"{', '.join(weights[:3])} became non-finite, and so did" if weights else "non-finite numbers in"
    raise ValueError(f"fact {fact.id!r}: {edit} made the model non-finite (NaN or inf): {made} its outputs at "
                     f"{where}; {_NON_FINITE_HINT}")


# ---- generation ------------------------------------------------------------------


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], settings: GenerationSettings = GenerationSettings(),
             chat_template: bool = False) -> list[str]:
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
        ids = torch.tensor([prompt_ids(tok, prompt, chat_template)], device=device)
        mask = torch.ones_like(ids)
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


@dataclass(frozen=True)
class Measured:
    """One fact's scores, continuations and generations on one model state (before or after an edit)."""

    state: dict[str, list[dict[str, PairScore]]]
    continuations: dict[str, list[str]]
    gens: list[str]


def measure(model, tok, fact: Fact, texts: Sequence[str], generation: GenerationSettings | None,
            chat_template: bool, edit: str | None) -> Measured:
    """Score, continue and generate from `fact`'s prompts on the model now; non-finite outputs are an error naming
    the fact and `edit` (None: the unedited model)."""
    state = _state_scores(model, tok, fact, full=True, chat_template=chat_template)
    cont = continuations(model, tok, fact, chat_template)
    check_finite(model, fact, state, edit)
    gens = generate(model, tok, texts, generation, chat_template) if texts else []
    return Measured(state, cont, gens)


def between(fact: Fact, texts: Sequence[str], before: Measured, after: Measured) -> dict[str, float | None]:
    """The fact's metrics from its two measurements (`metrics.metrics_between` and the generation metrics)."""
    metrics = metrics_between(before.state, after.state, [t + g for t, g in zip(texts, before.gens)],
                              [t + g for t, g in zip(texts, after.gens)], keys=probe_keys(fact))
    metrics.update(generation_metrics(before.continuations, after.continuations, fact.target_new))
    return metrics


def evaluate_fact(model, tok, fact: Fact, hparams, *, placement: Placement | None = None,
                  sweep: bool | Sequence[int] = False, generation: GenerationSettings | None = GenerationSettings(),
                  editor: Editor | None = None, max_neighborhood: int | None = None, n_layers: int | None = None,
                  sweep_progress: Callable[[int], None] | None = None, keep: ExitStack | None = None,
                  chat_template: bool = False) -> EvalRecord:
    """Edit one fact at its placement's layer, measure before and after, restore; optionally generate and sweep.

    `placement` defaults to the hyperparameters' own layer; `generation=None`
    switches generations off; `editor` defaults to the built-in ROME. With `keep`
    (sequential editing) the edit stays in place until that stack closes.
    `sweep=True` edits at each of the model's `n_layers` layers too.
    """
    if keep is not None and sweep:
        raise ValueError("the layer sweep edits one fact at a time: it cannot run with sequential editing")
    check_editable(fact)
    editor = editor if editor is not None else BuiltinRome(chat_template=chat_template)
    chat = chat_template
    t0 = time.perf_counter()
    fixed = fixed_layer(hparams)
    placement = placement or Placement(LayerDecision(fixed, "fixed", "the hyperparameters' layer"), fallback=fixed)
    layer = placement.layer
    effects = None if placement.trace is None else tuple(float(e) for e in placement.trace.effects)

    gen_prompts = _generation_prompts(fact, max_neighborhood) if generation is not None else []
    texts = [p for _, p in gen_prompts]
    before = measure(model, tok, fact, texts, generation, chat, None)
    check_changes(fact, before.state["edit"][0]["new"])
    context = editor.edited(model, tok, fact, with_layer(hparams, layer))
    with context if keep is None else nullcontext() as handle:
        if keep is not None:
            handle = keep.enter_context(context)
        after = measure(model, tok, fact, texts, generation, chat, f"the edit at layer {layer} ({editor.name})")
    metrics = between(fact, texts, before, after)
    if sweep:
        layers = list(range(_n_layers(model, n_layers))) if sweep is True else [int(x) for x in sweep]
        scores = _sweep(model, tok, fact, hparams, editor, layers, layer, before.state, after.state, effects,
                        sweep_progress, chat)
    else:
        scores = []
    return fact_record(fact, placement, editor.name, gen_prompts, before, after, metrics, fixed=fixed,
                       seconds=time.perf_counter() - t0, handle=handle, sweep=scores)


def fact_record(fact: Fact, placement: Placement, editor_name: str, gen_prompts: Sequence[tuple[str, str]],
                before: Measured, after: Measured, metrics: dict[str, float | None], *, fixed: int | None,
                seconds: float, handle: Any = None, sweep: Sequence[LayerScore] = (),
                layers: Sequence[int] | None = None, batch_size: int = 1) -> EvalRecord:
    """The `EvalRecord` of one fact's edit at its placement, from its measurements."""
    traced = placement.traced
    return EvalRecord(
        fact_id=fact.id, prompt=fact.prompt, subject=fact.subject, target_true=fact.target,
        target_new=fact.target_new, layer=int(placement.layer), layer_source=placement.source,
        layer_reason=placement.decision.reason, editor=editor_name,
        generations=tuple(Generation(prompt=t, group=g, before=b, after=a)
                          for (g, t), b, a in zip(gen_prompts, before.gens, after.gens)),
        metrics=metrics, sweep=tuple(sweep),
        traced_layer=None if traced is None else int(traced.layer),
        fixed_layer=fixed if placement.fallback is None else int(placement.fallback),
        margin=None if traced is None or traced.margin is None else float(traced.margin),
        effects=None if placement.trace is None else tuple(float(e) for e in placement.trace.effects),
        seconds=seconds, editor_metrics=_editor_report(handle),
        layers=None if layers is None else tuple(int(x) for x in layers), batch_size=batch_size,
    )


def _n_layers(model, n_layers: int | None) -> int:
    if n_layers is not None:
        return n_layers
    from .arch import arch_for

    return arch_for(model).n_layers


def _sweep(model, tok, fact: Fact, hparams, editor: Editor, layers: Sequence[int], main_layer: int, before: dict,
           after: dict, effects: tuple[float, ...] | None,
           progress: Callable[[int], None] | None, chat_template: bool) -> list[LayerScore]:
    """Edit the fact at every sweep layer (the main edit's scores reused at its own layer) and score each."""
    scores = []
    for sweep_layer in layers:
        if sweep_layer == main_layer:
            state = after  # the main edit is this step's edit: no need to make it twice
        else:
            with editor.edited(model, tok, fact, with_layer(hparams, sweep_layer)):
                state = _state_scores(model, tok, fact, full=False, chat_template=chat_template)
                check_finite(model, fact, state, f"the sweep's edit at layer {sweep_layer} ({editor.name})")
        scores.append(LayerScore(
            layer=sweep_layer,
            effect=None if effects is None or sweep_layer >= len(effects) else effects[sweep_layer],
            rewrite_score=rewrite_score(before["edit"][0]["new"].prob, state["edit"][0]["new"].prob),
            **cf_metrics(state)))
        if progress is not None:
            progress(sweep_layer)
    return scores


def _editor_report(handle: Any) -> dict[str, Any] | None:
    # An edit context may yield the editor's own metrics (a mapping); the built-in editor yields the model.
    return dict(handle) if isinstance(handle, Mapping) else None


def check_changes(fact: Fact, new_before: PairScore) -> None:
    """A ValueError naming the fact when its edit could count as a success without changing anything: it has no
    target, and the unedited model already predicts target_new's first token (`new_before`: its scores)."""
    if fact.target is None and new_before.predicted[:1] == new_before.target_ids[:1]:
        raise ValueError(f"fact {fact.id!r} ({fact.prompt!r}) has no target, and the model already predicts "
                         f"target_new {fact.target_new!r}: an edit to it would count as a success without changing "
                         f"anything (give the fact its true answer as target, another target_new, or --skip-errors "
                         f"to skip it)")


def already_predicted(model, tok, facts: Sequence[Fact]) -> list[ValueError | None]:
    """`check_changes` of every fact on the unedited model: its ValueError, or None (also for a fact with a target,
    which needs no scoring)."""
    out: list[ValueError | None] = [None] * len(facts)
    for i, fact in enumerate(facts):
        if fact.target is None and fact.target_new:
            try:
                # One fact at a time: a target that cannot be tokenized is that fact's error, not the run's.
                [score] = score_targets(model, tok, [(fact.prompt, fact.target_new)])
                check_changes(fact, score)
            except ValueError as exc:
                out[i] = exc
    return out


def check_editable(fact: Fact) -> None:
    """A ValueError naming the fact when it cannot be an edit: no target_new, or target_new is the true answer."""
    if not fact.target_new:
        raise ValueError(f"fact {fact.id!r} ({fact.prompt!r}) has no target_new to edit towards "
                         f"(use a CounterFact-style facts file)")
    if fact.target is not None and fact.target_new.strip() == fact.target.strip():
        raise ValueError(f"fact {fact.id!r} ({fact.prompt!r}): target_new {fact.target_new!r} is the true answer; "
                         f"an edit to it would count as a success without changing anything")


def evaluate(model, tok, facts: Sequence[Fact], hparams, placements: Sequence[Placement], *,
             sweep: bool | Sequence[int] = False, generation: GenerationSettings | None = GenerationSettings(),
             editor: Editor | None = None, max_neighborhood: int | None = None, n_layers: int | None = None,
             on_record: Callable[[list[EvalRecord]], None] | None = None,
             progress: bool = True, chat_template: bool = False) -> list[EvalRecord]:
    """Edit and measure every fact at its placement (`choose.place`), one at a time, weights restored in between.

    `on_record` is called with the records so far after each fact. A failure
    raises `EvaluationError` carrying the finished records.
    """
    if len(placements) != len(facts):
        raise ValueError(f"{len(placements)} placements for {len(facts)} facts")
    from tqdm.auto import tqdm

    editor = editor if editor is not None else BuiltinRome(chat_template=chat_template)
    records: list[EvalRecord] = []
    bar = tqdm(total=len(facts), desc=f"edit ({editor.name})", unit="fact", disable=not progress)
    try:
        for fact, placement in zip(facts, placements):
            try:
                rec = evaluate_fact(model, tok, fact, hparams, placement=placement, sweep=sweep,
                                    generation=generation, editor=editor, max_neighborhood=max_neighborhood,
                                    n_layers=n_layers, chat_template=chat_template)
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


def evaluate_sequential(model, tok, facts: Sequence[Fact], hparams, placements: Sequence[Placement], *,
                        generation: GenerationSettings | None = None, editor: Editor | None = None,
                        max_neighborhood: int | None = None,
                        on_record: Callable[[list[EvalRecord]], None] | None = None,
                        progress: bool = True, chat_template: bool = False) -> list[EvalRecord]:
    """Edit the facts one after another, keeping every edit; the model is restored when all are measured.

    Each record holds its own edit's metrics (before/after that edit), at the
    checkpoints (`checkpoints`) `after_n_edits`, the means over every edit so far
    measured on the model at that moment, and after the last edit `final_metrics`,
    the fact's metrics on the final model against the unedited one.
    """
    from tqdm.auto import tqdm

    editor = editor if editor is not None else BuiltinRome(chat_template=chat_template)
    if getattr(hparams, "mom2_adjustment", False):
        # Every fact's statistics, while the model is unedited: once edits accumulate its weights are not the ones
        # the statistics' records name.
        check_mom2(model, hparams, {p.layer for p in placements})
    marks = set(checkpoints(len(facts)))
    unedited = [_state_scores(model, tok, f, full=True, chat_template=chat_template) for f in facts]
    records: list[EvalRecord] = []
    bar = tqdm(total=len(facts), desc=f"sequential edit ({editor.name})", unit="fact", disable=not progress)
    try:
        with ExitStack() as kept:
            for i, (fact, placement) in enumerate(zip(facts, placements)):
                try:
                    rec = evaluate_fact(model, tok, fact, hparams, placement=placement, generation=generation,
                                        editor=editor, max_neighborhood=max_neighborhood,
                                        keep=kept, chat_template=chat_template)
                    now: list[dict[str, float | None]] = []
                    if i + 1 in marks:
                        now = [metrics_between(b, _state_scores(model, tok, f, full=True,
                                                                chat_template=chat_template), keys=probe_keys(f))
                               for b, f in zip(unedited, facts[:i + 1])]
                        rec = replace(rec, after_n_edits={"n_edits": float(i + 1), **{
                            k: mean_of(m.get(k) for m in now) for k in SEQUENTIAL_FIELDS}})
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


