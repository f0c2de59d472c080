"""The EasyEdit route of mass editing: MEMIT and AlphaEdit through the one-line change and through the EasyEdit
editor's `edited_batch`, R-ROME through the layer rule. Against the EasyEdit snapshot conftest.py points
EASYEDIT_PATH at (as tests/test_easyedit.py); each test names the EasyEdit behaviour it covers.

The YAMLs are written here by hand with exactly the fields of EasyEdit's hyperparameter classes, for the shipped
GPT-2 (or LLaMA) fact model and its mom2 statistics (self_sample, 3000 texts), with few optimisation steps."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import params_hash, require_easyedit

require_easyedit()  # EasyEdit's snapshot; under CI=true a missing one fails instead of skipping

from easyeditor.models.alphaedit import AlphaEdit_main  # noqa: E402
from easyeditor.models.memit import memit_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The window and v* settings of the tiny GPT-2 fact model: its facts sit in layers 0-2 (fact-gpt2.yaml's trace), and
# its keys are small, so MEMIT's shipped mom2_update_weight (15000-20000) leaves no edit and v_lr 0.5 moves z too
# little in 10 steps.
MEMIT_GPT2 = {
    "alg_name": "MEMIT", "device": "cpu", "layers": [0, 1, 2], "layer_selection": "all",
    "fact_token": "subject_last", "v_num_grad_steps": 10, "v_lr": 5.0, "v_loss_layer": 7, "v_weight_decay": 0.0,
    "clamp_norm_factor": 100.0, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 1000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    # Tied embeddings: EasyEdit's MEMIT reads nethook.get_parameter(model, "lm_head.weight"), and named_parameters()
    # lists the tied matrix once, as transformer.wte.weight (EasyEdit's gpt2-xl YAML says the same).
    "lm_head_module": "transformer.wte",
    "mom2_dataset": "self_sample", "mom2_n_samples": 3000, "mom2_dtype": "float32",
    "max_length": 40, "batch_size": 5, "model_parallel": False,
}
LLAMA_MODULES = {
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm", "lm_head_module": "lm_head",
}


def _yaml(tmp_path: Path, name: str, family: str = "gpt2", **fields) -> Path:
    """A MEMIT YAML (AlphaEdit with alg_name and its fields) for the fact model FAMILY in tmp_path."""
    from rome_locate.fact_models import fact_model_dir

    model = fact_model_dir(family)
    config = {**MEMIT_GPT2, **(LLAMA_MODULES if family == "llama" else {}), "model_name": str(model),
              "stats_dir": str(model / "stats"), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _alphaedit_yaml(tmp_path: Path, name: str, family: str = "gpt2", **fields) -> Path:
    """EasyEdit's shipped P_loc (the working directory's file) unless `fields` set one. Its shipped threshold and L2
    (2e-2, 10) leave the tiny models' facts unedited: 0.1 and 1 edit them."""
    return _yaml(tmp_path, name, family, alg_name="AlphaEdit", nullspace_threshold=0.1, L2=1,
                 **{"P_loc": "./null_space_project.pt", **fields})


def _facts(n: int, family: str = "gpt2"):
    from rome_locate.fact_models import counterfact_path
    from rome_locate.facts import load_facts

    return load_facts(counterfact_path(family), limit=n)


def _requests(n: int, family: str = "gpt2") -> list[dict]:
    from rome_locate.easyedit import easyedit_request

    return [easyedit_request(f) for f in _facts(n, family)]


def _fresh_alphaedit_state() -> None:
    """AlphaEdit's process globals as a new process has them (no P loaded, no key cache)."""
    AlphaEdit_main.P_loaded, AlphaEdit_main.cache_c_new = False, False


@pytest.fixture(autouse=True)
def _same_context_templates(monkeypatch):
    """EasyEdit: MEMIT and AlphaEdit sample their context templates once per process from the global RNG
    (get_context_templates); each test samples its own from the same seed, whatever ran before it."""
    for module in (memit_main, AlphaEdit_main):
        monkeypatch.setattr(module, "CONTEXT_TEMPLATES_CACHE", None)
    torch.manual_seed(0)


