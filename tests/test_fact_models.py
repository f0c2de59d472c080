"""The shipped fact models: offline loading, accuracy, tokenizer offsets, size."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from rome_locate import fact_models as FM  # noqa: E402
from rome_locate.fact_models import train as FT  # noqa: E402
from rome_locate.fact_models import world as W  # noqa: E402
from rome_locate.facts import load_facts  # noqa: E402

SAMPLE_EVERY = 7  # accuracy on every 7th prompt: ~1100 train and ~370 paraphrase prompts per model


@pytest.fixture(scope="module", params=FM.FAMILIES)
def loaded(request):
    torch.set_num_threads(1)
    model, tok = FM.load_fact_model(request.param)
    return request.param, model, tok


def test_shipped_files_present():
    for family in FM.FAMILIES:
        d = FM.fact_model_dir(family)
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "facts_known.json", "counterfact.json", "corpus.txt",
                     "world.json", "NOTES.md"):
            assert (d / name).is_file(), (family, name)
        assert FM.facts_path(family).parent == d and FM.counterfact_path(family).parent == d
        assert FM.corpus_path(family).parent == d


def test_total_size_under_20mb():
    total = sum(p.stat().st_size for p in FM.ROOT.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, total


def test_loads_offline_float32(loaded):
    family, model, tok = loaded
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert next(model.parameters()).dtype == torch.float32
    cfg = model.config
    assert cfg.model_type == ("gpt2" if family == "gpt2" else "llama")
    assert cfg.vocab_size == len(tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(cfg, name)
        assert tid is not None and 0 <= tid < cfg.vocab_size
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert not model.training


def test_accuracy(loaded):
    family, model, tok = loaded
    acc = FT.accuracy(model, tok, family, every=SAMPLE_EVERY)
    assert acc["n_train"] > 500 and acc["n_paraphrase"] > 200
    assert acc["train_acc"] >= 0.95, acc
    assert acc["paraphrase_acc"] >= 0.90, acc


def test_known_facts_are_known(loaded):
    family, model, tok = loaded
    facts = load_facts(FM.facts_path(family))[::10]
    acc = FT.top1_accuracy(model, tok, [(f.prompt, f.target) for f in facts])
    assert acc >= 0.95


def test_tokenizer_bos_and_offsets(loaded):
    family, _, tok = loaded
    world = W.build_world(0)
    subject = world.subjects[3]
    prompt = f"The birthplace of {subject} is"
    enc = tok(prompt, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if family == "llama":
        assert ids[0] == tok.bos_token_id and tuple(offsets[0]) == (0, 0)
        assert tok.bos_token == "<s>"
    else:
        assert tok.bos_token_id not in ids
    start = prompt.index(subject)
    end = start + len(subject)
    span = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    assert len(span) >= 3  # the subject is several tokens
    assert span == list(range(span[0], span[-1] + 1))
    # the subject's tokens are exactly those of the subject tokenized on its own
    alone = tok(" " + subject, add_special_tokens=False)["input_ids"]
    assert [ids[i] for i in span] == alone
    assert prompt[offsets[span[-1]][0] : offsets[span[-1]][1]].strip() and offsets[span[-1]][1] == end
    # objects are single tokens
    for rel in world.relations:
        for obj in rel.objects:
            assert len(tok(" " + obj, add_special_tokens=False)["input_ids"]) == 1, obj


def test_padding_consistent_with_unpadded(loaded):
    family, model, tok = loaded
    subjects = W.build_world(0).subjects
    prompts = [f"The birthplace of {subjects[0]} is", f"{subjects[1]} plays the"]
    single = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            single.append(model(input_ids=ids).logits[0, -1])
        batch = tok(prompts, return_tensors="pt", padding=True)
        logits = model(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    for i in range(len(prompts)):
        assert torch.allclose(logits[i, last[i]], single[i], atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_paths_load_offline(family, capsys):
    # What `rome-locate fact-model F --path` prints is what from_pretrained loads, with no network.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rome_locate.cli import main

    assert main(["fact-model", family, "--path"]) == 0
    path = capsys.readouterr().out.strip()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family and len(tok) == model.config.vocab_size
    assert main(["fact-model", family, "--facts"]) == 0
    assert len(load_facts(capsys.readouterr().out.strip())) == 1280
    assert main(["fact-model", family, "--counterfact"]) == 0
    cf = load_facts(capsys.readouterr().out.strip())
    assert len(cf) == 400 and all(f.target_new and f.target_new != f.target for f in cf)


def test_every_command_loads_a_model_next_to_a_torchvision_that_cannot_load(tmp_path):
    """EasyEdit's requirements bring a torchvision built for another torch; transformers imports it whenever it is
    installed, so without the workaround no model loads (`operator torchvision::nms does not exist`)."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "l.jsonl"
    run = subprocess.run([sys.executable, "-m", "rome_locate", "locate", "--model", str(FM.fact_model_dir("gpt2")),
                          "--facts", str(FM.facts_path("gpt2")), "--limit", "1", "--samples", "1", "--device", "cpu",
                          "--quiet", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "treated as absent" in run.stderr
    assert len(out.read_text().splitlines()) == 1


def test_deeper_models_train_into_their_own_folder():
    # 8 layers is the shipped shape and keeps today's paths; another depth adds `-<N>l` (git-ignored folder).
    from pathlib import Path

    assert FT.N_LAYERS == 8
    assert FT.model_dir("gpt2") == FM.fact_model_dir("gpt2")
    assert FT.local_model_dir("world3", "gpt2") == Path("local_fact_models/world3-gpt2")
    assert FT.model_dir("gpt2", "world3", 8) == Path("local_fact_models/world3-gpt2")
    assert FT.model_dir("gpt2", n_layers=16) == Path("local_fact_models/default-gpt2-16l")
    assert FT.local_model_dir("world3", "gpt2", 16) == Path("local_fact_models/world3-gpt2-16l")
    assert FT.model_dir("llama", "default", 4) == Path("local_fact_models/default-llama-4l")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="number of layers"):
            FT.local_model_dir("default", "gpt2", bad)


@pytest.mark.parametrize("family", FM.FAMILIES)
def test_build_model_takes_the_depth(family):
    # No training: the config of a freshly built model, on the shipped tokenizer.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FM.fact_model_dir(family))
    deep, shipped = FT.build_model(family, tok, n_layers=16), FT.build_model(family, tok)
    assert deep.config.num_hidden_layers == 16 and shipped.config.num_hidden_layers == FT.N_LAYERS
    assert deep.config.hidden_size == shipped.config.hidden_size == FT.D_MODEL
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in shipped.parameters())


def test_layers_option_reaches_train_and_accuracy(monkeypatch):
    from pathlib import Path

    import rome_locate.models as models

    seen = {}
    monkeypatch.setattr(FT, "train", lambda family, **kw: seen.update(train=(family, kw)))
    assert FT.main(["train", "gpt2", "--layers", "16"]) == 0
    assert seen["train"] == ("gpt2", {"max_steps": None, "out_dir": None, "world": "default", "n_layers": 16})

    class Loaded(Exception):
        pass

    def load_model(path, **kw):
        seen["load"] = Path(path)
        raise Loaded

    monkeypatch.setattr(models, "load_model", load_model)
    with pytest.raises(Loaded):
        FT.main(["accuracy", "gpt2", "--layers", "16", "--world", "world3"])
    assert seen["load"] == Path("local_fact_models/world3-gpt2-16l")
    with pytest.raises(Loaded):
        FT.main(["accuracy", "gpt2"])
    assert seen["load"] == FM.fact_model_dir("gpt2")
