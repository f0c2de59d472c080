"""The configure stage: EasyEdit ROME hyperparameters for a model from its facts, traced only or validated by
trial edits, and the validation record and report written beside the YAML (`rome-locate hparams`)."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .records import Record
from .choose import VALIDATED_TOP_K
from .validation_records import OBJECTIVES, Validation


@dataclass(frozen=True)
class HParamsJob(Record):
    """What `rome-locate hparams` is asked to write, and how it validates."""

    facts_file: str
    output: str
    model_path: str
    model_name: str | None = None  # the YAML's model_name (default: the absolute model path)
    device_field: int | str = "cpu"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    set_items: tuple[str, ...] = ()
    layer: int | None = None  # a layer given by hand: no tracing
    validate: bool = True
    test_fraction: float = 0.5
    budget: int = 300
    grid: str = "default"
    n_calibration: int = 40
    n_test: int = 40
    stats_dir: str = "./data/stats"
    corpus: str | None = None
    self_sample: int = 3000
    seed: int = 0
    quiet: bool = False
    objective: str = "counterfact"  # what the search optimises (validation_records.OBJECTIVES)
    alg: str = "ROME"  # ROME (one layer), MEMIT or AlphaEdit (a window: `configure_window`)
    trial_batch: int = 10  # MEMIT/AlphaEdit: calibration facts written at once in the search's rounds
    max_batch: int = 100  # MEMIT/AlphaEdit: facts at once in the finals and the test
    max_window: int = 5  # MEMIT/AlphaEdit: the largest window tried


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE ...` as plain YAML values (tags are never constructed)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--set {item!r}: the value of {key} is not a plain YAML value ({problem}); "
                             f"quote it or write it as e.g. {key}=0.1 or {key}=[5,10]") from None
    return overrides


def hparams_device(hparams_device_flag: str | None, device: str | None) -> int | str:
    """EasyEdit's `device` field: --hparams-device as given, else from --device ('cpu' or a CUDA index)."""
    if hparams_device_flag is not None:
        return int(hparams_device_flag) if hparams_device_flag.isdigit() else hparams_device_flag
    from .models import default_device

    device = device or default_device()
    if device.startswith("cuda"):
        return int(device.partition(":")[2] or 0)  # EasyEdit's device field is a CUDA index
    return device


def check_job(job: HParamsJob, torchrun: bool = False) -> None:
    """Every input and output of the job, checked before the model is loaded."""
    from .hparams import check_hparams_output

    check_hparams_output(job.output)
    if job.alg not in ("ROME", "MEMIT", "AlphaEdit"):
        raise ValueError(f"--alg must be ROME, MEMIT or AlphaEdit, got {job.alg!r}")
    if job.alg != "ROME" and not job.validate:
        raise ValueError(f"--alg {job.alg} writes a window chosen by trial edits of batches: drop "
                         f"{'--layer' if job.layer is not None else '--no-validate'} (a hand-written window goes "
                         f"straight into the YAML's layers)")
    if job.alg != "ROME" and job.max_window < 1:
        raise ValueError(f"--max-window must be >= 1 layer, got {job.max_window}")
    if job.alg != "ROME" and not 1 <= job.trial_batch <= job.max_batch:
        raise ValueError(f"--trial-batch and --max-batch need 1 <= --trial-batch <= --max-batch, got "
                         f"{job.trial_batch} and {job.max_batch}")
    if not job.validate:
        return
    from .validate import check_objective

    check_objective(job.objective)
    if job.budget < 1:
        raise ValueError(f"--budget must be >= 1 trial edit, got {job.budget}")
    if not 0 < job.test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {job.test_fraction}")
    for flag, n in (("--calibration-facts", job.n_calibration), ("--test-facts", job.n_test),
                    ("--self-sample", job.self_sample)):
        if n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    if job.corpus is not None and not Path(job.corpus).is_file():
        raise FileNotFoundError(f"--corpus {job.corpus}: no such file")
    if torchrun:
        # The search is sequential (each round depends on the last): one process runs it.
        raise ValueError("the validated search runs in one process: run `hparams` without torchrun, "
                         "or pass --no-validate to trace the facts across the ranks")
    check_validation_outputs(job.output)


def _footer(job: HParamsJob, lm) -> str:
    text = f"\nmodel: {job.model_path} ({lm.arch.n_layers} layers)"
    return text + ("\nset by hand (--set): " + " ".join(job.set_items) if job.overrides else "")