def _no_download(monkeypatch) -> None:
    from easyeditor.models.rome import layer_stats

    def refuse(*_a, **_k):
        raise AssertionError("EasyEdit did not find the statistics file and tried to load a dataset")

    monkeypatch.setattr(layer_stats, "load_dataset", refuse)


def test_memit_yaml_loads_through_the_one_line_change_and_easyedit_finds_our_stats(tmp_path, monkeypatch):
    """EasyEdit: MEMITHyperParams.from_hparams reads the YAML; layer_stats files statistics under
    {stats_dir}/{last part of the model's _name_or_path}/{mom2_dataset}_stats/{module}_{dtype}_mom2_{n}.npz, where
    the fact model's self_sample statistics are."""
    from easyeditor import MEMITHyperParams as Plain
    from easyeditor.models.rome import layer_stats as ls

    from rome_locate.easyedit import MEMITHyperParams
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.models import load_model
    from rome_locate.stats import load_mom2

    path = _yaml(tmp_path, "fact-gpt2-memit")
    ours, plain = MEMITHyperParams.from_hparams(str(path)), Plain.from_hparams(str(path))
    assert isinstance(ours, Plain) and ours.hparams_path == str(path)
    assert {k: v for k, v in dataclasses.asdict(ours).items() if k != "hparams_path"} == dataclasses.asdict(plain)
    with pytest.raises(FileNotFoundError, match="MEMIT hyperparameters not found"):
        MEMITHyperParams.from_hparams(str(tmp_path / "missing"))
    _no_download(monkeypatch)
    model, tok = load_model(fact_model_dir("gpt2"), device="cpu")
    for layer in plain.layers:
        module = plain.rewrite_module_tmp.format(layer)
        stat = ls.layer_stats(model, tok, module, plain.stats_dir, plain.mom2_dataset, to_collect=["mom2"],
                              sample_size=plain.mom2_n_samples, precision=plain.mom2_dtype, hparams=plain)
        ours_file = Path(plain.stats_dir) / "gpt2" / "self_sample_stats" / f"{module}_float32_mom2_3000.npz"
        torch.testing.assert_close(stat.mom2.moment().float(), load_mom2(ours_file))


def test_batch_edit_arguments_rebuild_the_requests():
    """EasyEdit: batch_edit takes lists (prompts, subject, locality_inputs, ...), not request dicts, and rebuilds
    the requests with _prepare_requests; `batch_edit_kwargs` gives the lists that rebuild ours exactly."""
    from easyeditor.editors.utils import _prepare_requests

    from rome_locate.easyedit import batch_edit_kwargs, easyedit_request
    from rome_locate.fact_models import easyedit_path
    from rome_locate.facts import load_facts

    requests = [easyedit_request(f) for f in load_facts(easyedit_path("gpt2"), limit=4)]
    assert any(r["portability"] for r in requests) and any(r["locality"] for r in requests)
    assert _prepare_requests(**batch_edit_kwargs(requests)) == requests


def _spy_batch_edit(monkeypatch) -> list[dict]:
    """Record every call of EasyEdit's own BaseEditor.batch_edit."""
    from easyeditor.editors.editor import BaseEditor

    calls: list[dict] = []
    real = BaseEditor.batch_edit

    def spy(self, prompts, target_new, *args, **kwargs):
        calls.append({"prompts": list(prompts), "hparams": self.hparams, "sequential": kwargs.get("sequential_edit")})
        return real(self, prompts, target_new, *args, **kwargs)

    monkeypatch.setattr(BaseEditor, "batch_edit", spy)
    return calls


