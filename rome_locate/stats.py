"""Second-moment statistics of ROME's rewrite-module inputs, in the file layout EasyEdit reads offline.

ROME's update uses C = E[k k^T], the uncentred covariance of the keys k (the
inputs of the MLP output projection) over token positions of a text corpus.
EasyEdit computes it from Wikipedia downloaded from the hub, unless a cached
file is already on disk. This module writes that cached file from a local text
file, so `mom2_adjustment: true` works offline.

The format is EasyEdit's (easyeditor/models/rome/layer_stats.py, `layer_stats`,
and easyeditor/util/runningstats.py, `SecondMoment.state_dict`, `tally`,
`load_cached_state`), hard-coded here so nothing depends on EasyEdit:

    {stats_dir}/{model dir name}/{mom2_dataset}_stats/{layer_name}_{precision}_mom2_{sample_size}.npz

with `model dir name` = the last path component of `model.config._name_or_path`,
`layer_name` = the rewrite module's name (`transformer.h.3.mlp.c_proj`) and npz keys

    mom2.constructor  the Stat's constructor expression (a string; not read back)
    mom2.count        number of token positions summed
    mom2.mom2         sum over positions of k k^T, shape (d_in, d_in), in `precision`
    sample_size       the requested number of texts; EasyEdit re-computes when it differs

Beside each npz rome-locate writes a JSON record of the model it was computed on (`rome_locate.mom2_owner`), and
refuses to read or write over statistics whose record names another model.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Arch, arch_for, check_layer
from .files import atomic_path, not_utf8, write_text
from .hooks import captured_inputs
from .hparams import RomeParams
from .models import context_length, input_device
from .mom2_owner import Identity, check_readable, check_writable, record_path
from .tokens import pad_id, prompt_ids, right_pad

# EasyEdit's SecondMoment lives in easyeditor.util.runningstats; its state_dict writes this.
_CONSTRUCTOR = "easyeditor.util.runningstats.SecondMoment()"
DTYPES = ("float16", "float32", "float64")
# EasyEdit (runningstats.box_numpy_null) stores None as this NaN bit pattern; `sample_size`
# must be present even when None, or EasyEdit's cache check recomputes.
_NULL = np.array(struct.unpack(">d", struct.pack(">Q", 0xFFF8000000000002))[0], dtype=np.float64)


def stats_model_name(model: nn.Module) -> str:
    """The model folder name EasyEdit's layer_stats uses: the last component of `config._name_or_path`."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    # EasyEdit: model.config._name_or_path.rsplit("/")[-1]
    return name.rsplit("/")[-1]


def folder_name(value: str, what: str) -> str:
    """`value` when it is one plain folder name, so a path built from it stays inside its parent; else a ValueError."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError(f"{what} {value!r} must be one folder name (no '/', not '.' or '..'), so the statistics "
                         f"stay inside the stats directory")
    return value


def check_n_samples(n_samples: int | None, what: str = "n_samples") -> int | None:
    """`n_samples` when it is None or an integer >= 1; else a ValueError naming `what`."""
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"{what} must be >= 1 (the number of corpus lines), got {n_samples!r}")
    return n_samples


def mom2_path(stats_dir: str | Path, model_name: str, layer_name: str, mom2_dataset: str,
              n_samples: int | None, dtype: str) -> Path:
    """The npz path EasyEdit's layer_stats reads for these settings."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not model_name:
        raise ValueError("model_name is empty: the model has no config._name_or_path; pass model_name explicitly")
    folder_name(model_name, "model_name")
    folder_name(mom2_dataset, "mom2_dataset")
    folder_name(layer_name, "layer name")
    suffix = "" if n_samples is None else f"_{n_samples}"
    return Path(stats_dir) / model_name / f"{mom2_dataset}_stats" / f"{layer_name}_{dtype}_mom2{suffix}.npz"


