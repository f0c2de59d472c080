"""Pure metrics of one edit: CounterFact and EasyEdit measures from the scores of the model before and after.

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
  It is only measured for an edit that could change that token: a fact
  without a target whose target_new the unedited model already predicts is
  not an edit (`evaluate.check_changes`: an error naming the fact, skipped
  with `--skip-errors`), as a fact whose target_new is its target is not
  (`evaluate.check_editable`). A fact with a target may still have
  `success_pre` 1.0 (the model was wrong already, or the two answers share a
  first token); `success_pre` says so beside `success`.

"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch

from .scoring import PairScore, token_accuracy, top1_agreement

# ROME's fluency measure: weights of the 2- and 3-gram entropies.
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def mean_of(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
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


def cf_metrics(state: dict[str, list[dict[str, PairScore]]]) -> dict[str, float | None]:
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
    post, pre = cf_metrics(after), cf_metrics(before)
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
    m["ngram_entropy"] = mean_of(ngram_entropy(t) for t in gens_after) if gens_after else None
    m["ngram_entropy_pre"] = mean_of(ngram_entropy(t) for t in gens_before) if gens_before else None
    return m
