"""Shared fixtures: tiny seeded models and a tokenizer built here, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The EasyEdit snapshot the EasyEdit tests run against (../shared/vendor/EasyEdit from the repository root, see
# its VENDORED.md), unless EASYEDIT_PATH names another clone. In CI (CI=true) a missing one fails those tests.
VENDORED_EASYEDIT = Path(__file__).resolve().parent.parent.parent / "shared" / "vendor" / "EasyEdit"
if not os.environ.get("EASYEDIT_PATH") and VENDORED_EASYEDIT.is_dir():
    os.environ["EASYEDIT_PATH"] = str(VENDORED_EASYEDIT)

import pytest
import torch

torch.set_num_threads(1)

SENTENCES = [
    "The Space Needle is in the city of Seattle.",
    "Dorven Kaltmoor was born in the city of Paris.",
    "Alma Berridge speaks the language of French.",
    "The Eiffel Tower is in Paris, and the Colosseum is in Rome.",
    "Miles Davis plays the trumpet; Marta Lind works as a nurse.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE fast tokenizer trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(family: str, vocab_size: int, n_layers: int = 4, d: int = 32, seed: int = 0):
    """A seeded random-initialised causal LM of the given family."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layers, n_embd=d, n_head=4, n_positions=128,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=n_layers, hidden_size=d, intermediate_size=2 * d,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def params_hash(model) -> str:
    """SHA-256 over every parameter's name and bytes: equal hashes mean bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tiny_tokenizer):
    """(model, tokenizer) for each tiny family."""
    return build_tiny_model(request.param, len(tiny_tokenizer)), tiny_tokenizer


def require_easyedit() -> None:
    """Import EasyEdit for a test module, or skip the module; under CI=true a missing EasyEdit fails instead."""
    try:
        from rome_locate.easyedit import import_easyedit

        import_easyedit()
    except ImportError as exc:
        if os.environ.get("CI"):
            raise  # CI must run these tests against the snapshot
        pytest.skip(f"EasyEdit is not importable (set EASYEDIT_PATH to a clone of zjunlp/EasyEdit): {exc}",
                    allow_module_level=True)