def write_traced(job: HParamsJob, lm, pairs: Sequence[Any], settings) -> Path:
    """The trace-only YAML: the dataset's editable layer of largest mean effect (or the given layer), ROME's
    default settings."""
    from .choose import choose_dataset_layer, dataset_edit_layer
    from .hparams import bind_model, dataset_header, generate_hparams, write_hparams

    if job.layer is not None:
        layer = job.layer
        header = f"Written by `rome-locate hparams` with --layer {layer} (not traced).\nfacts: {job.facts_file}"
    else:
        if not pairs:
            raise ValueError(f"no fact of {job.facts_file} could be traced")
        d = choose_dataset_layer([r for r, _ in pairs])
        layer = dataset_edit_layer(d.mean_effects)  # never the last layer, where ROME edits nothing
        shown = dict(kind=settings.kind, samples=settings.samples, window=pairs[0][0].window, noise=settings.noise,
                     noise_level=f"{pairs[0][0].noise:.4g}", noise_draws=settings.noise_draws,
                     answer=settings.answer, seed=settings.seed,
                     **({"chat_template": True} if settings.chat_template else {}))
        header = dataset_header(job.facts_file, d.n_facts, shown, d.mean_effects, d.histogram, layer, d.kind)
        print("layer  facts  mean_IE")
        for i, (n, m) in enumerate(zip(d.histogram, d.mean_effects)):
            print(f"{i:5d}  {n:5d}  {m:+.4f}")
    h = generate_hparams(lm.model, lm.arch, layer, job.model_name or job.model_path, device=job.device_field,
                         **job.overrides)
    if job.model_name is None:  # an absolute model_name and stats_dir: the YAML works from any folder
        h = bind_model(h, job.model_path)
    path = write_hparams(h, job.output, header=header + _footer(job, lm))
    print(f"layer {layer}; wrote {path}")
    return path


def _validation_base(job: HParamsJob, lm, chat_template: bool = False) -> Any:
    """The hyperparameters the search starts from, with mom2 statistics for every layer (computed if missing;
    self-sampled ones through the chat template with `chat_template`, a corpus as plain text)."""
    from .hparams import DEFAULTS, bind_model, generate_hparams
    from .stats import compute_mom2, ensure_self_sampled, missing_mom2_layers, self_sample_dataset, stats_model_name

    model, tok, arch = lm.model, lm.tok, lm.arch
    mom2 = (dict(mom2_dataset="corpus", mom2_n_samples=DEFAULTS["mom2_n_samples"]) if job.corpus else
            dict(mom2_dataset=self_sample_dataset(chat_template), mom2_n_samples=job.self_sample))
    base = generate_hparams(model, arch, 0, job.model_name or job.model_path, device=job.device_field,
                            **{"mom2_adjustment": True, "stats_dir": job.stats_dir, **mom2, **job.overrides})
    if job.model_name is None:
        # Absolute model_name and stats_dir, as the trace-only YAML has (bind_model), so it works from any folder.
        # The statistics still go where --stats-dir (or --set stats_dir) says: bind_model's search next to the
        # weights is for reading a YAML, not for choosing where to write new files.
        base = dataclasses.replace(bind_model(base, job.model_path),
                                   stats_dir=str(Path(job.overrides.get("stats_dir", job.stats_dir)).resolve()))
    layers = list(range(arch.n_layers))
    if job.corpus:
        todo = missing_mom2_layers(model, base, layers)
        if todo:
            compute_mom2(model, tok, arch, todo, job.corpus, base.stats_dir,
                         model_name=stats_model_name(model) or Path(job.model_path).name, mom2_dataset="corpus",
                         n_samples=DEFAULTS["mom2_n_samples"], dtype=base.mom2_dtype, progress=not job.quiet)
        return base
    return ensure_self_sampled(model, tok, base, layers, n_samples=job.self_sample,
                               notice=lambda m: print(m, file=sys.stderr), arch=arch, chat_template=chat_template)


