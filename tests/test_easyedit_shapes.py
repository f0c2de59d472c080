"""Issue 20: facts in every EasyEdit shape load whole, and give the same per-fact metrics through `rome-locate edit
--editor easyedit` as through EasyEdit's own dataset classes into the plugin's BaseEditor.

The fixtures are three CounterFact cases of the shipped GPT-2 fact model's world in each shape, written by
tests/fixtures/make_fixtures.py (its docstring says what each shape holds)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from rome_locate.facts import load_facts

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EASYEDIT_SHAPES = ("knowedit_counterfact.json", "knowedit_zsre.json", "knowedit_recent.json",
                   "knowedit_wikibio.json", "zsre.json", "zsre_noportability.json", "easyedit_counterfact.json",
                   "own.jsonl")
# Fields that are not part of a fact: ZsRE's derived `cond` and the original model's `pred`, ids.
NOT_FACT = {"cond", "pred", "case_id", "relation_id", "id", "key"}


def _script():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def test_fixtures_are_what_the_script_writes(tmp_path):
    written = _script().write(tmp_path)
    assert {p.name for p in written} == {p.name for p in FIXTURES.iterdir() if p.suffix in (".json", ".jsonl")}
    for path in written:
        assert path.read_bytes() == (FIXTURES / path.name).read_bytes(), path.name


def _strings(value: Any, field: str = "") -> list[str]:
    """Every string of a record, but those of fields that are not part of a fact."""
    if field in NOT_FACT:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, k)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, field)]
    return []


def _n_probes(group: Any) -> dict[str, int]:
    """Probes per key of a record's `locality` or `portability`, in any shape."""
    if isinstance(group, list):  # our own form
        return {k: sum(1 for p in group if p["key"] == k) for k in {p["key"] for p in group}}
    return {k: len(v) if isinstance(v, list) else 1 for k, v in (group or {}).items()}


@pytest.mark.parametrize("name", EASYEDIT_SHAPES)
def test_every_prompt_and_answer_is_kept(name):
    raw = _records(FIXTURES / name)
    facts = load_facts(FIXTURES / name)
    assert len(facts) == len(raw) == 3
    for rec, fact in zip(raw, facts):
        kept = {fact.prompt, fact.subject, fact.target, fact.target_new, *fact.rephrase_prompts, *fact.target_aliases}
        for probe in fact.locality + fact.portability:
            kept |= {probe.prompt, probe.answer, *probe.aliases}
        missing = [s for s in _strings(rec) if s not in kept and s.strip() not in kept]
        assert not missing, (name, missing)
        # No probe merged or dropped, keys as the file names them (ZsRE's and EasyEdit's CounterFact single
        # locality and portability questions take the keys EasyEdit's scripts give them).
        if "locality" in rec or "portability" in rec:
            for group in ("locality", "portability"):
                if group in rec and not (name.startswith("zsre") and group == "portability"):
                    assert {k: n for k, n in _n_probes(rec[group]).items()} == {
                        k: sum(1 for p in getattr(fact, group) if p.key == k) for k in fact.keys(group)}, name
        if name.startswith("zsre"):
            assert [p.key for p in fact.locality] == ["neighborhood"] and rec["loc"] == fact.locality[0].prompt
            assert [p.key for p in fact.portability] == (["one_hop"] if "portability" in rec else [])
    assert all(f.target_new for f in facts)


# ---- the same metrics through rome-locate and through EasyEdit's dataset classes -------------------------------

try:
    from rome_locate.easyedit import import_easyedit

    import_easyedit()
    EASYEDIT_ERROR = None
except ImportError as exc:  # the parity tests below need EasyEdit; the loading tests above do not
    if os.environ.get("CI"):
        raise
    EASYEDIT_ERROR = str(exc)

needs_easyedit = pytest.mark.skipif(EASYEDIT_ERROR is not None, reason=f"EasyEdit is not importable: {EASYEDIT_ERROR}")
# EasyEdit's KnowEditDataset fields and the KnowEdit keys they hold.
KNOWEDIT_KEYS = {"portability_r": "Reasoning", "portability_s": "Subject_Aliasing",
                 "portability_l": "Logical_Generalization", "locality_rs": "Relation_Specificity",
                 "locality_f": "Forgetfulness"}
TOL = 1e-6


def _first(answer: Any) -> Any:
    # run_knowedit_llama2.py's ground_truth[0][0] (counterfact, recent) and ground_truth[0] (zsre): the first string.
    return _first(answer[0]) if isinstance(answer, list) else answer


