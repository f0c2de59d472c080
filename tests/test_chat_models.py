"""Chat models: prompts read through the tokenizer's chat template (`--chat-template`), and models whose code lives
in their own directory (`--trust-remote-code`).

The chat model is a tiny GPT-2 whose tokenizer carries a small Jinja chat template set here; the remote-code
model is a tiny GPT-2 subclass with its own config class and model_type, written as a Python file into its
model directory with `auto_map` pointing at it (no network: the code is local).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from conftest import SENTENCES, build_tiny_model
from rome_locate.arch import ARCH
from rome_locate.cli import main
from rome_locate.facts import Fact, neighbours
from rome_locate.prompts import model_input
from rome_locate.tokens import continuation, find_subject_range, prompt_ids

PROMPT, SUBJECT = "The Space Needle is in the city of", "The Space Needle"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
FACTS = [
    Fact(prompt=PROMPT, subject=SUBJECT, target="Seattle", target_new="Paris",
         rephrase_prompts=("Dorven Kaltmoor was born in the city of",),
         locality=neighbours(("Alma Berridge speaks the language of",), ("French",)), id="needle"),
    Fact(prompt="Miles Davis plays the", subject="Miles Davis", target="trumpet", target_new="nurse", id="miles"),
]
CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def chat_tok():
    """A byte-level BPE tokenizer with two turn tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def chat_model(chat_tok):
    return build_tiny_model("gpt2", len(chat_tok), n_layers=4), chat_tok


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, chat_model):
    """(model dir, facts file) of the tiny chat model, saved with its tokenizer and chat template."""
    model, tok = chat_model
    root = tmp_path_factory.mktemp("chat")
    model.save_pretrained(root / "tiny-chat")
    tok.save_pretrained(root / "tiny-chat")
    facts = root / "facts.json"
    facts.write_text(json.dumps([f.to_json() for f in FACTS]))
    return root / "tiny-chat", facts


def _error(err: str) -> str:
    """The one error line of a failed command (progress bars of transformers share stderr)."""
    [line] = [l for l in err.splitlines() if l.startswith("rome-locate ")]
    assert ": error: " in line
    return line


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# ---- the one prompt transform --------------------------------------------------------------


def test_subject_range_is_the_subjects_tokens_inside_the_templated_prompt(chat_tok):
    tok = chat_tok
    mi = model_input(tok, PROMPT, chat_template=True)
    assert mi.text == f"<|user|>{PROMPT}\n<|assistant|>" and mi.start == len("<|user|>") and not mi.special_tokens
    (b, e), occurrence, ids = find_subject_range(tok, PROMPT, SUBJECT, chat_template=True)
    assert ids == tok(mi.text, add_special_tokens=False)["input_ids"]
    assert [ids[0], ids[-1]] == _ids(tok, "<|user|>", "<|assistant|>") and occurrence == 0
    assert tok.decode(ids[b:e]) == SUBJECT
    (b0, e0), _, raw = find_subject_range(tok, PROMPT, SUBJECT)
    assert (b, e) == (b0 + 1, e0 + 1) and ids[1:1 + len(raw)] == raw  # shifted by the turn token
    # The target is the assistant's answer: it follows the generation prompt.
    full, positions = continuation(tok, PROMPT, "Seattle", chat_template=True)
    assert full[:len(ids)] == ids and positions[0] == len(ids) and tok.decode(full[positions[0]:]) == " Seattle"
    assert prompt_ids(tok, PROMPT, chat_template=True) == ids
    # Without the setting nothing changes: the prompt is the text the model reads.
    assert model_input(tok, PROMPT) == model_input(tok, PROMPT, False) and model_input(tok, PROMPT).text == PROMPT
    assert raw == tok(PROMPT)["input_ids"] and continuation(tok, PROMPT, "Seattle")[0][:len(raw)] == raw


def test_a_prompt_repeated_in_the_template_text_is_found_in_the_user_turn(chat_tok):
    import copy

    tok = copy.deepcopy(chat_tok)
    tok.chat_template = "Q: The city\n" + CHAT
    mi = model_input(tok, "The city", chat_template=True)
    assert mi.text[mi.start:].startswith("The city\n<|assistant|>") and mi.start > 0
    (b, e), _, ids = find_subject_range(tok, "The city", "The city", chat_template=True)
    assert ids[b - 1] == tok.convert_tokens_to_ids("<|user|>")