def read_corpus(path: str | Path, n_samples: int | None = None) -> list[str]:
    """Non-empty lines of a text file (one text a line), the first `n_samples` of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus {not_utf8(path, exc, data)}") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"corpus {path} has no non-empty lines")
    return texts if n_samples is None else texts[:n_samples]




@torch.no_grad()
def second_moments(model: nn.Module, tok: Any, layer_names: Sequence[str], texts: Iterable[str],
                   batch_size: int = 32, progress: bool = False,
                   chat_template: bool = False) -> dict[str, tuple[torch.Tensor, int]]:
    """Sum of k k^T (float64) and the number of token positions, per named module's input (each text read as a
    user turn of the chat template with `chat_template`)."""
    device = input_device(model)
    max_len = context_length(model) or 512
    texts = list(texts)
    pad = pad_id(tok)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="mom2", disable=not progress):
        ids = [prompt_ids(tok, t, chat_template, max_length=max_len) for t in texts[start:start + batch_size]]
        ids = [x for x in ids if x]
        if not ids:
            continue
        # Padded positions are masked out below.
        input_ids, mask = right_pad(ids, pad, device)
        # stop: only the rewrite modules' inputs are needed, not the layers above them or the head.
        with captured_inputs(model, list(layer_names), tokens=tuple(input_ids.shape), stop=True) as cache:
            model(input_ids=input_ids, attention_mask=mask)
        keep = mask.reshape(-1).bool()
        for name in layer_names:
            k = cache[name].reshape(-1, cache[name].shape[-1])[keep.to(cache[name].device)].double()
            sums[name] = sums.get(name, 0) + k.T @ k
        count += int(keep.sum())
    if count == 0:
        raise ValueError("the corpus produced no tokens")
    return {name: (sums[name].cpu(), count) for name in layer_names}


def _save_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool) -> None:
    with atomic_path(path) as tmp:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)


def compute_mom2(model: nn.Module, tok: Any, arch: Arch | str | Path | dict | None, layers: Sequence[int],
                 corpus_path: str | Path, stats_dir: str | Path, model_name: str | None = None,
                 mom2_dataset: str = "wikipedia", n_samples: int | None = 100000, dtype: str = "float32",
                 batch_size: int = 32, compressed: bool = True, progress: bool = False,
                 record: dict[str, Any] | None = None,
                 chat_template: bool = False) -> list[Path]:
    """Write EasyEdit-format mom2 files for the rewrite module of each layer, each with its record; returns their
    paths.

    `n_samples` is the number of corpus lines used and also the `_N` in the file
    name; EasyEdit looks for the name with its `mom2_n_samples`, so keep the two
    equal (a corpus shorter than `n_samples` is used whole, as EasyEdit does).
    The record beside each npz names the model (`mom2_owner`) and holds how the
    statistics were made (`record`, default: the corpus); files recorded as
    another model's are refused before any work.
        `chat_template` reads each line as a user turn of the tokenizer's chat template (self-sampled texts of a
    chat model; a corpus is plain text, and the command line reads it so).
    """
    if not isinstance(arch, Arch) or not arch.n_layers:
        arch = arch_for(model, arch)
    if not layers:
        raise ValueError("no layers given")
    for layer in layers:
        check_layer(layer, arch.n_layers)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_n_samples(n_samples)
    model_name = model_name or stats_model_name(model)
    names = [arch.rewrite_module(layer) for layer in layers]
    paths = [mom2_path(stats_dir, model_name, name, mom2_dataset, n_samples, dtype) for name in names]
    check_writable(paths, model)
    owner = Identity(model).record()  # before the forwards: the model as it is asked about
    texts = read_corpus(corpus_path, n_samples)
    moments = second_moments(model, tok, names, texts, batch_size=batch_size, progress=progress,
                             chat_template=chat_template)
    made = record if record is not None else {"source": f"corpus {Path(corpus_path).resolve()}"}
    for name, path in zip(names, paths):
        total, count = moments[name]
        _save_npz(path, {
            "mom2.constructor": np.array(_CONSTRUCTOR),
            "mom2.count": np.array(count),
            "mom2.mom2": total.numpy().astype(dtype),
            "sample_size": _NULL if n_samples is None else np.array(n_samples),
        }, compressed)
        # After the npz: a crash in between leaves statistics without a record, which are checked by shape.
        write_text(record_path(path), json.dumps({**owner, "mom2_dataset": mom2_dataset, "n_samples": n_samples,
                                                  "dtype": dtype, **made}, indent=1) + "\n")
    return paths


# ---- statistics without a corpus: texts sampled from the model itself ---------

SELF_SAMPLE_DATASET = "self_sample"  # the mom2_dataset name self-sampled statistics are filed under
SELF_SAMPLE_CHAT_DATASET = "self_sample_chat"  # ... and those sampled and read through the chat template
SELF_SAMPLE_NEW_TOKENS = 24
SELF_SAMPLE_SEED = 0


def self_sample_dataset(chat_template: bool = False) -> str:
    """The mom2_dataset name of self-sampled statistics (chat-templated keys are filed apart from plain ones)."""
    return SELF_SAMPLE_CHAT_DATASET if chat_template else SELF_SAMPLE_DATASET


@torch.no_grad()
def sample_texts(model: nn.Module, tok: Any, n: int, new_tokens: int = SELF_SAMPLE_NEW_TOKENS,
                 seed: int = SELF_SAMPLE_SEED, batch_size: int = 500, chat_template: bool = False) -> list[str]:
    """`n` texts sampled from the model from its BOS token, or with `chat_template` as the answer to an empty
    user turn: plain sampling (temperature 1, no top-k), seeded."""
    if n < 1:
        raise ValueError(f"the number of self-sampled texts must be >= 1, got {n}")
    if chat_template:
        prefix = prompt_ids(tok, "", chat_template=True)
    else:
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
        prefix = [bos]
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    texts: list[str] = []
    for lo in range(0, n, batch_size):
        ids = torch.tensor([prefix] * min(batch_size, n - lo), dtype=torch.long, device=device)
        for _ in range(new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
            nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen).to(device)
            ids = torch.cat([ids, nxt], dim=1)
        texts += [tok.decode(row[len(prefix):], skip_special_tokens=True).strip() for row in ids.tolist()]
    # An empty decode (all special tokens) still has the start's keys; keep one placeholder.
    return [t if t else tok.decode(prefix[-1:]) for t in texts]


def self_sample_mom2(model: nn.Module, tok: Any, arch: Arch | str | Path | dict | None, layers: Sequence[int],
                     stats_dir: str | Path, n_samples: int = 3000, model_name: str | None = None,
                     dtype: str = "float32", seed: int = SELF_SAMPLE_SEED,
                     new_tokens: int = SELF_SAMPLE_NEW_TOKENS, progress: bool = False,
                     chat_template: bool = False) -> list[Path]:
    """mom2 files (EasyEdit layout, dataset `self_sample`) from `n_samples` texts the model samples itself.

    With `chat_template` the texts are sampled as answers to an empty user turn and read back as user turns
    (dataset `self_sample_chat`): the keys an edit of a chat-templated prompt reads.
    The sampling settings go into the record beside each npz (same name, `.json`), with the model's identity.
    """
    import tempfile

    if not isinstance(arch, Arch) or not arch.n_layers:
        arch = arch_for(model, arch)
    name = model_name or stats_model_name(model)
    dataset = self_sample_dataset(chat_template)
    check_writable([mom2_path(stats_dir, name, arch.rewrite_module(layer), dataset, n_samples, dtype)
                    for layer in layers], model)  # before the sampling
    texts = sample_texts(model, tok, n_samples, new_tokens=new_tokens, seed=seed, chat_template=chat_template)
    settings = {"source": "texts sampled from the model itself (rome_locate.stats.sample_texts)",
                "n_texts": n_samples, "new_tokens": new_tokens, "seed": seed,
                "start": "an empty user turn of the chat template" if chat_template else "bos token",
                "chat_template": chat_template,
                "sampling": "plain (temperature 1, no top-k/top-p)", "mom2_dataset": dataset,
                "dtype": dtype, "example_texts": texts[:5]}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "self_sample.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
        return compute_mom2(model, tok, arch, layers, corpus, stats_dir, model_name=model_name,
                            mom2_dataset=dataset, n_samples=n_samples, dtype=dtype, progress=progress,
                            record=settings, chat_template=chat_template)


def missing_mom2_layers(model: nn.Module, hparams: Any, layers: Sequence[int]) -> list[int]:
    """Layers among `layers` whose mom2 file (as the hyperparameters name it) is not on disk."""
    name = stats_model_name(model) or str(hparams.model_name).rstrip("/").rsplit("/")[-1]
    return sorted(l for l in set(layers) if not mom2_path(
        hparams.stats_dir, name, hparams.rewrite_module_tmp.format(l), hparams.mom2_dataset,
        hparams.mom2_n_samples, hparams.mom2_dtype).is_file())


def ensure_self_sampled(model: nn.Module, tok: Any, hparams: Any, layers: Sequence[int],
                        stats_dir: str | Path | None = None, n_samples: int | None = None,
                        notice: Any = print, arch: Arch | None = None, chat_template: bool = False) -> Any:
    """Hyperparameters whose mom2 files exist for `layers`: when some are missing, self-sampled ones are used.

    Without a corpus this is the fallback of `hparams`, `edit` and `eval`: the
    statistics come from texts the model samples itself (`self_sample_mom2`),
    written under `stats_dir` (default: the hyperparameters' own), and a notice
    is printed. Hyperparameters without mom2_adjustment are returned as they are. `arch` is the model's
    resolved architecture (a family known only through --arch has no other). With `chat_template` the texts
    are sampled and read through the chat template (`self_sample_mom2`).
    """
    import dataclasses

    if not hparams.mom2_adjustment:
        return hparams
    if not missing_mom2_layers(model, hparams, layers):
        check_mom2(model, hparams, layers)
        return hparams
    dataset = self_sample_dataset(chat_template)
    n = int(n_samples or (hparams.mom2_n_samples if hparams.mom2_dataset == dataset else 3000))
    out = dataclasses.replace(hparams, mom2_dataset=dataset, mom2_n_samples=n,
                              stats_dir=str(stats_dir or hparams.stats_dir))
    todo = missing_mom2_layers(model, out, layers)
    if todo:
        name = stats_model_name(model) or str(hparams.model_name).rstrip("/").rsplit("/")[-1]
        notice(f"notice: mom2 statistics missing ({hparams.mom2_dataset}, layers {todo}) and no corpus given: "
               f"using covariance statistics of {n} texts sampled from the model itself "
               f"(written to {out.stats_dir})")
        self_sample_mom2(model, tok, arch, todo, out.stats_dir, n_samples=n, model_name=name,
                         dtype=hparams.mom2_dtype, chat_template=chat_template)
    check_mom2(model, out, layers)
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays load_mom2 reads from an npz; a damaged file is a ValueError naming it, not zipfile's traceback."""
    def unreadable(why: str) -> ValueError:
        return ValueError(f"{path}: not a readable mom2 statistics file ({why}); recompute it with `rome-locate stats`")

    # np.load would read anything that is not a zip or .npy as a pickle (refused, but with a misleading message).
    if not zipfile.is_zipfile(path):
        raise unreadable("not a complete npz archive: truncated, damaged or another format")
    try:
        # allow_pickle=False (the default, stated): an object array is refused, never unpickled.
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in ("mom2.count", "mom2.mom2", "sample_size") if key in data.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise unreadable(str(exc).split("\n")[0][:120]) from None


def load_mom2(path: str | Path, n_samples: int | None = None) -> torch.Tensor:
    """C = E[k k^T] (float32) from an EasyEdit-format mom2 file; `n_samples` is checked when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"mom2 statistics not found: {path}. Compute them offline with "
            f"`rome-locate stats --model PATH --corpus TEXT --layers N --stats-dir DIR`, "
            f"or set mom2_adjustment: false")
    arrays = _read_npz(path)
    missing = {"mom2.count", "mom2.mom2"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: not a mom2 statistics file (missing keys {sorted(missing)})")
    stored = arrays.get("sample_size", _NULL)
    if n_samples is not None and (np.isnan(stored) or int(stored) != n_samples):
        raise ValueError(f"{path}: computed with sample_size {stored}, "
                         f"hyperparameters ask for {n_samples}")
    count = int(arrays["mom2.count"])
    total = torch.from_numpy(arrays["mom2.mom2"].astype(np.float64))
    if count <= 0:
        raise ValueError(f"{path}: mom2.count is {count}")
    return (total / count).float()


def _hparams_path(model: nn.Module, hparams: Any, layer: int) -> Path:
    # EasyEdit names the folder after config._name_or_path; a model built in memory has none.
    name = stats_model_name(model) or str(hparams.model_name).rstrip("/").rsplit("/")[-1]
    return mom2_path(hparams.stats_dir, name, hparams.rewrite_module_tmp.format(layer),
                     hparams.mom2_dataset, hparams.mom2_n_samples, hparams.mom2_dtype)


def check_mom2(model: nn.Module, hparams: Any, layers: Iterable[int]) -> None:
    """A ValueError when a mom2 file the hyperparameters name for `layers` is another model's (`mom2_owner`);
    missing files pass. Call it before editing: an edited model has other weights than the one recorded."""
    identity = None
    for layer in sorted(set(layers)):
        path = _hparams_path(model, hparams, layer)
        if path.is_file():
            identity = check_readable(path, model, hparams.rewrite_module_tmp.format(layer), identity)


def mom2_for(model: nn.Module, hparams: RomeParams, layer: int) -> torch.Tensor:
    """The mom2 matrix the hyperparameters name for `layer` (stats_dir, dataset, sample size, dtype); statistics
    recorded as another model's, or of another shape, are refused."""
    path = _hparams_path(model, hparams, layer)
    if path.is_file():
        check_readable(path, model, hparams.rewrite_module_tmp.format(layer))
    cov = load_mom2(path, hparams.mom2_n_samples)
    if not bool(torch.isfinite(cov).all()):
        # An edit through them would make the model non-finite.
        raise ValueError(f"mom2 statistics {path} hold non-finite numbers (NaN or inf); recompute them "
                         f"(`rome-locate stats`) or set mom2_adjustment: false")
    return cov