def test_edited_batch_edits_five_facts_at_once_and_restores_bit_identically(tmp_path, monkeypatch):
    """EasyEdit: batch_edit puts all requests of a chunk into one MEMIT update and returns the copy of that chunk's
    weights only; compute_z clears every requires_grad. edited_batch converts rome-locate's own hyperparameters to
    EasyEdit's MEMITHyperParams by field name, makes ONE batch_edit of the five facts, yields EasyEdit's metrics in
    the facts' order, and restores every weight and flag bit-identically, also when the block raises."""
    from easyeditor import MEMITHyperParams as Plain

    from rome_locate.editors import EasyEditEditor, EasyEditRome, make_editor
    from rome_locate.fact_models import load_fact_model

    calls = _spy_batch_edit(monkeypatch)
    config = yaml.safe_load(_yaml(tmp_path, "memit", batch_size=1).read_text())
    # rome-locate's own record type: another class, EasyEdit's field names.
    Ours = dataclasses.make_dataclass("MemitHParams", [(k, type(v)) for k, v in config.items()], frozen=True)
    hparams = Ours(**config)
    model, tok = load_fact_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)  # a mix, as in a partly frozen model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before, window = params_hash(model), [f"transformer.h.{l}.mlp.c_proj.weight" for l in (0, 1, 2)]
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    facts = _facts(5)
    editor = make_editor("easyedit", model, tok, hparams, model_name="fact-gpt2", workdir=tmp_path / "run")
    assert isinstance(editor, EasyEditEditor) and EasyEditRome is EasyEditEditor
    with editor.edited_batch(model, tok, facts, hparams) as batch:
        changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, originals[n]))
    assert changed == window
    [call] = calls
    assert call["prompts"] == [f.prompt for f in facts] and call["sequential"] is True
    assert type(call["hparams"]) is Plain and call["hparams"].batch_size == 5  # one update of all five
    assert batch["alg_name"] == "MEMIT" and batch["layers"] == [0, 1, 2] and len(batch["metrics"]) == 5
    pre = sum(m["pre"]["rewrite_acc"] for m in batch["metrics"]) / 5
    post = sum(m["post"]["rewrite_acc"] for m in batch["metrics"]) / 5
    assert post > pre and post >= 0.4  # efficacy up
    assert params_hash(model) == before and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(RuntimeError, match="measuring failed"):
        with editor.edited_batch(model, tok, facts[:2], hparams):
            assert params_hash(model) != before
            raise RuntimeError("measuring failed")
    assert params_hash(model) == before and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    editor.close()