def test_a_tokenizer_without_a_chat_template_is_one_line_naming_the_flag(tiny_tokenizer, tmp_path, capsys):
    from rome_locate.trace import TraceSettings

    with pytest.raises(ValueError, match="--chat-template: the tokenizer has no chat template"):
        model_input(tiny_tokenizer, PROMPT, chat_template=True)
    with pytest.raises(ValueError, match="chat_template must be true or false"):
        TraceSettings(chat_template="yes")
    mdir = tmp_path / "plain"
    build_tiny_model("gpt2", len(tiny_tokenizer)).save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    argv = ["trace", "--model", str(mdir), "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2", *CPU]
    assert main(argv + ["--chat-template"]) == 2
    assert "error: --chat-template: the tokenizer has no chat template" in _error(capsys.readouterr().err)
    assert main(argv + ["--kinds", "mlp"]) == 0  # the same model without the flag traces


# ---- tracing, editing, scoring, self-sampling through the template --------------------------------


def test_tracing_reads_the_templated_prompt(chat_model):
    from rome_locate.trace import TraceSettings, trace_fact

    model, tok = chat_model
    fact = Fact(prompt=PROMPT, subject=SUBJECT, target="Seattle", id="needle")
    r = trace_fact(model, tok, fact, TraceSettings(samples=2, noise=0.5, chat_template=True))
    ids = prompt_ids(tok, PROMPT, chat_template=True)
    assert r.tokens == tuple(tok.decode([t]) for t in ids) and r.tokens[0] == "<|user|>"
    b, e = r.subject_range
    assert "".join(r.tokens[b:e]) == SUBJECT and r.settings.chat_template
    with torch.no_grad():
        p = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
    assert r.answer_id == int(p.argmax()) and r.high_score == pytest.approx(float(p.max()), rel=1e-5)
    plain = trace_fact(model, tok, fact, TraceSettings(samples=2, noise=0.5))
    assert plain.tokens[0] != "<|user|>" and plain.subject_range == (b - 1, e - 1)


