"""Mass editing: write `batch_size` facts at once, measure each of them on the model that holds the whole batch.

MEMIT and AlphaEdit write a batch in one update over their window
(`Editor.edited_batch`); ROME writes a batch one fact after another, each at its
placement's layer (`Editor.edited` kept open). With `keep` (sequential batches) every
batch stays in the model, earlier facts are re-measured at the checkpoints
(`evaluate.checkpoints` of the number of facts edited so far), and each record's
`final_metrics` are its metrics on the model that holds every batch. The model is
restored bit-identically when the run ends, also on a failure.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping, Sequence

from .algorithms import is_window
from .choose import Placement
from .editors import Editor
from .evaluate import (Measured, _generation_prompts, between, check_changes, check_editable, checkpoints,
                       fact_record, measure, probe_keys, _state_scores)
from .facts import Fact
from .hparams import with_layer
from .metrics import mean_of, metrics_between
from .outcome import SEQUENTIAL_FIELDS, EvalRecord, EvaluationError, GenerationSettings
from .stats import check_mom2


def check_batch_size(batch_size: Any) -> int:
    """`batch_size` as an int >= 1, or a ValueError naming --batch-size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    return batch_size


@contextmanager
def edited_batch(model, tok, facts: Sequence[Fact], hparams: Any, placements: Sequence[Placement],
                 editor: Editor) -> Iterator[Any]:
    """The batch written into the model (one window update, or ROME's facts one after another at their layers);
    yields the editor's report; restores when the block ends."""
    if is_window(hparams):
        with editor.edited_batch(model, tok, facts, hparams) as handle:
            yield handle
        return
    with ExitStack() as stack:
        handle = None
        for fact, placement in zip(facts, placements):
            handle = stack.enter_context(editor.edited(model, tok, fact, with_layer(hparams, placement.layer)))
        yield handle


def _batch_records(model, tok, chunk: Sequence[Fact], hparams: Any, placements: Sequence[Placement], editor: Editor,
                   generation: GenerationSettings | None, max_neighborhood: int | None, chat_template: bool,
                   keep: ExitStack | None, before_cache: dict | None = None) -> list[EvalRecord]:
    """Measure the chunk, write it, measure it again; the records in the chunk's order. `before_cache` keeps each
    fact's unedited measurement across calls (only for edits that all start from the same unedited model)."""
    t0 = time.perf_counter()
    prompts = [_generation_prompts(f, max_neighborhood) if generation is not None else [] for f in chunk]
    before: list[Measured] = []
    for fact, gp in zip(chunk, prompts):
        key = (fact, tuple(gp))
        if before_cache is not None and key in before_cache:
            before.append(before_cache[key])
            continue
        check_editable(fact)
        before.append(measure(model, tok, fact, [p for _, p in gp], generation, chat_template, None))
        check_changes(fact, before[-1].state["edit"][0]["new"])
        if before_cache is not None:
            before_cache[key] = before[-1]
    window = list(hparams.layers) if is_window(hparams) else None
    what = f"the batch edit of {len(chunk)} facts at layers {window} ({editor.name})" if window else \
        f"the batch edit of {len(chunk)} facts ({editor.name})"
    context = edited_batch(model, tok, chunk, hparams, placements, editor)
    with context if keep is None else nullcontext() as handle:
        if keep is not None:
            handle = keep.enter_context(context)
        after = [measure(model, tok, f, [p for _, p in gp], generation, chat_template, what)
                 for f, gp in zip(chunk, prompts)]
    # An editor may report per fact (EasyEdit's batch_edit: one metrics entry per request, under "metrics").
    per_fact = handle.get("metrics") if isinstance(handle, Mapping) else None
    reports = list(per_fact) if isinstance(per_fact, Sequence) and len(per_fact) == len(chunk) else [handle] * len(chunk)
    seconds = (time.perf_counter() - t0) / len(chunk)
    return [fact_record(f, p, editor.name, gp, b, a, between(f, [t for _, t in gp], b, a),
                        fixed=p.fallback if p.fallback is not None else p.layer, seconds=seconds, handle=r,
                        layers=window, batch_size=len(chunk))
            for f, p, gp, b, a, r in zip(chunk, placements, prompts, before, after, reports)]


def evaluate_batches(model, tok, facts: Sequence[Fact], hparams: Any, placements: Sequence[Placement], *,
                     batch_size: int, editor: Editor, generation: GenerationSettings | None = None,
                     max_neighborhood: int | None = None, keep_edits: bool = False,
                     on_record: Callable[[list[EvalRecord]], None] | None = None, progress: bool = True,
                     chat_template: bool = False) -> list[EvalRecord]:
    """Edit the facts `batch_size` at a time and measure each on the model holding its batch; with `keep_edits`
    the batches accumulate (sequential batches: checkpoints and final metrics as `evaluate_sequential`'s)."""
    from tqdm.auto import tqdm

    check_batch_size(batch_size)
    if len(placements) != len(facts):
        raise ValueError(f"{len(placements)} placements for {len(facts)} facts")
    if keep_edits and getattr(hparams, "mom2_adjustment", False):
        window = set(hparams.layers) if is_window(hparams) else {p.layer for p in placements}
        check_mom2(model, hparams, window)  # while the model is the one the statistics' records name
    marks = set(checkpoints(len(facts))) if keep_edits else set()
    unedited = [_state_scores(model, tok, f, full=True, chat_template=chat_template) for f in facts] \
        if keep_edits else []
    records: list[EvalRecord] = []
    now: list[dict[str, float | None]] = []
    bar = tqdm(total=len(facts), desc=f"batch edit ({editor.name}, {batch_size} at once)", unit="fact",
               disable=not progress)
    try:
        with ExitStack() as kept:
            for start in range(0, len(facts), batch_size):
                chunk = list(facts[start:start + batch_size])
                try:
                    recs = _batch_records(model, tok, chunk, hparams, placements[start:start + batch_size], editor,
                                          generation, max_neighborhood, chat_template, kept if keep_edits else None)
                    done = start + len(chunk)
                    if any(start < m <= done for m in marks):
                        now = [metrics_between(b, _state_scores(model, tok, f, full=True, chat_template=chat_template),
                                               keys=probe_keys(f)) for b, f in zip(unedited, facts[:done])]
                        recs[-1] = replace(recs[-1], after_n_edits={"n_edits": float(done), **{
                            k: mean_of(m.get(k) for m in now) for k in SEQUENTIAL_FIELDS}})
                except Exception as exc:
                    raise EvaluationError(chunk[0].id, exc, list(records)) from exc
                records.extend(recs)
                bar.update(len(chunk))
                if on_record is not None and (not keep_edits or done < len(facts)):
                    on_record(list(records))
            if keep_edits:
                records = [replace(r, final_metrics=m) for r, m in zip(records, now)]
    finally:
        bar.close()
    if keep_edits and on_record is not None:
        on_record(list(records))
    return records


def measure_batch(model, tok, facts: Sequence[Fact], hparams: Any, editor: Editor,
                  chat_template: bool = False, before_cache: dict | None = None) -> list[EvalRecord]:
    """Write `facts` at once in the hyperparameters' window, measure each (no generations), restore: the trial edit
    of the window search, the pipeline's own batch step (`before_cache`: see `_batch_records`)."""
    from .choose import WINDOW, LayerDecision

    last = int(hparams.layers[-1])
    placement = Placement(LayerDecision(last, "fixed", f"{WINDOW} {list(hparams.layers)}"), fallback=last)
    return _batch_records(model, tok, list(facts), hparams, [placement] * len(facts), editor, None, None,
                          chat_template, None, before_cache)