def test_one_line_change_batch_edit_matches_plain_easyedit(tmp_path, monkeypatch):
    """EasyEdit: BaseEditor.batch_edit with MEMIT edits every request in the YAML's window. The one-line change
    gives the same metrics and bit-identical edited weights as plain EasyEdit on the same requests and model files."""
    monkeypatch.chdir(tmp_path)  # EasyEdit writes logs/ into the working directory
    from easyeditor import BaseEditor as PlainEditor, MEMITHyperParams as PlainHParams

    from rome_locate.easyedit import BaseEditor, MEMITHyperParams, batch_edit_kwargs
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.models import load_model

    path, requests = _yaml(tmp_path, "memit"), _requests(5)
    hparams = PlainHParams.from_hparams(str(path))
    model, tok = load_model(fact_model_dir("gpt2"), device="cpu")
    tok.padding_side = "right"  # what EasyEdit's GPT2Tokenizer has for a "gpt" path
    plain = PlainEditor.from_hparams(dataclasses.replace(hparams, model_name=(model, tok)))
    plain.model_name, plain.hparams = hparams.model_name, hparams  # its evaluation reads model_name as a string
    theirs, _, _ = plain.batch_edit(**batch_edit_kwargs(requests), sequential_edit=True, verbose=False)

    editor = BaseEditor.from_hparams(MEMITHyperParams.from_hparams(str(path)))
    assert editor.tok.padding_side == "right" and editor.model is not model
    ours, _, _ = editor.batch_edit(**batch_edit_kwargs(requests), sequential_edit=True, verbose=False)
    assert [m["pre"] for m in ours] == [m["pre"] for m in theirs]
    assert [m["post"] for m in ours] == [m["post"] for m in theirs]
    assert [m["requested_rewrite"] for m in ours] == [m["requested_rewrite"] for m in theirs]
    assert sum(m["post"]["rewrite_acc"][0] for m in ours) > 0  # the edits took: the equality is not of failures
    mine = dict(editor.model.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(mine[name], value), name


def test_window_outside_the_model_is_a_one_line_error_naming_the_yaml(tmp_path, monkeypatch):
    """EasyEdit: a MEMIT window with a layer the model lacks (its shipped 4-8 on an 8-layer model) fails mid-edit,
    after the statistics and v* of the layers before it. The one-line change says so in one line naming the YAML
    before any edit; edited_batch before any weight is read or written."""
    monkeypatch.chdir(tmp_path)
    from easyeditor import MEMITHyperParams as Plain

    from rome_locate.arch import LayerRangeError
    from rome_locate.easyedit import BaseEditor, MEMITHyperParams
    from rome_locate.editors import make_editor
    from rome_locate.fact_models import load_fact_model

    from easyeditor.util.alg_dict import ALG_DICT

    applied: list = []  # what EasyEdit's BaseEditor applies for MEMIT (its ALG_DICT entry)
    monkeypatch.setitem(ALG_DICT, "MEMIT", lambda *a, **k: applied.append(a))
    path = _yaml(tmp_path, "shipped-window", layers=[5, 9])
    with pytest.raises(LayerRangeError) as info:
        BaseEditor.from_hparams(MEMITHyperParams.from_hparams(str(path)))
    message = str(info.value)
    assert message.startswith(f"{path}: layers [5, 9] has layer 9, but the model has 8 layers (0..7)")
    assert "\n" not in message and "rome-locate hparams --alg MEMIT" in message
    model, tok = load_fact_model("gpt2")
    before = params_hash(model)
    good = Plain.from_hparams(str(_yaml(tmp_path, "good")))
    editor = make_editor("easyedit", model, tok, good, model_name="fact-gpt2", workdir=tmp_path / "run")
    with pytest.raises(LayerRangeError, match=r"MEMIT hyperparameters \(MEMITHyperParams, file unknown\): layers "
                                              r"\[5, 9\] has layer 9"):
        with editor.edited_batch(model, tok, _facts(2), dataclasses.replace(good, layers=[5, 9])):
            pass
    with pytest.raises(LayerRangeError, match="v_loss_layer 47 is not a layer of the model"):
        with editor.edited_batch(model, tok, _facts(2), dataclasses.replace(good, v_loss_layer=47)):
            pass
    assert applied == [] and params_hash(model) == before
    editor.close()


# ---- R-ROME: the layer rule, as for ROME --------------------------------------------------------------------------

def _r_rome_yaml(tmp_path: Path, record: bool) -> Path:
    """The shipped fact-gpt2.yaml as an R-ROME YAML (absolute paths, few steps), its validation record beside it
    when `record`."""
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.hparams import bind_model, load_hparams, to_dict

    src = ROOT / "hparams" / "ROME" / "fact-gpt2.yaml"
    h = bind_model(load_hparams(src, easyedit=False), fact_model_dir("gpt2"))
    path = tmp_path / "fact-gpt2-r-rome.yaml"
    path.write_text(yaml.safe_dump({**to_dict(h), "alg_name": "R-ROME", "v_num_grad_steps": 5}, sort_keys=False))
    if record:
        shutil.copy(src.with_name("fact-gpt2.validation.json"), path.with_name(f"{path.stem}.validation.json"))
    return path


def _spy_r_rome(monkeypatch) -> list[int]:
    """Record the layer of every edit EasyEdit's own apply_r_rome_to_model makes."""
    from easyeditor.models.r_rome import r_rome_main

    layers: list[int] = []
    real = r_rome_main.apply_r_rome_to_model

    def spy(model, tok, requests, hparams, *args, **kwargs):
        assert type(hparams).__name__ == "R_ROMEHyperParams"  # EasyEdit's own class, the decided layer
        layers.extend(hparams.layers)
        return real(model, tok, requests, hparams, *args, **kwargs)

    monkeypatch.setattr(r_rome_main, "apply_r_rome_to_model", spy)
    return layers


def test_r_rome_requests_get_the_rules_layer(tmp_path, monkeypatch):
    """EasyEdit: R-ROME edits every request at the YAML's layer. Through the one-line change each request is traced
    and edited where the layer rule decides, as for ROME: the rule's defaults without a record beside the YAML
    (never the last layer), the record's rule with one (its null threshold: every request at the YAML's layer)."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.choose import layer_rule
    from rome_locate.easyedit import BaseEditor, R_ROMEHyperParams
    from rome_locate.facts import Fact
    from rome_locate.locate import locate

    layers = _spy_r_rome(monkeypatch)
    requests = _requests(2)
    editor = BaseEditor.from_hparams(R_ROMEHyperParams.from_hparams(str(_r_rome_yaml(tmp_path, record=False))))
    assert editor.layer_rule == layer_rule("traced", 1, 8, editor.hparams.hparams_path)
    settings = editor.hparams.trace_settings()
    expected = [editor.layer_rule.decide(locate(editor.model, editor.tok, [Fact(prompt=r["prompt"],
                subject=r["subject"], target=r["ground_truth"])], settings, progress=False)[0][0].effects)
                for r in requests]
    metrics, _, _ = editor.edit_requests(requests, verbose=False)
    assert [m["layer"] for m in metrics] == [d.layer for d in expected] == layers and 7 not in layers
    assert [m["layer_decision"]["source"] for m in metrics] == [d.source for d in expected]
    assert all("layer" not in r for r in requests)  # the caller's dicts untouched
    layers.clear()
    recorded = BaseEditor.from_hparams(R_ROMEHyperParams.from_hparams(str(_r_rome_yaml(tmp_path, record=True))))
    assert recorded.layer_rule.source.endswith("fact-gpt2-r-rome.validation.json")
    metrics, _, _ = recorded.edit_requests(requests, verbose=False)
    assert layers == [m["layer"] for m in metrics] == [1, 1]
    assert [m["layer_decision"]["source"] for m in metrics] == ["fallback", "fallback"]


def test_r_rome_batch_edits_one_after_another_at_the_hparams_layer(tmp_path, monkeypatch):
    """EasyEdit: R-ROME is not a batch method (batch_edit refuses it). edited_batch edits the facts one after
    another with edit_requests(sequential_edit=True) at the hyperparameters' layer, and then restores."""
    from easyeditor import R_ROMEHyperParams as Plain

    from rome_locate.editors import make_editor
    from rome_locate.fact_models import load_fact_model

    layers = _spy_r_rome(monkeypatch)
    hparams = dataclasses.replace(Plain.from_hparams(str(_r_rome_yaml(tmp_path, record=True))), layers=[2])
    model, tok = load_fact_model("gpt2")
    before = params_hash(model)
    editor = make_editor("easyedit", model, tok, hparams, model_name="fact-gpt2", workdir=tmp_path / "run")
    with editor.edited_batch(model, tok, _facts(2), hparams) as batch:
        assert params_hash(model) != before
    assert layers == [2, 2] and batch["layers"] == [2] and batch["alg_name"] == "R-ROME"
    assert [m["layer"] for m in batch["metrics"]] == [2, 2]
    assert params_hash(model) == before
    editor.close()


# ---- AlphaEdit: its projection file ------------------------------------------------------------------------------

def test_alphaedit_never_touches_the_working_directorys_projection_file(tmp_path, monkeypatch):
    """EasyEdit: AlphaEdit loads P from P_loc (shipped: ./null_space_project.pt) once per process, or computes it
    and saves it to ./null_space_project.pt whatever P_loc says; it sizes its key cache by the model's name (none of
    llama, qwen, gpt2-xl: it fails). Through the one-line change and edited_batch, another model's file in the working
    directory is neither read nor written: P is a per-model file under the work folder (an explicit P_loc is used as
    it is), and a batch's key cache is its own."""
    monkeypatch.chdir(tmp_path)
    from rome_locate.easyedit import AlphaEditHyperParams, BaseEditor, batch_edit_kwargs
    from rome_locate.editors import make_editor
    from rome_locate.fact_models import load_fact_model

    _fresh_alphaedit_state()
    foreign = tmp_path / "null_space_project.pt"
    foreign.write_bytes(b"another model's projection: loading this fails")
    editor = BaseEditor.from_hparams(AlphaEditHyperParams.from_hparams(str(_alphaedit_yaml(tmp_path, "alpha"))))
    p_file = Path(editor.hparams.P_loc)
    assert p_file.parent == tmp_path / "logs" / "alphaedit" and p_file.name.startswith("null_space_project-gpt2-")
    metrics, _, _ = editor.batch_edit(**batch_edit_kwargs(_requests(2)), verbose=False)
    assert p_file.is_file() and json.loads(p_file.with_suffix(".json").read_text())["layers"] == [0, 1, 2]
    assert foreign.read_bytes() == b"another model's projection: loading this fails"
    assert torch.load(p_file).shape == (3, 256, 256) and AlphaEdit_main.cache_c.shape == (3, 256, 256)
    foreign.unlink()

    model, tok = load_fact_model("gpt2")
    before = params_hash(model)
    hparams = AlphaEditHyperParams.from_hparams(str(_alphaedit_yaml(tmp_path, "alpha")))
    session = make_editor("easyedit", model, tok, hparams, model_name="fact-gpt2", workdir=tmp_path / "run")
    cache = AlphaEdit_main.cache_c
    with session.edited_batch(model, tok, _facts(2), hparams) as batch:
        assert params_hash(model) != before  # the projection leaves room for an edit
    assert params_hash(model) == before and AlphaEdit_main.cache_c is cache  # the process's cache is back
    assert len(batch["metrics"]) == 2 and not foreign.exists()
    [own] = (tmp_path / "run" / "logs" / "alphaedit").glob("*.pt")
    assert own.name.startswith("null_space_project-gpt2-")
    explicit = dataclasses.replace(hparams, P_loc="mine/P.pt")  # relative: the caller's working directory
    with session.edited_batch(model, tok, _facts(1), explicit):
        pass
    assert (tmp_path / "mine" / "P.pt").is_file() and not foreign.exists()
    session.close()


def test_alphaedit_through_the_one_line_change_matches_plain_easyedit(tmp_path, monkeypatch):
    """EasyEdit: AlphaEdit on a model whose name it knows (the LLaMA fact model's path has "llama"). The one-line
    change, with P in its own file, gives the same metrics and bit-identical edited weights as plain EasyEdit."""
    monkeypatch.chdir(tmp_path)
    from easyeditor import AlphaEditHyperParams as PlainHParams, BaseEditor as PlainEditor

    from rome_locate.easyedit import AlphaEditHyperParams, BaseEditor, batch_edit_kwargs
    from rome_locate.fact_models import fact_model_dir
    from rome_locate.models import load_model

    path, requests = _alphaedit_yaml(tmp_path, "alpha-llama", family="llama", batch_size=3), _requests(3, "llama")
    hparams = PlainHParams.from_hparams(str(path))
    model, tok = load_model(fact_model_dir("llama"), device="cpu")
    tok.padding_side = "right"  # what EasyEdit sets for a "llama" path
    _fresh_alphaedit_state()
    plain = PlainEditor.from_hparams(dataclasses.replace(hparams, model_name=(model, tok)))
    plain.model_name, plain.hparams = hparams.model_name, hparams
    theirs, _, _ = plain.batch_edit(**batch_edit_kwargs(requests), sequential_edit=True, verbose=False)
    assert (tmp_path / "null_space_project.pt").is_file()  # plain EasyEdit's, in the working directory

    _fresh_alphaedit_state()
    editor = BaseEditor.from_hparams(AlphaEditHyperParams.from_hparams(str(path)))
    ours, _, _ = editor.batch_edit(**batch_edit_kwargs(requests), sequential_edit=True, verbose=False)
    assert Path(editor.hparams.P_loc).parent == tmp_path / "logs" / "alphaedit"
    assert [m["pre"] for m in ours] == [m["pre"] for m in theirs]
    assert [m["post"] for m in ours] == [m["post"] for m in theirs]
    assert sum(m["post"]["rewrite_acc"][0] for m in ours) > 0  # the edits took
    mine = dict(editor.model.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(mine[name], value), name
