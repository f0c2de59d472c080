"""Validated ROME hyperparameters: choose the edit layer and the v* optimisation settings by trial edits.

`rome-locate hparams` (by default) runs this search:

1. keep the facts the model knows (its top-1 is the target's first token) and
   turn facts without `target_new` into counterfactual requests
   (`rome_locate.requests`);
2. split them by subject (seeded, disjoint subjects) into calibration and
   test facts;
3. trace the calibration facts and shortlist candidate layers: the layer with
   the largest mean indirect effect (never the last layer, which ROME cannot
   edit) and its neighbours;
4. trial-edit calibration facts at every (candidate layer, grid setting) by
   successive halving (each round keeps the best third of the configurations
   and gives them three times as many facts) within `budget` trial edits;
5. score with one objective (`--objective`): CounterFact's score, the
   harmonic mean of the mean efficacy, paraphrase and neighbourhood success
   rates (the default), or the generation score, the same with generation
   efficacy and generation paraphrase (`rome_locate.metrics`) in place of the
   teacher-forced efficacy and paraphrase; ties go to the cheaper setting
   (fewer gradient steps x prompts). The test figures give both objectives;
6. calibrate the trace-margin threshold of the per-fact `traced` rule on the
   calibration facts, and measure the chosen configuration on the test facts
   only (fixed layer, traced, validated and the candidates' sweep-best), with
   95% bootstrap intervals.

Every trial edit goes through `trial_edit`, which is the pipeline's one edit-and-measure
function (`evaluate.evaluate_fact`) with generations and the sweep off.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from .choose import LayerDecision, LayerRule, dataset_edit_layer, editable_layers
from .editors import Editor
from .evaluate import evaluate_fact
from .facts import Fact
from .intervals import N_BOOTSTRAP, Interval, bootstrap
from .metrics import harmonic_mean
from .trace import TraceSettings
from .validation_records import OBJECTIVES, Config, Mode, Setting, TrialScores, Validation, default_grid

ETA = 3  # successive halving: keep 1/ETA of the configurations, give them ETA x the facts
MIN_SPLIT = 2  # fewest facts on each side of the calibration/test split


class ValidationError(ValueError):
    """Input the validated search cannot work with; the message names it."""


# ---- the one place that edits and measures -------------------------------------------------


def trial_edit(model, tok, fact: Fact, hparams, editor: Editor | None = None,
               chat_template: bool = False) -> TrialScores:
    """Edit `fact` at `hparams.layers`, measure CounterFact success on its prompts, restore the model.

    The pipeline's own edit-and-measure step (`evaluate.evaluate_fact`, generations and sweep off), so a trial
    edit is the edit `rome-locate edit` makes, with the same editor object.
    """
    m = evaluate_fact(model, tok, fact, hparams, generation=None, sweep=False, editor=editor,
                      chat_template=chat_template).metrics
    return TrialScores(m["efficacy_score"], m["paraphrase_score"], m["neighborhood_score"],
                       m["efficacy_magnitude"], m.get("gen_efficacy"), m.get("gen_paraphrase"))


# ---- pure parts: split, shortlist, objective, schedule, intervals ---------------------------


def split_by_subject(facts: Sequence[Fact], test_fraction: float, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """(calibration, test): a seeded split of the subjects, so no subject is on both sides."""
    if not 0 < test_fraction < 1:
        raise ValidationError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    subjects = sorted({f.subject for f in facts})
    random.Random(seed).shuffle(subjects)
    n_test = min(len(subjects) - 1, max(1, round(test_fraction * len(subjects))))
    test_subjects = set(subjects[:n_test])
    calib = [f for f in facts if f.subject not in test_subjects]
    test = [f for f in facts if f.subject in test_subjects]
    if len(subjects) < 2 or len(calib) < MIN_SPLIT or len(test) < MIN_SPLIT:
        raise ValidationError(
            f"too few facts to split into calibration and test: {len(facts)} known fact(s) of {len(subjects)} "
            f"subject(s); the split needs at least {MIN_SPLIT} facts on each side with disjoint subjects "
            f"(give more facts, or --no-validate)")
    return calib, test


def shortlist(mean_effects: Sequence[float], n_layers: int, width: int = 1) -> tuple[int, list[int]]:
    """(dataset layer, candidates): the editable layer of largest mean effect and its `width` neighbours.

    The last layer is never a candidate: its MLP output reaches the logits
    through no later layer, and the v* loss is read there.
    """
    centre = dataset_edit_layer(mean_effects)
    editable = editable_layers(n_layers)
    return centre, [l for l in range(centre - width, centre + width + 1) if l in editable]


# The TrialScores fields each objective's harmonic mean reads.
OBJECTIVE_FIELDS = {"counterfact": ("efficacy", "paraphrase", "neighborhood"),
                    "generation": ("gen_efficacy", "gen_paraphrase", "neighborhood")}


def check_objective(name: str) -> str:
    """`name` when it is an objective of `OBJECTIVES`; otherwise a ValidationError naming the choices."""
    if name not in OBJECTIVES:
        raise ValidationError(f"--objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return name


def objective(scores: Sequence[TrialScores], kind: str = "counterfact") -> float:
    """The harmonic mean of the mean success rates `kind` reads: CounterFact's efficacy, paraphrase and
    neighbourhood ("counterfact"), or generation efficacy, generation paraphrase and neighbourhood ("generation")."""
    parts = []
    for name in OBJECTIVE_FIELDS[check_objective(kind)]:
        vals = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        if vals:
            parts.append(float(np.mean(vals)))
    value = harmonic_mean(parts)
    return 0.0 if value is None else value


def schedule(n_configs: int, n_facts: int, budget: int) -> list[tuple[int, int]]:
    """Successive halving rounds [(configurations, facts each), ...] that fit `budget` trial edits.

    Rounds keep ceil(1/ETA) of the configurations until at most ETA remain; the
    facts grow ETA-fold from the largest start that fits the budget, capped at
    `n_facts` (the last round uses all of them when the budget allows).
    """
    if n_configs < 1 or n_facts < 1:
        raise ValidationError("nothing to search: no configuration or no calibration fact")
    ks = [n_configs]
    while ks[-1] > ETA:
        ks.append(math.ceil(ks[-1] / ETA))

    def plan(n0: int) -> list[tuple[int, int]]:
        ns = [min(n_facts, n0 * ETA ** r) for r in range(len(ks))]
        ns[-1] = max(ns[-1], min(n_facts, n0 * ETA ** (len(ks) - 1)))
        return list(zip(ks, ns))

    def cost(rounds: list[tuple[int, int]]) -> int:
        return sum(k * (n - prev) for (k, n), prev in zip(rounds, [0] + [n for _, n in rounds[:-1]]))

    if cost(plan(1)) > budget:
        raise ValidationError(
            f"--budget {budget} trial edits is too small for one trial of each configuration: the smallest "
            f"search ({n_configs} configurations, successive halving) needs {cost(plan(1))}")
    n0 = 1
    while n0 < n_facts and cost(plan(n0 + 1)) <= budget:
        n0 += 1
    rounds = plan(n0)
    # Spend what is left on the last round's facts.
    k_last, n_last = rounds[-1]
    spare = budget - cost(rounds)
    rounds[-1] = (k_last, min(n_facts, n_last + spare // k_last))
    return rounds


def score_interval(scores: Sequence[TrialScores], seed: int = 0, n: int = N_BOOTSTRAP,
                   kind: str = "counterfact") -> Interval:
    """The objective `kind` over facts and its 95% bootstrap interval (facts resampled)."""
    if not scores:
        return Interval(None, None, None, 0)
    rng = np.random.default_rng(seed)
    boots = [objective([scores[i] for i in rng.integers(0, len(scores), len(scores))], kind) for _ in range(n)]
    return Interval(objective(scores, kind), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)),
                    len(scores))


def _margin(effects: Sequence[float], candidates: Sequence[int]) -> float:
    top = sorted((effects[l] for l in candidates), reverse=True)
    return top[0] - top[1] if len(top) > 1 else math.inf


def calibrate_threshold(effects: Sequence[Sequence[float]], results: Sequence[dict[int, TrialScores]],
                        candidates: Sequence[int], fallback: int, kind: str = "counterfact") -> float:
    """The margin threshold of the traced rule (`choose.LayerRule`) that maximises the objective on calibration
    facts. Ties go to the larger threshold (more facts at the validated dataset layer)."""
    options = sorted({0.0, math.inf} | {_margin(e, candidates) for e in effects})
    best, best_t = -1.0, math.inf
    for t in options:
        rule = LayerRule("traced", fallback, tuple(candidates), t, "calibration")
        value = objective([r[rule.traced(e).layer] for e, r in zip(effects, results)], kind)
        if value > best + 1e-12 or (abs(value - best) <= 1e-12 and t > best_t):
            best, best_t = value, t
    return best_t


# ---- the search --------------------------------------------------------------------------


def known_facts(model, tok, facts: Sequence[Fact], chat_template: bool = False) -> list[Fact]:
    """The facts whose target's first token is the model's top-1 after the prompt; a ValidationError when the model
    gives NaN or inf for any of them."""
    from .scoring import score_targets

    with_target = [f for f in facts if f.target]
    scores = score_targets(model, tok, [(f.prompt, f.target) for f in with_target], chat_template=chat_template)
    bad = [f for f, s in zip(with_target, scores) if not math.isfinite(s.nll)]
    if bad:
        # Otherwise a NaN model would read as one that knows no fact.
        raise ValidationError(
            f"the model gives non-finite outputs (NaN or inf) for {len(bad)} of {len(with_target)} facts (e.g. fact "
            f"{bad[0].id!r}, {bad[0].prompt!r}): check its weights, and --dtype (float16 overflows: load it with "
            f"--dtype float32 or bfloat16)")
    return [f for f, s in zip(with_target, scores) if s.predicted[0] == s.target_ids[0]]


def usable_facts(model, tok, facts: Sequence[Fact], test_fraction: float, seed: int = 0,
                 facts_file: str = "", chat_template: bool = False) -> list[Fact]:
    """The known facts the search works on; a ValidationError when there are none or too few to split (cheap:
    one forward pass per fact, so callers check it before computing statistics)."""
    known = known_facts(model, tok, facts, chat_template)
    if not known:
        raise ValidationError(f"no fact of {facts_file or 'the facts'} is known by the model ({len(facts)} facts; "
                              f"none has the target's first token as the model's top-1): nothing to validate on")
    split_by_subject(known, test_fraction, seed)  # too few facts: say so before anything else
    return known


def _mode(name: str, scores: Sequence[TrialScores], layers: Sequence[int], seed: int) -> Mode:
    counts: dict[str, int] = {}
    for l in layers:
        counts[str(l)] = counts.get(str(l), 0) + 1
    return Mode(name, bootstrap([s.efficacy for s in scores], seed), bootstrap([s.paraphrase for s in scores], seed),
                bootstrap([s.neighborhood for s in scores], seed), score_interval(scores, seed), counts,
                bootstrap([s.gen_efficacy for s in scores], seed), bootstrap([s.gen_paraphrase for s in scores], seed),
                score_interval(scores, seed, kind="generation"))


@dataclass
class _Trials:
    """Trial edits with a cache: a configuration is trial-edited once per fact, whatever asks for it."""

    model: Any
    tok: Any
    base: Any
    editor: Editor | None
    bar: Any
    chat_template: bool = False
    cache: dict = field(default_factory=dict)
    count: int = 0

    def hparams(self, config: Config) -> Any:
        from .hparams import with_layer

        return with_layer(replace(self.base, **config.setting.overrides()), config.layer)

    def run(self, config: Config, fact: Fact) -> TrialScores:
        # A fact without its paraphrases shares the key: the scores it is judged on are the same.
        key = (config, fact.id + "\x00" + fact.prompt)
        if key not in self.cache:
            self.cache[key] = trial_edit(self.model, self.tok, fact, self.hparams(config), self.editor,
                                         self.chat_template)
            self.count += 1
            self.bar.update(1)
        return self.cache[key]


def _prepare(model, tok, facts: list[Fact], test_fraction: float, seed: int, facts_file: str, n_calibration: int,
             n_test: int, log: Callable[[str], None],
             chat_template: bool) -> tuple[list[Fact], list[Fact], list[Fact], bool]:
    """(known, calibration, test, requests built): the known facts, as edit requests, split by subject."""
    from .requests import counterfactual_requests, needs_requests

    known = usable_facts(model, tok, facts, test_fraction, seed, facts_file, chat_template)
    built = needs_requests(known)
    if built:
        # Requests are built from every known fact, so neighbours and targets come from the whole set.
        known = counterfactual_requests(known, seed=seed)
        log(f"{sum(1 for f in facts if not f.target_new)} fact(s) without target_new: built counterfactual "
            f"requests from the facts themselves (target_new = another subject's answer for the same relation; "
            f"neighbours = other subjects with the same answer; paraphrases = the relation's other templates)")
    calib, test = split_by_subject(known, test_fraction, seed)
    calib, test = calib[:n_calibration], test[:n_test]
    log(f"{len(known)} known fact(s) of {len(facts)}: {len(calib)} calibration, {len(test)} test (disjoint subjects)")
    return known, calib, test, built


def prepare_traced(model, tok, facts: list[Fact], test_fraction: float, seed: int, facts_file: str,
                   n_calibration: int, n_test: int, log: Callable[[str], None], trace_settings: TraceSettings,
                   arch: Any, progress: bool) -> tuple[list[Fact], list[Fact], list[Fact], bool, list, Any]:
    """(known, calibration, test, requests built, the calibration facts' locate pairs, their dataset layer choice):
    `_prepare`, then the calibration facts traced. Both searches (ROME's layer, MEMIT's window) start here."""
    from .choose import choose_dataset_layer
    from .locate import locate

    known, calib, test, built = _prepare(model, tok, facts, test_fraction, seed, facts_file, n_calibration, n_test,
                                         log, trace_settings.chat_template)
    located = locate(model, tok, calib, trace_settings, progress=progress, arch=arch)
    if not located:
        raise ValidationError("no calibration fact could be traced")
    return known, calib, test, built, located, choose_dataset_layer([r for r, _ in located])


def _search(trials: _Trials, configs: list[Config], calib: list[Fact], rounds: list[tuple[int, int]],
            dataset_layer: int, kind: str = "counterfact") -> tuple[Config, list[dict[str, Any]]]:
    """Successive halving over the configurations by the objective `kind`; (the best, the log of every round)."""
    alive, round_log = configs, []
    for r, (k, n) in enumerate(rounds):
        alive = alive[:k]
        values = {c: objective([trials.run(c, f) for f in calib[:n]], kind) for c in alive}
        # Best first; ties go to the cheaper setting, then to the dataset layer.
        alive = sorted(alive, key=lambda c: (-round(values[c], 9), c.setting.cost,
                                             abs(c.layer - dataset_layer), c.layer))
        round_log.append({"round": r, "configurations": len(values), "facts": n,
                          "best": [{"config": c.label(), "objective": values[c]} for c in alive[:5]]})
    return alive[0], round_log


def _test_modes(trials: _Trials, chosen: Config, rule: LayerRule, test: list[Fact], effects_of: dict[str, Any],
                seed: int, kind: str = "counterfact") -> tuple[Mode, ...]:
    """The chosen configuration on the test facts, by every layer mode of `rule` and the candidates' oracle."""
    rows: dict[str, tuple[list[TrialScores], list[int]]] = {n: ([], []) for n in ("fixed", "traced", "validated",
                                                                               "best")}

    def add(name: str, at: dict[int, TrialScores], layer: int) -> None:
        rows[name][0].append(at[layer])
        rows[name][1].append(layer)

    for f in test:
        effects = effects_of[f.id]
        at = {l: trials.run(Config(l, chosen.setting), f) for l in rule.candidates}
        add("fixed", at, rule.fallback)
        add("traced", at, rule.traced(effects).layer)
        # The validated pick is judged on the edit prompt and neighbours; its paraphrases are reported.
        edit_only = replace(f, rephrase_prompts=())
        pick = rule.pick({l: trials.run(Config(l, chosen.setting), edit_only) for l in rule.tries(effects)})
        add("validated", at, pick.layer)
        add("best", at, max(rule.candidates, key=lambda l: (objective([at[l]], kind), at[l].efficacy_magnitude or 0.0)))
    names = {"fixed": "fixed", "traced": "traced", "validated": "validated",
             "best": "sweep-best (candidates, oracle)"}
    return tuple(_mode(names[k], *rows[k], seed) for k in rows)


def run_validation(model, tok, facts: Sequence[Fact], base_hparams, *, facts_file: str = "", model_name: str = "",
                   test_fraction: float = 0.5, budget: int = 300, n_calibration: int = 40, n_test: int = 40,
                   grid: Sequence[Setting] | None = None, seed: int = 0,
                   trace_settings: TraceSettings = TraceSettings(), editor: Editor | None = None,
                   arch: Any = None, progress: bool = True, log: Callable[[str], None] = print,
                   objective_name: str = "counterfact") -> Validation:
    """The validated search (module docstring); `base_hparams` supplies every field the search does not set.

    `editor` is the pipeline's editor object (built-in ROME by default); `arch`
    is the model's resolved `Arch` (or what `arch.arch_for` takes). Every prompt is read as
    `trace_settings.chat_template` says: traced, trial-edited and scored alike.
    """
    from tqdm.auto import tqdm

    from .arch import arch_for
    from .locate import locate
    from .models import fingerprint

    t0 = time.perf_counter()
    kind = check_objective(objective_name)
    grid = list(grid or default_grid())
    arch = arch_for(model, arch)
    facts = list(facts)
    chat = trace_settings.chat_template
    if editor is not None:
        from .editors import check_editor

        check_editor(editor, chat)
    known, calib, test, built, located, d = prepare_traced(model, tok, facts, test_fraction, seed, facts_file,
                                                           n_calibration, n_test, log, trace_settings, arch,
                                                           progress)
    dataset_layer, candidates = shortlist(d.mean_effects, arch.n_layers)
    log(f"traced: dataset layer {dataset_layer}; candidates {candidates}")
    configs = [Config(l, s) for l in candidates for s in grid]
    rounds = schedule(len(configs), len(calib), budget)
    planned = sum(k * (n - p) for (k, n), p in zip(rounds, [0] + [n for _, n in rounds[:-1]]))
    bar = tqdm(total=planned, desc="validate", unit="trial", disable=not progress)
    trials = _Trials(model, tok, base_hparams, editor, bar, chat)
    try:
        chosen, round_log = _search(trials, configs, calib, rounds, dataset_layer, kind)
        search_trials = trials.count
        bar.total = bar.n + len(calib) * len(candidates) + len(test) * (len(candidates) + 1)
        bar.refresh()
        # Calibration of the traced rule: the chosen setting at every candidate layer.
        calib_results = [{l: trials.run(Config(l, chosen.setting), f) for l in candidates} for f in calib]
        threshold = calibrate_threshold([r.effects for r, _ in located], calib_results, candidates, chosen.layer,
                                        kind)
        rule = LayerRule("traced", chosen.layer, tuple(candidates), threshold, "calibration facts")
        # Test facts, never seen by any choice above.
        test_located = locate(model, tok, test, trace_settings, progress=False, arch=arch)
        modes = _test_modes(trials, chosen, rule, test, {c.fact_id: r.effects for r, c in test_located}, seed, kind)
    finally:
        bar.close()
    return Validation(
        model=model_name, facts_file=str(facts_file), n_facts=len(facts), n_known=len(known), requests_built=built,
        n_calibration=len(calib), n_test=len(test), dataset_layer=dataset_layer,
        mean_effects=tuple(float(x) for x in d.mean_effects), candidates=tuple(candidates), grid=tuple(grid),
        rounds=tuple(round_log), search_trials=search_trials, chosen=chosen, threshold=threshold, test=modes,
        budget=budget, trials=trials.count, seconds=time.perf_counter() - t0, seed=seed,
        test_fraction=test_fraction,
        mom2={"mom2_adjustment": base_hparams.mom2_adjustment, "mom2_dataset": base_hparams.mom2_dataset,
              "mom2_n_samples": base_hparams.mom2_n_samples},
        calibration_ids=tuple(f.id for f in calib), test_ids=tuple(f.id for f in test),
        trace_settings=trace_settings, model_fingerprint=fingerprint(model), objective_name=kind,
    )


# ---- per-fact layers for `edit` and `eval --layers validated` ----------------------------------------------


def validated_layers(model, tok, facts: Sequence[Fact], hparams, traces: Sequence[Any], rule: LayerRule, *,
                     editor: Editor | None = None, progress: bool = False,
                     chat_template: bool = False) -> list[LayerDecision]:
    """The `--layers validated` decision of every fact (aligned with `facts` by position, as `traces`): trial edits
    at `rule.tries` of its traced effects, the best on the edit prompt and neighbourhood kept (`rule.pick`)."""
    from tqdm.auto import tqdm

    from .hparams import with_layer

    if len(traces) != len(facts):
        raise ValueError(f"{len(traces)} traces for {len(facts)} facts (they are matched by position)")
    out = []
    for f, trace in tqdm(list(zip(facts, traces)), desc="layers (validated)", unit="fact", disable=not progress):
        if trace is None:
            raise ValueError(f"fact {f.id!r} ({f.prompt!r}) has no trace")
        # Paraphrases are held apart: the pick sees the edit prompt and the neighbourhood only.
        edit_only = replace(f, rephrase_prompts=())
        out.append(rule.pick({l: trial_edit(model, tok, edit_only, with_layer(hparams, l), editor, chat_template)
                              for l in rule.tries(trace.effects)}))
    return out
