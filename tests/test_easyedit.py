"""Against EasyEdit itself: the snapshot in ../shared/vendor/EasyEdit (conftest.py points EASYEDIT_PATH at it) or
the clone EASYEDIT_PATH names. Outside CI a machine without either skips this file; in CI (CI=true) it fails.
Each test names the EasyEdit behaviour it covers."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SENTENCES, build_tiny_model, params_hash, require_easyedit
from rome_locate.facts import Fact
from rome_locate.hparams import generate_hparams, load_hparams, with_layer, write_hparams
from rome_locate.stats import compute_mom2, load_mom2

require_easyedit()  # EasyEdit's snapshot; under CI=true a missing one fails instead of skipping

from easyeditor.models.rome.rome_hparams import ROMEHyperParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
YAMLS = sorted((ROOT / "hparams" / "ROME").glob("*.yaml"))
FACT = Fact(prompt="The Space Needle is in the city of", subject="The Space Needle", target="Seattle",
            target_new="Paris", id="needle")


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_easyedit_loads_every_shipped_yaml(path):
    h = ROMEHyperParams.from_hparams(str(path))
    ours = load_hparams(path)
    assert isinstance(ours, ROMEHyperParams)  # EasyEdit is imported: its class is returned
    assert dataclasses.asdict(ours) == dataclasses.asdict(h)
    layers = list(h.layers)
    moved = with_layer(h, layers[0] + 1)
    assert isinstance(moved, ROMEHyperParams) and moved.layers == [layers[0] + 1] and h.layers == layers


def test_written_yaml_round_trips_through_easyedit(tiny_tokenizer, tmp_path):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    h = generate_hparams(model, None, 2, "tiny")
    ee = ROMEHyperParams.from_hparams(str(write_hparams(h, tmp_path / "t.yaml", header="a header")))
    assert dataclasses.asdict(ee) == dataclasses.asdict(h)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_easyedit_reads_our_mom2_offline(family, tiny_tokenizer, tmp_path, monkeypatch):
    from easyeditor.models.rome import layer_stats as ls

    def no_download(*_a, **_k):
        raise AssertionError("EasyEdit tried to load a dataset: our statistics file was not picked up")

    monkeypatch.setattr(ls, "load_dataset", no_download)
    model = build_tiny_model(family, len(tiny_tokenizer))
    model.config._name_or_path = str(tmp_path / "models" / "tiny-fact")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(SENTENCES))
    h = generate_hparams(model, None, 1, "tiny-fact", stats_dir=str(tmp_path / "stats"), mom2_dataset="wikitext",
                         mom2_n_samples=20, mom2_adjustment=True)
    [path] = compute_mom2(model, tiny_tokenizer, None, [1], corpus, h.stats_dir, mom2_dataset="wikitext", n_samples=20)
    stat = ls.layer_stats(model, tiny_tokenizer, h.rewrite_module_tmp.format(1), h.stats_dir, "wikitext",
                          to_collect=["mom2"], sample_size=20, precision="float32", hparams=h)
    torch.testing.assert_close(stat.mom2.moment().float(), load_mom2(path))
    from easyeditor.models.rome.compute_u import get_inv_cov

    inv = get_inv_cov(model, tiny_tokenizer, h.rewrite_module_tmp.format(1), "wikitext", 20, "float32", hparams=h)
    # The inverse EasyEdit's ROME uses is the inverse of our file's moment (C is ill-conditioned: compare like with like).
    torch.testing.assert_close(inv, torch.inverse(stat.mom2.moment()).float())


def test_easyedit_rome_through_the_registry_restores(tiny_tokenizer):
    from rome_locate.editors import EasyEditRome, make_editor

    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = generate_hparams(model, None, 1, "tiny", context_template_length_params=[[5, 5]], v_num_grad_steps=2)
    editor = make_editor("easyedit", model, tiny_tokenizer, h, model_name="tiny")
    assert isinstance(editor, EasyEditRome) and editor.name == "easyedit"
    try:
        with editor.edited(model, tiny_tokenizer, FACT, h) as metrics:
            assert not torch.equal(model.get_parameter("transformer.h.1.mlp.c_proj.weight"),
                                   before["transformer.h.1.mlp.c_proj.weight"])
        assert metrics["layer"] == 1 and "post" in metrics
    finally:
        editor.close()
    assert editor._scratch is None  # its temporary folder for EasyEdit's logs is gone
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- rome-locate's hand-off through EasyEdit's BaseEditor ----------------------------------------------------------

FACT_MODEL = ROOT / "rome_locate" / "fact_models" / "gpt2"  # its path contains "gpt"


def _spy_rome(monkeypatch) -> list[int]:
    """Record the layer of every edit EasyEdit's own apply_rome_to_model makes."""
    from easyeditor.models.rome import rome_main

    layers: list[int] = []
    real = rome_main.apply_rome_to_model

    def spy(model, tok, requests, hparams, *args, **kwargs):
        layers.extend(hparams.layers)
        return real(model, tok, requests, hparams, *args, **kwargs)

    monkeypatch.setattr(rome_main, "apply_rome_to_model", spy)
    return layers