def write_validated(job: HParamsJob, lm, facts: Sequence[Any], settings) -> Path:
    """`hparams` with validation: statistics, the search, then the YAML and its validation files."""
    from .hparams import with_layer, write_hparams
    from .validate import run_validation, usable_facts
    from .validation_records import GRIDS

    usable_facts(lm.model, lm.tok, facts, job.test_fraction, job.seed, job.facts_file,  # before any statistics
                 settings.chat_template)
    base = _validation_base(job, lm, settings.chat_template)
    v = run_validation(lm.model, lm.tok, facts, base, facts_file=job.facts_file, model_name=job.model_path,
                       test_fraction=job.test_fraction, budget=job.budget, n_calibration=job.n_calibration,
                       n_test=job.n_test, seed=job.seed, trace_settings=settings, grid=GRIDS[job.grid](),
                       arch=lm.arch, progress=not job.quiet, log=lambda m: print(m, file=sys.stderr),
                       objective_name=job.objective)
    h = with_layer(dataclasses.replace(base, **v.chosen.setting.overrides()), v.chosen.layer)
    path = write_hparams(h, job.output, header=header(v) + _footer(job, lm))
    j, m = write_validation(v, path)
    print(f"verdict: {verdict(v)}")
    for mode in v.test:
        print(f"  {mode.name:34s} efficacy {mode.efficacy.text()}  paraphrase {mode.paraphrase.text()}  "
              f"neighbourhood {mode.neighborhood.text()}  gen efficacy {_text(mode.gen_efficacy)}  "
              f"gen paraphrase {_text(mode.gen_paraphrase)}")
    print(f"layer {v.chosen.layer}; wrote {path}, {j} and {m} ({v.trials} trial edits, {v.seconds:.0f} s)")
    return path


# ---- writing ---------------------------------------------------------------------------------

TARGETS = {"efficacy": 0.95, "paraphrase": 0.85, "neighborhood": 0.90}
MD_TITLE = "# Validated ROME hyperparameters"  # validation.md's first line: how rome-locate knows its own file
MD_TITLES = tuple(f"# Validated {alg} hyperparameters" for alg in ("ROME", "MEMIT", "AlphaEdit"))


def _text(iv: Any) -> str:
    # Records written before the generation metrics have none.
    return "n/a" if iv is None else iv.text()


def target_state(figures: Any, targets: dict[str, float]) -> str:
    """"meets the targets", or "MISSES" and each mean below its target (with a third decimal where two would
    print the mean equal to the target it misses)."""
    misses = []
    for k, t in targets.items():
        mean = getattr(figures, k).mean
        if mean is not None and mean < t:
            misses.append(f"{k} {mean:.{2 if round(mean, 2) < t else 3}f} < {t:.2f}")
    return "meets the targets" if not misses else "MISSES " + ", ".join(misses)


def verdict(v: Validation) -> str:
    """One line: the chosen configuration and whether its test figures reach the targets."""
    m = v.mode("fixed")
    state = target_state(m, TARGETS)
    return (f"layer {v.chosen.layer} ({v.chosen.setting.label()}): on {v.n_test} test facts "
            f"efficacy {m.efficacy.text()}, paraphrase {m.paraphrase.text()}, neighbourhood {m.neighborhood.text()}"
            f" - {state} (efficacy >= {TARGETS['efficacy']}, paraphrase >= {TARGETS['paraphrase']}, "
            f"neighbourhood >= {TARGETS['neighborhood']})")


def header(v: Validation) -> str:
    """The YAML comment header of validated hyperparameters."""
    lines = [
        "Generated by `rome-locate hparams` (validated): layer and v* settings chosen by trial edits on",
        f"{v.n_calibration} calibration facts, measured on {v.n_test} test facts with other subjects.",
        f"facts: {v.facts_file} ({v.n_facts} facts, {v.n_known} known"
        + ("; counterfactual requests built from them)" if v.requests_built else ")"),
        f"trace: dataset layer {v.dataset_layer}; candidates {list(v.candidates)}; mean effect per layer: "
        + " ".join(f"{i}:{e:.4f}" for i, e in enumerate(v.mean_effects)),
        f"grid: {len(v.grid)} settings x {len(v.candidates)} layers; successive halving "
        + " -> ".join(f"{r['configurations']}x{r['facts']}" for r in v.rounds)
        + f" (configurations x facts): {v.search_trials} trial edits (budget {v.budget}); "
        f"{v.trials - v.search_trials} more to calibrate the traced rule and measure the test facts; "
        f"{v.seconds:.0f} s in all",
        f"objective ({v.objective_name}): {OBJECTIVES[v.objective_name]}",
        f"chosen: {v.chosen.label()}",
        f"mom2: {v.mom2['mom2_dataset']} ({v.mom2['mom2_n_samples']} texts)",
        "test (95% bootstrap intervals): " + verdict(v),
        f"traced rule: margin threshold {v.threshold:.4g} (below it, the fact goes to layer {v.chosen.layer})",
        f"details: the .validation.json and .validation.md files beside this one (seed {v.seed}, "
        f"test fraction {v.test_fraction})",
    ]
    return "\n".join(lines)