def test_builtin_rome_edits_the_templated_prompt(chat_model):
    from rome_locate.editors import BuiltinRome
    from rome_locate.hparams import generate_hparams
    from rome_locate.rome import compute_key, compute_value, lookup_index

    model, tok = chat_model
    fact = FACTS[0]
    hp = generate_hparams(model, None, 1, "tiny", context_template_length_params=[], v_num_grad_steps=5,
                          v_weight_decay=0.0, clamp_norm_factor=100.0)
    (b, e), _, ids = find_subject_range(tok, PROMPT, SUBJECT, chat_template=True)
    assert lookup_index(tok, PROMPT, SUBJECT, "subject_last", chat_template=True) == e - 1
    assert lookup_index(tok, PROMPT, SUBJECT, "last", chat_template=True) == len(ids) - 1
    module = model.get_submodule(hp.rewrite_module_tmp.format(1))
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, a: seen.setdefault("k", a[0][0, e - 1].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    key = compute_key(model, tok, fact, hp, 1, ["{}"], chat_template=True)
    plain_key = compute_key(model, tok, fact, hp, 1, ["{}"])
    assert torch.allclose(key, seen["k"].float(), atol=1e-6) and not torch.allclose(key, plain_key)
    value, info = compute_value(model, tok, fact, hp, 1, ["{}"], chat_template=True)
    assert info["delta_norm"] > 0
    weight = module.weight.detach().clone()
    with torch.no_grad(), BuiltinRome(chat_template=True).edited(model, tok, fact, hp):
        # The key of the subject inside the templated prompt now gives v*; the plain prompt's key does not.
        torch.testing.assert_close(module(key[None])[0], value, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(module(plain_key[None])[0], value, rtol=1e-4, atol=1e-4)
    assert torch.equal(module.weight, weight)


def test_self_sampled_mom2_reads_texts_as_user_turns(chat_model, tmp_path, capsys):
    from rome_locate.stats import sample_texts, self_sample_mom2

    model, tok = chat_model
    [path] = self_sample_mom2(model, tok, None, [1], tmp_path, n_samples=3, model_name="m", chat_template=True)
    assert path.parent.name == "self_sample_chat_stats"
    assert json.loads(path.with_suffix(".json").read_text())["chat_template"] is True
    texts = sample_texts(model, tok, 3, chat_template=True)
    assert texts != sample_texts(model, tok, 3)  # sampled as the answer to a user turn, not from the BOS token
    count = int(np.load(path)["mom2.count"])
    # The texts pass through a one-text-a-line corpus file, read back as its first n lines (str.splitlines).
    lines = [line.strip() for line in "\n".join(t.replace("\n", " ") for t in texts).splitlines() if line.strip()]
    assert count == sum(len(prompt_ids(tok, line, chat_template=True)) for line in lines[:3])
    [plain] = self_sample_mom2(model, tok, None, [1], tmp_path, n_samples=3, model_name="m")
    assert plain.parent.name == "self_sample_stats" and int(np.load(plain)["mom2.count"]) < count
    corpus = tmp_path / "c.txt"
    corpus.write_text("one text\n")
    assert main(["stats", "--model", str(tmp_path / "never-loaded"), "--corpus", str(corpus), "--stats-dir",
                 str(tmp_path / "s"), "--chat-template", *CPU]) == 2
    assert "--chat-template applies to --self-sample" in _error(capsys.readouterr().err)


def test_locate_edit_eval_run_end_to_end_with_the_chat_template(chat_dir, chat_model, tmp_path, capsys):
    mdir, facts = chat_dir
    out = tmp_path / "loc.jsonl"
    trace = ["--samples", "2", "--noise", "0.5"]
    assert main(["locate", "--model", str(mdir), "--facts", str(facts), "--out", str(out), "--quiet",
                 "--chat-template", *trace, *CPU]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tok = chat_model[1]
    for rec, fact in zip(records, FACTS):
        b, e = rec["subject_range"]
        assert rec["tokens"][0] == "<|user|>" and rec["tokens"][-1] == "<|assistant|>"
        assert "".join(rec["tokens"][b:e]) == fact.subject and rec["settings"]["chat_template"] is True
        assert len(rec["tokens"]) == len(prompt_ids(tok, fact.prompt, chat_template=True))
    capsys.readouterr()
    assert main(["locate", "--model", str(mdir), "--facts", str(facts), "--out", str(out), "--quiet",
                 *trace, *CPU]) == 2
    assert "chat_template=True there, chat_template=False asked" in capsys.readouterr().err

    hp = tmp_path / "h.yaml"
    assert main(["hparams", "--model", str(mdir), "--facts", str(facts), "-o", str(hp), "--no-validate", "--quiet",
                 "--chat-template", "--set", "v_num_grad_steps=2", "context_template_length_params=[[4, 5]]",
                 *trace, *CPU]) == 0
    assert "chat_template=True" in hp.read_text()
    base = ["--model", str(mdir), "--facts", str(facts), "--hparams", str(hp), "--layers", "traced",
            "--chat-template", *trace, *CPU]
    assert main(["edit", *base, "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert main(["eval", *base, "--out", str(tmp_path / "v"), "--no-progress", "--max-new-tokens", "2",
                 "--no-heatmaps"]) == 0
    for run in ("e", "v"):
        data = json.loads((tmp_path / run / "results.json").read_text())
        assert data["settings"]["chat_template"] is True and data["settings"]["trace"]["chat_template"] is True
        assert data["settings"]["trust_remote_code"] is False and data["complete"] is True
        assert [r["fact_id"] for r in data["records"]] == ["needle", "miles"]
    located = [json.loads(line) for line in (tmp_path / "v" / "locate.jsonl").read_text().splitlines()]
    assert all(r["tokens"][0] == "<|user|>" for r in located)
    # The generation before the edit is the model's continuation of the templated prompt.
    gen = json.loads((tmp_path / "v" / "results.json").read_text())["records"][0]["generations"][0]
    model = chat_model[0]
    ids = torch.tensor([prompt_ids(tok, gen["prompt"], chat_template=True)])
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert gen["before"] == tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
    capsys.readouterr()
    assert main(["edit", *base, "--out", str(tmp_path / "ee"), "--editor", "easyedit"]) == 2
    assert "--chat-template: --editor easyedit tokenizes the raw prompts" in _error(capsys.readouterr().err)


def test_the_pipeline_refuses_traces_or_editors_that_read_prompts_otherwise(chat_model):
    from rome_locate.editors import BuiltinRome
    from rome_locate.hparams import generate_hparams
    from rome_locate.pipeline import edit_facts
    from rome_locate.trace import TraceSettings

    model, tok = chat_model
    hp = generate_hparams(model, None, 1, "tiny", context_template_length_params=[], v_num_grad_steps=1)
    with pytest.raises(ValueError, match="trace_settings has chat_template=False, the run chat_template=True"):
        edit_facts(model, tok, FACTS, hp, layers="traced", trace_settings=TraceSettings(), chat_template=True,
                   progress=False)
    with pytest.raises(ValueError, match="editor 'builtin' has chat_template=False, the run chat_template=True"):
        edit_facts(model, tok, FACTS, hp, editor=BuiltinRome(), chat_template=True, progress=False)


# ---- models whose code is in their own directory -----------------------------------------------

MODELING = """
from transformers import GPT2Config, GPT2LMHeadModel


class TinyRemoteConfig(GPT2Config):
    model_type = "tiny_remote"


class TinyRemoteLM(GPT2LMHeadModel):
    config_class = TinyRemoteConfig
"""


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, tiny_tokenizer):
    """(model dir, arch file, facts file): a GPT-2 subclass defined by a Python file in its own model directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("remote")
    mdir = root / "tiny-remote"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=3, n_embd=32, n_head=4,
                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(mdir)
    tiny_tokenizer.save_pretrained(mdir)
    (mdir / "modeling_tiny_remote.py").write_text(textwrap.dedent(MODELING))
    config = json.loads((mdir / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteLM"],
                  auto_map={"AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteLM"})
    (mdir / "config.json").write_text(json.dumps(config))
    names = ARCH["gpt2"].to_json()
    del names["n_layers"]
    arch = root / "arch.json"
    arch.write_text(json.dumps(names))
    facts = root / "facts.json"
    facts.write_text(json.dumps([FACTS[0].to_json()]))
    return mdir, arch, facts


def test_remote_code_is_refused_unless_asked(remote_dir, capsys):
    from rome_locate.models import fingerprint, load, load_model

    mdir, arch, _ = remote_dir
    with pytest.raises(ValueError) as info:
        load_model(mdir, device="cpu")
    assert "pass --trust-remote-code" in str(info.value) and "\n" not in str(info.value)
    argv = ["trace", "--model", str(mdir), "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
            "--kinds", "mlp", *CPU]
    assert main(argv + ["--arch", str(arch)]) == 2
    err = _error(capsys.readouterr().err)
    assert "needs Python code from its own directory" in err and "--trust-remote-code" in err
    # Loaded with its own code, the family is unknown to the ARCH table: --arch names its modules.
    assert main(argv + ["--trust-remote-code"]) == 2
    assert "unknown model_type 'tiny_remote'" in _error(capsys.readouterr().err)
    assert main(argv + ["--trust-remote-code", "--arch", str(arch)]) == 0
    err = capsys.readouterr().err
    assert err.count("--trust-remote-code: running Python code from the model directory") == 1
    assert "TinyRemoteLM" in err
    lm = load(mdir, arch=str(arch), device="cpu", trust_remote_code=True)
    assert type(lm.model).__name__ == "TinyRemoteLM" and lm.arch.n_layers == 3
    assert fingerprint(lm.model).remote_code and not fingerprint(build_tiny_model("gpt2", 300)).remote_code


def test_remote_code_is_recorded_in_the_run_settings(remote_dir, tmp_path, capsys):
    mdir, arch, facts = remote_dir
    model = ["--model", str(mdir), "--arch", str(arch), "--trust-remote-code", *CPU]
    out = tmp_path / "loc.jsonl"
    assert main(["locate", *model, "--facts", str(facts), "--out", str(out), "--samples", "2", "--quiet"]) == 0
    assert json.loads(out.read_text())["model"]["remote_code"] is True
    hp = tmp_path / "h.yaml"
    assert main(["hparams", *model, "--facts", str(facts), "-o", str(hp), "--layer", "1", "--quiet",
                 "--set", "v_num_grad_steps=2", "context_template_length_params=[]"]) == 0
    assert main(["edit", *model, "--facts", str(facts), "--hparams", str(hp), "--out", str(tmp_path / "e"),
                 "--quiet"]) == 0
    settings = json.loads((tmp_path / "e" / "results.json").read_text())["settings"]
    assert settings["trust_remote_code"] is True and settings["model_fingerprint"]["remote_code"] is True
    assert settings["chat_template"] is False