def _spy_base_editor(monkeypatch) -> list[dict]:
    """Record every call of EasyEdit's BaseEditor.edit_requests."""
    from easyeditor.editors.editor import BaseEditor

    calls: list[dict] = []
    real = BaseEditor.edit_requests

    def spy(self, requests, sequential_edit=False, *args, **kwargs):
        calls.append({"n": len(requests), "sequential_edit": sequential_edit, "model": self.model})
        return real(self, requests, sequential_edit, *args, **kwargs)

    monkeypatch.setattr(BaseEditor, "edit_requests", spy)
    return calls


def test_cli_edit_easyedit_traced_goes_through_base_editor(monkeypatch, tmp_path, capsys):
    """EasyEdit: BaseEditor.edit_requests with a preloaded (model, tokenizer); ROME's layer from `layers`."""
    from rome_locate.cli import main

    layers = _spy_rome(monkeypatch)
    calls = _spy_base_editor(monkeypatch)
    out = tmp_path / "run"
    # A copy without the validation file beside it: --layers traced is then each fact's traced argmax (below the
    # last layer) rather than the shipped file's calibrated fallback, so it can be checked against locate.jsonl.
    hparams = tmp_path / "fact-gpt2.yaml"
    hparams.write_text((ROOT / "hparams" / "ROME" / "fact-gpt2.yaml").read_text())
    assert main(["edit", "--model", str(FACT_MODEL), "--device", "cpu", "--facts", str(FACT_MODEL / "counterfact.json"),
                 "--hparams", str(hparams), "--limit", "4", "--layers", "traced",
                 "--editor", "easyedit", "--samples", "3", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    reported = [r["layer"] for r in data["records"]]
    traced = [json.loads(line)["layer"] for line in (out / "locate.jsonl").read_text().splitlines()]
    # EasyEdit edited each fact at the layer results.json reports, which is its traced layer.
    assert layers == reported == traced
    assert len(calls) == 4 and all(c["n"] == 1 for c in calls)
    assert len({id(c["model"]) for c in calls}) == 1  # one BaseEditor over the model rome-locate loaded
    for r in data["records"]:
        ee = r["editor_metrics"]
        assert ee["layer"] == r["layer"] and r["layer_source"] == "traced"
        assert set(ee["post"]) >= {"rewrite_acc", "rephrase_acc", "locality"} and "rewrite_acc" in ee["pre"]
    s = data["summary"]
    assert s["editor_metrics"]["post"]["rewrite_acc"] is not None and s["post_rewrite_acc"] is not None
    assert "EasyEdit's own metrics" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "### EasyEdit's own metrics" in md and "rephrase_acc, as EasyEdit computes it" in md
    assert (out / "easyedit" / "logs" / "results.json").is_file()  # EasyEdit's own files stay in OUT


def test_cli_edit_easyedit_validated_trials_go_through_the_same_base_editor(monkeypatch, tmp_path):
    """EasyEdit: --layers validated makes its trial edits with the session that makes the edits (no other editor)."""
    from rome_locate.cli import main

    layers = _spy_rome(monkeypatch)
    calls = _spy_base_editor(monkeypatch)
    out = tmp_path / "run"
    assert main(["edit", "--model", str(FACT_MODEL), "--device", "cpu", "--facts", str(FACT_MODEL / "counterfact.json"),
                 "--hparams", str(ROOT / "hparams" / "ROME" / "fact-gpt2.yaml"), "--limit", "2", "--layers",
                 "validated", "--editor", "easyedit", "--samples", "3", "--out", str(out), "--quiet"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    candidates = json.loads((ROOT / "hparams" / "ROME" / "fact-gpt2.validation.json").read_text())["candidates"]
    assert all(r["layer_source"] == "validated" and r["editor_metrics"]["layer"] == r["layer"] in candidates
               for r in records)
    # Two trial edits per fact (the validated layer and its best other candidate), then one edit per fact.
    assert len(calls) == len(layers) == 2 * 2 + 2 and len({id(c["model"]) for c in calls}) == 1
    assert layers[4:] == [r["layer"] for r in records]


def test_base_editor_sequential_keeps_per_fact_layers(tiny_tokenizer, tmp_path, monkeypatch):
    """EasyEdit: edit_requests(sequential_edit=True) keeps every edit; a request's own "layer" is where it is edited
    (source given), and the caller's request dicts are left as they were."""
    monkeypatch.chdir(tmp_path)  # EasyEdit writes logs/ into the working directory
    from rome_locate.easyedit import BaseEditor, easyedit_request, located_hparams

    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = located_hparams(generate_hparams(model, None, 0, "tiny", context_template_length_params=[[5, 5]],
                                         v_num_grad_steps=2), model_name=(model, tiny_tokenizer))
    editor = BaseEditor.from_hparams(h)
    assert editor.model_name == "tiny" or isinstance(editor.model_name, str)
    other = Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", target_new="nurse")
    requests = [{**easyedit_request(FACT), "layer": 1}, {**easyedit_request(other), "layer": 3}]
    asked = copy.deepcopy(requests)
    metrics, _, _ = editor.edit_requests(requests, sequential_edit=True, verbose=False)
    assert requests == asked
    assert [m["requested_rewrite"]["layer"] for m in metrics] == [m["layer"] for m in metrics] == [1, 3]
    assert [m["layer_decision"]["source"] for m in metrics] == ["given", "given"]
    assert editor.hparams.layers == [1, 3]
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"]


def test_model_path_containing_gpt_keeps_its_own_tokenizer(tmp_path, monkeypatch):
    """EasyEdit: BaseEditor loads GPT2Tokenizer for any model path containing "gpt"; ours uses AutoTokenizer."""
    monkeypatch.chdir(tmp_path)  # EasyEdit writes logs/ into the working directory
    from transformers import AutoTokenizer, GPT2Tokenizer

    from rome_locate.easyedit import BaseEditor, located_hparams
    from rome_locate.hparams import bind_model, load_hparams

    h = bind_model(load_hparams(ROOT / "hparams" / "ROME" / "fact-gpt2.yaml", easyedit=False), FACT_MODEL)
    editor = BaseEditor.from_hparams(located_hparams(h))
    own = AutoTokenizer.from_pretrained(FACT_MODEL)
    assert type(editor.tok) is type(own) and not isinstance(editor.tok, GPT2Tokenizer)
    text = "The hometown of Dorzor Poxaster is London"
    assert editor.tok(text)["input_ids"] == own(text)["input_ids"]
    assert editor.model_name == str(FACT_MODEL)


USER_SCRIPT = """
import json, sys
{preamble}
{import_line}

hparams = ROMEHyperParams.from_hparams(sys.argv[1])
editor = BaseEditor.from_hparams(hparams)
facts = json.load(open(sys.argv[2]))[:2]
rw = [f["requested_rewrite"] for f in facts]
metrics, _, _ = editor.edit(prompts=[r["prompt"].format(r["subject"]) for r in rw],
                            ground_truth=[r["target_true"]["str"] for r in rw],
                            target_new=[r["target_new"]["str"] for r in rw],
                            subject=[r["subject"] for r in rw],
                            rephrase_prompts=[f["paraphrase_prompts"][0] for f in facts],
                            sequential_edit=False)
print("RESULT " + json.dumps({{"layers": [m.get("layer") for m in metrics],
                              "sources": [(m.get("layer_decision") or {{}}).get("source") for m in metrics],
                              "tokenizer": type(editor.tok).__name__,
                              "rephrase_acc": [m["post"]["rephrase_acc"] for m in metrics]}}, default=float))
"""

# Without EasyEdit's optional extras installed, `import easyeditor` needs the plugin's stand-ins first; a user with
# them installed has no such line.
PREAMBLE = "from rome_locate.easyedit import import_easyedit; import_easyedit()"

IMPORT_PROBE = f"""
import json, sys
from rome_locate.easyedit import BaseEditor, hidden_modules, import_easyedit, stubbed_modules
import_easyedit()
from rome_locate.models import load_model
model, tok = load_model({str(FACT_MODEL)!r}, device="cpu")
later = {{}}
for name in ("torchvision", "timm"):
    try:
        __import__(name)
        later[name] = "imported"
    except Exception as exc:
        later[name] = type(exc).__name__ + ": " + str(exc)
print("RESULT " + json.dumps({{"stubbed": stubbed_modules(), "hidden": hidden_modules(), "later": later,
                               "editor": BaseEditor.__mro__[1].__module__, "model": type(model).__name__}}))
"""


def _package(root: Path, name: str, version: str, files: dict[str, str]) -> None:
    """A stand-in installed package: modules plus the dist-info transformers' availability checks read."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


BROKEN_TORCHVISION = {"torchvision/__init__.py": "raise RuntimeError('operator torchvision::nms does not exist')\n"}
TIMM = {  # timm's import reads InterpolationMode.NEAREST from torchvision, as timm's data/transforms.py does
    "timm/__init__.py": "from .data import transforms\nfrom . import layers, models\n",
    "timm/data/__init__.py": "from . import transforms\n",
    "timm/data/transforms.py": ("from torchvision.transforms import InterpolationMode\n"
                                "_PIL = {InterpolationMode.NEAREST: 'nearest', InterpolationMode.BICUBIC: 'bicubic'}\n"),
    "timm/layers/__init__.py": "def drop_path(*a, **k): pass\ndef to_2tuple(x): return (x, x)\n"
                               "def trunc_normal_(*a, **k): pass\n",
    "timm/models/__init__.py": "from . import hub\n",
    "timm/models/hub.py": "def download_cached_file(*a, **k): pass\n"}


@pytest.fixture(scope="module")
def fresh_processes(tmp_path_factory):
    """The scripts that need a fresh Python process, started together (each imports EasyEdit anew); a name gives
    its RESULT once it has finished."""
    root = tmp_path_factory.mktemp("processes")
    from rome_locate.hparams import bind_model

    # The user's YAML with absolute paths (the scripts run in other folders); few optimisation steps: fast.
    h = bind_model(load_hparams(ROOT / "hparams" / "ROME" / "fact-gpt2.yaml", easyedit=False), FACT_MODEL)
    yaml_path = write_hparams(dataclasses.replace(h, v_num_grad_steps=5), root / "rome.yaml")
    _package(root / "broken_tv", "torchvision", "0.28.0", BROKEN_TORCHVISION)
    _package(root / "timm_only", "timm", "1.0.22", TIMM)
    jobs = {
        "before": ([USER_SCRIPT.format(preamble=PREAMBLE, import_line="from easyeditor import BaseEditor, "
                                                                      "ROMEHyperParams")], None),
        "after": ([USER_SCRIPT.format(preamble="", import_line="from rome_locate.easyedit import BaseEditor, "
                                                               "ROMEHyperParams")], None),
        "broken_tv": ([IMPORT_PROBE], root / "broken_tv"),
        "timm_only": ([IMPORT_PROBE], root / "timm_only"),
    }
    running = {}
    for name, ([source], site) in jobs.items():
        cwd = root / f"run_{name}"
        cwd.mkdir()
        (cwd / "script.py").write_text(source)
        paths = [str(site)] if site else []
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(paths + [str(ROOT), os.environ["EASYEDIT_PATH"]])}
        running[name] = subprocess.Popen(
            [sys.executable, "script.py", str(yaml_path), str(FACT_MODEL / "counterfact.json")], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results: dict[str, dict] = {}

    def result(name: str) -> dict:
        if name not in results:
            out, err = running[name].communicate(timeout=600)
            assert running[name].returncode == 0, err[-3000:]
            [line] = [l for l in out.splitlines() if l.startswith("RESULT ")]
            results[name] = json.loads(line[len("RESULT "):])
        return results[name]

    yield result
    for p in running.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def test_one_line_change_edits_each_request_at_its_traced_layer(fresh_processes):
    """EasyEdit: a user's ROME script (ROMEHyperParams.from_hparams, BaseEditor.from_hparams, editor.edit) runs
    unchanged but for its import line, and each request is edited where the layer rule decides on its trace: here
    the rule's defaults (the YAML has no validation record beside it), never the last layer."""
    from rome_locate.choose import layer_rule
    from rome_locate.easyedit import located_hparams
    from rome_locate.facts import load_facts
    from rome_locate.locate import locate
    from rome_locate.models import load_model

    model, tok = load_model(FACT_MODEL, device="cpu")
    facts = load_facts(FACT_MODEL / "counterfact.json", limit=2)
    h = load_hparams(ROOT / "hparams" / "ROME" / "fact-gpt2.yaml", easyedit=False)
    rule = layer_rule("traced", h.layers[0], 8)
    settings = located_hparams(h).trace_settings()
    expected = [rule.decide(locate(model, tok, [f], settings, progress=False)[0][0].effects) for f in facts]
    before, after = fresh_processes("before"), fresh_processes("after")
    assert before["layers"] == [None, None]  # EasyEdit's ROME: every request at the YAML's layer
    assert after["layers"] == [d.layer for d in expected] and 7 not in after["layers"]
    assert after["sources"] == [d.source for d in expected]
    # EasyEdit's own loader picks GPT2Tokenizer for this "gpt" path; the plugin keeps the model's own.
    assert before["tokenizer"] == "GPT2Tokenizer" and after["tokenizer"] != "GPT2Tokenizer"


def test_import_and_model_load_with_a_torchvision_that_cannot_load(fresh_processes):
    """EasyEdit's requirements next to a CPU torch bring a CUDA torchvision whose import raises
    `operator torchvision::nms does not exist`; transformers then cannot load a model, EasyEdit cannot import."""
    r = fresh_processes("broken_tv")
    assert r["model"] == "GPT2LMHeadModel" and r["editor"] == "easyeditor.editors.editor"
    assert r["hidden"] == {"torchvision": "RuntimeError: operator torchvision::nms does not exist"}
    assert "torchvision" in r["stubbed"]
    # What stays changed for the process: torchvision counts as not installed.
    assert r["later"]["torchvision"].startswith("ModuleNotFoundError")


def test_import_and_model_load_with_timm_without_torchvision(fresh_processes):
    """timm installed, torchvision not: EasyEdit imports timm, whose `InterpolationMode.NEAREST` (from torchvision)
    failed on a plain stand-in (`type object 'InterpolationMode' has no attribute 'NEAREST'`)."""
    r = fresh_processes("timm_only")
    assert r["model"] == "GPT2LMHeadModel" and r["editor"] == "easyeditor.editors.editor"
    assert "torchvision" in r["stubbed"] and "timm" not in r["stubbed"] and r["hidden"] == {}
    # timm took the stand-in torchvision during EasyEdit's import only: a later import fails as without EasyEdit.
    assert r["later"]["timm"] == "ModuleNotFoundError: No module named 'torchvision'"
    assert r["later"]["torchvision"] == "ModuleNotFoundError: No module named 'torchvision'"


def test_import_with_none_of_the_extras_installed():
    """This machine has none of EasyEdit's extras (no torchvision, timm, peft, ...): this test process imported
    EasyEdit with stand-ins, which are gone afterwards, and models still load."""
    import importlib.util

    from rome_locate.easyedit import hidden_modules, stubbed_modules
    from rome_locate.models import load_model

    assert {"torchvision", "timm", "peft"} <= set(stubbed_modules()) and hidden_modules() == {}
    assert importlib.util.find_spec("torchvision") is None and "timm" not in sys.modules
    model, _ = load_model(FACT_MODEL, device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_generated_yaml_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    """EasyEdit: reads model_name and stats_dir relative to its working directory; `rome-locate hparams` writes them
    absolute for a local model (a hub name stays as given), and EasyEdit finds the statistics from another folder."""
    from easyeditor.models.rome import layer_stats as ls

    from rome_locate.cli import main
    from rome_locate.models import load_model

    monkeypatch.chdir(ROOT)
    out = tmp_path / "h.yaml"
    assert main(["hparams", "--model", "rome_locate/fact_models/gpt2", "--device", "cpu", "--facts",
                 str(FACT_MODEL / "counterfact.json"), "--layer", "3", "-o", str(out),
                 "--set", "mom2_dataset=corpus"]) == 0
    h = ROMEHyperParams.from_hparams(str(out))
    assert h.model_name == str(FACT_MODEL) and Path(h.stats_dir) == FACT_MODEL / "stats"
    monkeypatch.chdir(tmp_path)  # another folder: EasyEdit must still find the model and its statistics

    def no_download(*_a, **_k):
        raise AssertionError("EasyEdit did not find the statistics file and tried to load a dataset")

    monkeypatch.setattr(ls, "load_dataset", no_download)
    model, tok = load_model(h.model_name, device="cpu")
    stat = ls.layer_stats(model, tok, h.rewrite_module_tmp.format(3), h.stats_dir, h.mom2_dataset,
                          to_collect=["mom2"], sample_size=h.mom2_n_samples, precision=h.mom2_dtype, hparams=h)
    assert stat.mom2.moment().ndim == 2


def test_edit_facts_through_easyedit_without_an_out_folder(tiny_tokenizer, tmp_path, monkeypatch):
    """EasyEdit: edit_requests writes logs/ into the working directory; without OUT it goes to a removed temp dir."""
    from rome_locate.pipeline import edit_facts

    monkeypatch.chdir(tmp_path)
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = generate_hparams(model, None, 1, "tiny", context_template_length_params=[[5, 5]], v_num_grad_steps=2)
    other = Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", target_new="nurse")
    records = edit_facts(model, tiny_tokenizer, [FACT, other], h, located=[1, 2], editor="easyedit", progress=False)
    assert [r.editor_metrics["layer"] for r in records] == [r.layer for r in records] == [1, 2]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert list(tmp_path.iterdir()) == []


# ---- the one-line change: the layer rule on every request, the caller's requests untouched --------------------

def _yaml_copy(tmp_path: Path, family: str = "gpt2", record: bool = True, name: str | None = None,
               **fields) -> Path:
    """The shipped fact-FAMILY.yaml with absolute paths (and `fields` set) in tmp_path, with its validation record
    beside it when `record`."""
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.hparams import bind_model

    src = ROOT / "hparams" / "ROME" / f"fact-{family}.yaml"
    h = bind_model(load_hparams(src, easyedit=False), fact_model_dir(family))
    path = write_hparams(dataclasses.replace(h, **fields), tmp_path / f"{name or src.stem}.yaml")
    if record:
        shutil.copy(src.with_name(f"fact-{family}.validation.json"), path.with_name(f"{path.stem}.validation.json"))
    return path


def _requests(n: int, family: str = "gpt2") -> list[dict]:
    from rome_locate.easyedit import easyedit_request
    from rome_locate.fact_models import counterfact_path
    from rome_locate.facts import load_facts

    return [easyedit_request(f) for f in load_facts(counterfact_path(family), limit=n)]


def _rule_decisions(editor, requests: list[dict]) -> list:
    """What the rule of `rome_locate.choose` decides for each request, traced on the editor's model as it is now."""
    from rome_locate.choose import layer_rule
    from rome_locate.facts import Fact
    from rome_locate.locate import locate

    rule = layer_rule("traced", editor.layer_rule.fallback, 8, editor.hparams.hparams_path)
    facts = [Fact(prompt=r["prompt"], subject=r["subject"], target=r["ground_truth"]) for r in requests]
    return [rule.decide(locate(editor.model, editor.tok, [f], editor.hparams.trace_settings(),
                               progress=False)[0][0].effects) for f in facts]


def test_validated_yaml_with_no_threshold_edits_every_request_at_its_layer(tmp_path, monkeypatch):
    """EasyEdit: edit_requests puts each request dict into its returned metrics ("requested_rewrite"); the plugin
    edits copies, so the caller's dicts are unchanged, and the record's null threshold sends every request to the
    YAML's layer (source fallback)."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as Located

    layers = _spy_rome(monkeypatch)
    hparams = Located.from_hparams(str(_yaml_copy(tmp_path, v_num_grad_steps=5)))
    assert hparams.hparams_path == str(tmp_path / "fact-gpt2.yaml") and hparams.layers == [1]
    editor = BaseEditor.from_hparams(hparams)
    requests = _requests(3)
    asked = copy.deepcopy(requests)
    metrics, _, _ = editor.edit_requests(requests, verbose=False)
    assert requests == asked and all("layer" not in r for r in requests)
    assert layers == [m["layer"] for m in metrics] == [m["requested_rewrite"]["layer"] for m in metrics] == [1, 1, 1]
    assert [m["layer_decision"]["source"] for m in metrics] == ["fallback"] * 3
    assert editor.layer_rule.source.endswith("fact-gpt2.validation.json") and editor.hparams.layers == [1]
    saved = json.loads((tmp_path / "logs" / "results.json").read_text())
    assert [m["requested_rewrite"]["layer_decision"]["layer"] for m in saved] == [1, 1, 1]


def test_yaml_without_record_and_easyedit_hparams_get_the_rule_defaults(tmp_path, monkeypatch, caplog):
    """EasyEdit: ROMEHyperParams.from_hparams keeps no path. Our ROMEHyperParams from a YAML without a record, and
    EasyEdit's own passed to our BaseEditor (only the BaseEditor import changed), both get the rule's defaults
    (never the last layer); the latter says so in one logged warning."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.choose import layer_rule
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as Located

    layers = _spy_rome(monkeypatch)
    requests = _requests(3)
    ours = BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, record=False, v_num_grad_steps=5))))
    defaults = layer_rule("traced", 1, 8)
    assert dataclasses.replace(ours.layer_rule, source="") == dataclasses.replace(defaults, source="")
    assert 7 not in ours.layer_rule.candidates and "no fact-gpt2.validation.json" in ours.layer_rule.source
    expected = _rule_decisions(ours, requests)
    mine, _, _ = ours.edit_requests(requests, verbose=False)
    assert [m["layer"] for m in mine] == [d.layer for d in expected] == layers
    assert [m["layer_decision"]["source"] for m in mine] == [d.source for d in expected]
    assert {d.source for d in expected} <= {"traced", "fallback"} and 7 not in layers
    assert ours.hparams.layers == sorted(set(layers))
    caplog.clear()
    # EasyEdit's own class, from a YAML whose record it cannot know about.
    theirs = BaseEditor.from_hparams(ROMEHyperParams.from_hparams(str(_yaml_copy(tmp_path, name="with-record",
                                                                                 v_num_grad_steps=5))))
    [line] = [r.getMessage() for r in caplog.records if r.name == "rome_locate.easyedit"]
    assert "ROMEHyperParams" in line and "no validation record" in line and "\n" not in line
    assert theirs.layer_rule == defaults
    metrics, _, _ = theirs.edit_requests(requests, verbose=False)
    assert [m["layer_decision"] for m in metrics] == [m["layer_decision"] for m in mine]


def test_sequential_edits_twice_on_the_same_requests_retrace(tmp_path, monkeypatch):
    """EasyEdit: sequential_edit=True keeps each edit; every request is traced on the model as it is when it is
    edited, and a second call with the same list traces again (no layer left behind in the caller's dicts)."""
    monkeypatch.chdir(tmp_path)
    from rome_locate import easyedit_editor
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as Located

    traced: list[str] = []
    real = easyedit_editor.trace_request

    def spy(model, tok, request, settings):
        traced.append(params_hash(model))
        return real(model, tok, request, settings)

    monkeypatch.setattr(easyedit_editor, "trace_request", spy)
    editor = BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, record=False, v_num_grad_steps=5))))
    requests = _requests(2)
    asked = copy.deepcopy(requests)
    for _ in range(2):
        metrics, _, _ = editor.edit_requests(requests, sequential_edit=True, verbose=False)
        assert requests == asked
        assert all(m["layer_decision"]["source"] in ("traced", "fallback") for m in metrics)
    assert len(traced) == 4 and len(set(traced)) == 4  # four traces, each on the model after the edits before it