def markdown(v: Validation) -> str:
    """validation.md: the verdict first, then the test comparison, the search and the grid."""
    out = [f"{MD_TITLE}: {v.model}", "", f"**Verdict:** {verdict(v)}", "",
           f"Objective ({v.objective_name}, what the search optimised): {OBJECTIVES[v.objective_name]}.", "",
           f"## Test facts ({v.n_test}, subjects never used in the search; 95% bootstrap intervals)", "",
           "Both objectives' figures: `score` is CounterFact's (teacher-forced efficacy, paraphrase, "
           "neighbourhood), `gen score` the generation one (generation efficacy and paraphrase: greedy "
           "continuations that start with target_new; neighbourhood).", "",
           "| layer choice | efficacy | paraphrase | neighbourhood | score | gen efficacy | gen paraphrase | "
           "gen score | layers (facts) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in v.test:
        out.append(f"| {m.name} | {m.efficacy.text()} | {m.paraphrase.text()} | {m.neighborhood.text()} | "
                   f"{m.score.text()} | {_text(m.gen_efficacy)} | {_text(m.gen_paraphrase)} | {_text(m.gen_score)} | "
                   f"{', '.join(f'{k}:{n}' for k, n in sorted(m.layers.items()))} |")
    out += ["", "- fixed: every fact at the chosen layer.",
            f"- traced: the fact's traced argmax among the candidates {list(v.candidates)}, or the chosen layer "
            f"when its trace margin is below {v.threshold:.4g} (calibrated on the calibration facts).",
            f"- validated: trial edits at the chosen layer and the fact's top-{VALIDATED_TOP_K - 1} other traced "
            "candidate(s), the best on the edit prompt and neighbourhood kept (its paraphrases are only reported).",
            "- sweep-best: the best candidate layer per fact judged on all its test prompts (an oracle, not a "
            "method).", "",
            "## Search", "",
            f"{v.n_known} known facts of {v.n_facts} in `{v.facts_file}`"
            + (" (counterfactual requests built from the facts themselves)" if v.requests_built else "")
            + f"; {v.n_calibration} calibration facts; dataset layer {v.dataset_layer}, candidates "
            f"{list(v.candidates)}; search {v.search_trials} trial edits (budget {v.budget}), "
            f"{v.trials} with the traced-rule calibration and the test measurements, in {v.seconds:.0f} s.", "",
            "| round | configurations | facts | best (objective) |", "|---|---|---|---|"]
    for r in v.rounds:
        best = r["best"][0]
        out.append(f"| {r['round']} | {r['configurations']} | {r['facts']} | {best['config']} "
                   f"({best['objective']:.3f}) |")
    out += ["", f"Chosen: **{v.chosen.label()}**", "", "Grid:", ""]
    out += [f"- {s.label()}" for s in v.grid]
    return "\n".join(out) + "\n"


def validation_paths(yaml_path) -> tuple[Any, Any]:
    """(`<stem>.validation.json`, `<stem>.validation.md`): where the validation of a YAML is written."""
    from .choose import validation_record_path

    return validation_record_path(yaml_path), Path(f"{Path(yaml_path).with_suffix('')}.validation.md")


def check_validation_outputs(yaml_path) -> None:
    """Fail before any work when a validation file beside `yaml_path` exists and rome-locate did not write it."""
    from .files import check_output_file

    j, m = validation_paths(yaml_path)
    for path in (j, m):
        check_output_file(path, f"the validation file beside {yaml_path}")
    ours = True
    if j.exists():
        try:
            objective = str(json.loads(j.read_text(encoding="utf-8")).get("objective", ""))
            ours = objective.startswith(tuple(text.partition(":")[0] for text in OBJECTIVES.values()))
        except (ValueError, UnicodeDecodeError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(f"{j} exists and was not written by rome-locate hparams; rome-locate never "
                                  f"writes over it: choose another -o")
    if m.exists():
        try:
            ours = m.read_text(encoding="utf-8").startswith(MD_TITLES)
        except UnicodeDecodeError:
            ours = False
        if not ours:
            raise FileExistsError(f"{m} exists and was not written by rome-locate hparams; rome-locate never "
                                  f"writes over it: choose another -o")


def write_validation(v: Validation, yaml_path) -> tuple[Any, Any]:
    """Write `<stem>.validation.json` and `<stem>.validation.md` beside the YAML; returns their paths."""
    from .files import write_json, write_text

    j, m = validation_paths(yaml_path)
    return write_json(j, v.to_json()), write_text(m, markdown(v))