def _inputs(rows: list[dict[str, list[tuple[str, str]]]]) -> dict[str, dict[str, list]]:
    """EasyEdit's locality_inputs / portability_inputs: per key, each request's prompts and answers (None: none)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: {"prompt": [[p for p, _ in row[k]] if k in row else None for row in rows],
                "ground_truth": [[a for _, a in row[k]] if k in row else None for row in rows]} for k in keys}


def _knowedit_requests(path: Path) -> dict[str, Any]:
    """edit() arguments from KnowEditDataset, as run_knowedit_llama2.py builds them, with every probe of a key."""
    from easyeditor import KnowEditDataset

    items = list(KnowEditDataset(str(path)))
    groups: dict[str, list[dict[str, list[tuple[str, str]]]]] = {"locality": [], "portability": []}
    for item in items:
        for group in groups:
            groups[group].append({KNOWEDIT_KEYS[f]: [(p["prompt"], _first(p["ground_truth"])) for p in item[f]]
                                  for f in KNOWEDIT_KEYS if f.startswith(group) and item.get(f)})
    return dict(prompts=[i["prompt"] for i in items], target_new=[i["target_new"] for i in items],
                subject=[i["subject"] for i in items], ground_truth=[_first(i["ground_truth"]) for i in items],
                locality_inputs=_inputs(groups["locality"]), portability_inputs=_inputs(groups["portability"]))


def _zsre_requests(path: Path) -> dict[str, Any]:
    """edit() arguments from ZsreDataset, with subject and portability from the raw records, as
    run_zsre_llama2.py reads them (ZsreDataset keeps neither)."""
    from easyeditor import ZsreDataset

    raw, items = _records(path), list(ZsreDataset(str(path)))
    port = [{"one_hop": [(r["portability"]["New Question"], r["portability"]["New Answer"])]} if "portability" in r
            else {} for r in (raw[i["case_id"]] for i in items)]
    return dict(prompts=[i["prompt"] for i in items], target_new=[i["target_new"] for i in items],
                subject=[raw[i["case_id"]]["subject"] for i in items], ground_truth=[i["ground_truth"] for i in items],
                rephrase_prompts=[i["rephrase_prompt"] for i in items],
                locality_inputs=_inputs([{"neighborhood": [(i["locality_prompt"], i["locality_ground_truth"])]}
                                         for i in items]), portability_inputs=_inputs(port))


def _counterfact_requests(path: Path) -> dict[str, Any]:
    """edit() arguments from EasyEdit's CounterFactDataset."""
    from easyeditor import CounterFactDataset

    items = list(CounterFactDataset(str(path)))
    return dict(prompts=[i["prompt"] for i in items], target_new=[i["target_new"] for i in items],
                subject=[i["subject"] for i in items], ground_truth=[i["ground_truth"] for i in items],
                rephrase_prompts=[i["rephrase_prompt"] for i in items],
                locality_inputs=_inputs([{"neighborhood": [(i["locality_prompt"], i["locality_ground_truth"])]}
                                         for i in items]))


DATASETS = {"knowedit_counterfact.json": _knowedit_requests, "knowedit_zsre.json": _knowedit_requests,
            "knowedit_recent.json": _knowedit_requests, "knowedit_wikibio.json": _knowedit_requests,
            "zsre.json": _zsre_requests, "easyedit_counterfact.json": _counterfact_requests}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _theirs(entry: dict[str, Any], stage: str) -> dict[str, float]:
    """EasyEdit's figures of one request in rome-locate's names (`locality.KEY`, `portability.KEY`)."""
    m = entry[stage]
    out = {k: _mean(m[k]) for k in ("rewrite_acc", "rephrase_acc") if k in m}
    for group in ("locality", "portability"):
        out.update({f"{group}.{k[:-4]}": _mean(v) for k, v in (m.get(group) or {}).items() if k.endswith("_acc")})
    return out


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory):
    """The shipped fact-gpt2.yaml bound to the shipped model (absolute paths), its validation record beside it."""
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.hparams import bind_model, load_hparams, write_hparams

    folder = tmp_path_factory.mktemp("hparams")
    src = ROOT / "hparams" / "ROME" / "fact-gpt2.yaml"
    path = write_hparams(bind_model(load_hparams(src, easyedit=False), fact_model_dir("gpt2")), folder / src.name)
    shutil.copy(src.with_name("fact-gpt2.validation.json"), folder / "fact-gpt2.validation.json")
    return path


@needs_easyedit
@pytest.mark.parametrize("name", list(DATASETS))
def test_same_metrics_through_rome_locate_and_easyedits_dataset_classes(name, yaml_path, tmp_path, monkeypatch):
    """rewrite, rephrase, locality and portability by key: rome-locate's own figures, EasyEdit's inside
    rome-locate (`editor_metrics`) and EasyEdit's from its dataset class into the plugin's BaseEditor agree."""
    from rome_locate.cli import main
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams
    from rome_locate.fact_models import fact_model_dir

    monkeypatch.chdir(tmp_path)  # EasyEdit writes logs/ into the working directory
    assert main(["edit", "--model", str(fact_model_dir("gpt2")), "--device", "cpu", "--facts", str(FIXTURES / name),
                 "--hparams", str(yaml_path), "--layers", "fixed", "--editor", "easyedit", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    records = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    editor = BaseEditor.from_hparams(ROMEHyperParams.from_hparams(str(yaml_path)))
    theirs, _, _ = editor.edit(**DATASETS[name](FIXTURES / name), sequential_edit=False, verbose=False)
    assert len(records) == len(theirs) == 3
    for rec, entry, fact in zip(records, theirs, load_facts(FIXTURES / name)):
        assert entry["layer"] == rec["layer"]  # the same edit: the YAML's layer on both sides
        post, pre = _theirs(entry, "post"), _theirs(entry, "pre")
        # Every key of the fact reaches EasyEdit through its dataset class too, so every figure is compared.
        assert set(post) >= {"rewrite_acc", *(f"{g}.{k}" for g in ("locality", "portability") for k in fact.keys(g))}
        for key, value in post.items():
            assert rec["metrics"][key] == pytest.approx(value, abs=TOL), (name, key)
            assert rec["editor_metrics"]["post"][key] == pytest.approx(value, abs=TOL), (name, key)
        for key in ("rewrite_acc", *(k for k in pre if k.startswith("portability."))):
            assert rec["metrics"][key + "_pre"] == pytest.approx(pre[key], abs=TOL), (name, key)
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    assert "gen_efficacy" in summary["intervals"] and all("gen_efficacy" in r["metrics"] for r in records)
