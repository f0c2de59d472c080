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
  locality prompts), `portability` (teacher-forced token accuracy of each
  portability probe's answer after its prompt, EasyEdit's
  `compute_portability_quality`). Both by key, as EasyEdit groups them:
  `locality.KEY` and `portability.KEY` are the means over that key's probes
  (per probe the share of its answer's tokens, as EasyEdit's
  `test_prediction_acc`), and `locality` and `portability` the mean over the
  keys (KnowEdit's "average of all sub-scores"). A probe without an answer
  is scored on the fact's true answer for locality, and not at all for
  portability.
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
- Generation: `gen_efficacy` (the edit prompt) and `gen_paraphrase` (the share
  of the rephrasings) count a prompt as a success when its greedy
  continuation says target_new (`generation_success`, `GEN_EXTRA_TOKENS`):
  the model generates greedily, without sampling, at most
  len(target_new's tokens after that prompt) + 2 new tokens (fewer when it
  emits its end-of-text token), the text is decoded without special tokens,
  both texts are normalised (runs of whitespace become one space, leading
  and trailing whitespace is dropped, case is folded with `str.casefold`),
  and the continuation must start with target_new, ending at a word
  boundary when target_new ends in a letter or digit ("Paris" counts in
  "Paris, France", not in "Parisian"). Teacher-forced figures can call an
  edit a success that generation does not: the first token can be top-1
  while the continuation goes elsewhere.

"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .scoring import PairScore, token_accuracy, top1_agreement

# New tokens a greedy continuation may use beyond target_new's own: a model that generates the target through other
# token boundaries (" Par" "is" for " Paris") or after a space token still counts.
GEN_EXTRA_TOKENS = 2

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


def keyed_means(values: Sequence[float | None], keys: Sequence[str]) -> dict[str, float | None]:
    """The mean of the values of each key (None left out), keys in the order they first appear."""
    if len(values) != len(keys):
        raise ValueError(f"keyed_means: {len(values)} values for {len(keys)} keys")
    return {k: mean_of(v for v, kk in zip(values, keys) if kk == k) for k in dict.fromkeys(keys)}


def by_key(name: str, values: Sequence[float | None], keys: Sequence[str]) -> dict[str, float | None]:
    """`name.KEY`, the mean of each key's per-probe values, and `name`, the mean over the keys (None: no key)."""
    means = keyed_means(values, keys)
    return {name: mean_of(means.values()), **{f"{name}.{k}": v for k, v in means.items()}}


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def generation_success(continuation: str, target: str) -> bool:
    """Whether a generated continuation says `target` (the rule in this module's docstring)."""
    c, t = _normalised(continuation), _normalised(target)
    if not t:
        raise ValueError(f"generation_success: empty target {target!r}")
    if not c.startswith(t):
        return False
    return len(c) == len(t) or not t[-1].isalnum() or not c[len(t)].isalnum()


def generation_metrics(before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]],
                       target_new: str) -> dict[str, float | None]:
    """`gen_efficacy` and `gen_paraphrase` (and `_pre`) from the continuations of the "edit" and "paraphrase"
    prompts before and after the edit."""
    def share(texts: Sequence[str]) -> float | None:
        return mean_of(float(generation_success(t, target_new)) for t in texts) if texts else None

    return {"gen_efficacy": share(after.get("edit", ())), "gen_efficacy_pre": share(before.get("edit", ())),
            "gen_paraphrase": share(after.get("paraphrase", ())),
            "gen_paraphrase_pre": share(before.get("paraphrase", ()))}


def _probe_acc(row: dict[str, PairScore]) -> float | None:
    s = row.get("answer")
    return None if s is None or not s.target_ids else token_accuracy([s.predicted], [s.target_ids])


def _keyed(before: dict, after: dict, keys: Mapping[str, Sequence[str]] | None) -> dict[str, float | None]:
    """Locality and portability by key (the module docstring)."""
    m: dict[str, float | None] = {}
    nb_b, nb_a = before["neighborhood"], after["neighborhood"]
    if nb_b and "answer" in nb_b[0]:
        shares = [top1_agreement([b["answer"].predicted], [a["answer"].predicted]) for b, a in zip(nb_b, nb_a)]
        m.update(by_key("locality", shares, (keys or {}).get("neighborhood") or ("neighborhood",) * len(shares)))
    else:
        m["locality"] = None
    port_b, port_a = before.get("portability") or [], after.get("portability") or []
    if port_a:
        port_keys = (keys or {}).get("portability") or ("portability",) * len(port_a)
        m.update(by_key("portability", [_probe_acc(r) for r in port_a], port_keys))
        m.update({k + "_pre": v for k, v in by_key("portability", [_probe_acc(r) for r in port_b], port_keys).items()})
    return m


def _acc(state, group: str) -> float | None:
    rows = state[group]
    if not rows:
        return None
    return token_accuracy([r["new"].predicted for r in rows], [r["new"].target_ids for r in rows])


def metrics_between(before: dict, after: dict, gens_before: Sequence[str] = (), gens_after: Sequence[str] = (),
                    keys: Mapping[str, Sequence[str]] | None = None) -> dict[str, float | None]:
    """All teacher-forced metrics of one edit from the scores of the model before and after it.

    `keys` gives the key of every "neighborhood" and "portability" row (aligned with them); without it every row
    of a group is one key.
    """
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
    m.update(_keyed(before, after, keys))
    if nb_b and "answer" in nb_b[0]:
        m["neighborhood_kl"] = kl_divergence(torch.stack([r["answer"].next_logp for r in nb_b]),
                                             torch.stack([r["answer"].next_logp for r in nb_a]))
    else:
        m["neighborhood_kl"] = None
    m["ngram_entropy"] = mean_of(ngram_entropy(t) for t in gens_after) if gens_after else None
    m["ngram_entropy_pre"] = mean_of(ngram_entropy(t) for t in gens_before) if gens_before else None
    return m