def _left_padded_copy(tmp_path: Path, side: str) -> Path:
    """The LLaMA fact model copied to tmp_path/SIDE/llama (the folder name the statistics are filed under) with
    "padding_side": SIDE in its tokenizer_config.json, as many LLaMA tokenizers ship."""
    from rome_locate.fact_models import fact_model_dir

    dst = tmp_path / side / "llama"
    shutil.copytree(fact_model_dir("llama"), dst, ignore=shutil.ignore_patterns("stats"))
    config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": side}))
    return dst


def test_left_padding_tokenizer_gives_the_same_edit_as_right_padding(tmp_path, monkeypatch):
    """EasyEdit: sets padding_side="right" for ROME only for llama/mistral/qwen paths it loads itself, and its
    ROME reads positions as if padding were on the right. The plugin pads right whatever the tokenizer's default:
    a LLaMA tokenizer that pads left gives the same edit and metrics as one that pads right."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as Located

    runs = {}
    for side in ("left", "right"):
        (tmp_path / side).mkdir()
        model_dir = _left_padded_copy(tmp_path, side)
        path = _yaml_copy(tmp_path / side, family="llama", model_name=str(model_dir))
        editor = BaseEditor.from_hparams(Located.from_hparams(str(path)))
        assert editor.tok.padding_side == "right"
        metrics, model, _ = editor.edit_requests(_requests(2, "llama"), sequential_edit=True, verbose=False)
        runs[side] = ([[float(np.mean(m["post"][k])) for k in ("rewrite_acc", "rephrase_acc")]
                       + [float(np.mean(m["post"]["locality"]["neighborhood_acc"]))] for m in metrics],
                      {n: p.detach().clone() for n, p in model.named_parameters()})
    assert runs["left"][0] == runs["right"][0]
    assert np.mean([row[0] for row in runs["left"][0]]) > 0  # an edit took: the equality is not of failures
    for name, value in runs["right"][1].items():
        torch.testing.assert_close(runs["left"][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_preloaded_tokenizer_is_set_to_pad_right(tmp_path, monkeypatch):
    """EasyEdit: leaves a preloaded tokenizer's padding side as it is; the plugin sets it right for ROME."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as Located
    from rome_locate.fact_models import load_fact_model

    model, tok = load_fact_model("llama")
    tok.padding_side = "left"
    hparams = dataclasses.replace(Located.from_hparams(str(_yaml_copy(tmp_path, family="llama"))),
                                  model_name=(model, tok))
    editor = BaseEditor.from_hparams(hparams)
    assert editor.tok is tok and tok.padding_side == "right"


def test_fp16_model_parallel_and_device_of_the_yaml_are_honoured(tmp_path, monkeypatch):
    """EasyEdit: loads a model path in float16 with `fp16: true`, with device_map "auto" with `model_parallel`,
    and moves it to `device` (an int is a CUDA index)."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.easyedit import BaseEditor, ROMEHyperParams as Located

    half = BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, name="half", fp16=True))))
    assert half.model.dtype == torch.float16 and half.layer_rule.fallback == 1
    full = BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, name="full"))))
    assert full.model.dtype == torch.float32
    from rome_locate import models

    loads: list[dict] = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda name, **kw: loads.append(kw) or real(name, **kw))
    BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, name="mp", model_parallel=True))))
    assert loads == [{"dtype": "float32", "device_map": "auto"}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device: 0 is a CUDA device.*set device: cpu"):
        BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, name="gpu", device=0))))
    with pytest.raises(FileNotFoundError, match="model_name .*no-such-model"):
        BaseEditor.from_hparams(Located.from_hparams(str(_yaml_copy(tmp_path, name="missing",
                                                                    model_name=str(tmp_path / "no-such-model")))))


def test_requires_grad_flags_survive_an_edit(tiny_tokenizer, tmp_path, monkeypatch):
    """EasyEdit: ROME's compute_v sets requires_grad=False on every parameter; the plugin's BaseEditor and
    EasyEditSession.edited leave each parameter's flag as it was."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.easyedit import BaseEditor, EasyEditSession, easyedit_request, located_hparams

    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    model.transformer.wte.weight.requires_grad_(False)  # a mix, as in a partly frozen model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    h = generate_hparams(model, None, 1, "tiny", context_template_length_params=[[5, 5]], v_num_grad_steps=2)
    editor = BaseEditor.from_hparams(located_hparams(h, model_name=(model, tiny_tokenizer)))
    editor.edit_requests([{**easyedit_request(FACT), "layer": 2}], verbose=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    session = EasyEditSession(model, tiny_tokenizer, h, "tiny", tmp_path / "session")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with session.edited(model, tiny_tokenizer, FACT, with_layer(h, 3)) as metrics:
        assert metrics["layer"] == 3 and session.editor.hparams.layers == [3]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
