"""Whose mom2 statistics: a JSON record beside each npz naming the model they were computed on, and the checks
that keep rome-locate from reading, or writing over, another model's statistics.

EasyEdit files statistics by the model folder's name alone (`{stats_dir}/{folder}/...`, `rome_locate.stats`), so
two models in folders of one name share every file. The npz stays exactly as EasyEdit writes and reads it; the
record (`record_path`: the same name, `.json`) holds the model's fingerprint (`models.fingerprint`) and digests of
its weights as float32, float16 and bfloat16 hold them, so that the same weights loaded from another folder or in
a lower precision count as the same model. Statistics without a record (EasyEdit's own downloads) are used as
before, once their shape fits the model.
"""

from __future__ import annotations

import hashlib
import json
import weakref
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .hooks import get_module
from .models import ModelFingerprint, fingerprint, model_dtype

DIGEST_DTYPES = ("float32", "float16", "bfloat16")
_VALUES = 64  # values sampled per parameter for the weight digests
# Statistics checked against a model object: an edit changes the model's weights (and so its digests), so a
# file is checked once, while the model is as it was loaded (the pipeline checks every layer before editing).
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def record_path(npz: str | Path) -> Path:
    """The JSON record beside a mom2 npz file."""
    return Path(npz).with_suffix(".json")


@torch.no_grad()
def weights_digests(model: nn.Module) -> dict[str, str]:
    """Per dtype, a digest of the parameter names, shapes and sampled values as that dtype holds them (not the
    folder the model was loaded from)."""
    hashes = {dtype: hashlib.sha256() for dtype in DIGEST_DTYPES}
    for name, p in model.named_parameters():
        sample = None
        if p.device.type != "meta" and p.is_floating_point():  # an offloaded weight counts by name and shape
            flat = p.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // _VALUES)][:_VALUES].cpu()
        for dtype, h in hashes.items():
            h.update(f"{name}:{tuple(p.shape)}".encode())
            if sample is not None:
                h.update(sample.to(getattr(torch, dtype)).float().numpy().tobytes())
    return {dtype: h.hexdigest() for dtype, h in hashes.items()}


def _where(model: nn.Module) -> str:
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        return f"a {type(model).__name__} built in memory"
    return str(Path(name).resolve()) if Path(name).exists() else name  # a hub name stays as given


class Identity:
    """A model as the records name it: its fingerprint, weight digests and folder, computed once per check."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.fingerprint = fingerprint(model)
        self.digests = weights_digests(model)
        self.dtype = str(model_dtype(model)).replace("torch.", "")

    def record(self) -> dict[str, Any]:
        """What the record beside a new npz says of the model."""
        return {"model": _where(self.model), "model_fingerprint": self.fingerprint.to_json(),
                "weights": self.digests}

    def describe(self) -> str:
        """The model in one phrase: family, size, dtype, digest and folder."""
        return f"{self.fingerprint.short()} from {_where(self.model)}"

    def owns(self, record: dict[str, Any]) -> bool:
        """Whether `record` names this model (the same fingerprint, or the same weights at this model's dtype)."""
        recorded = record.get("model_fingerprint") or {}
        if recorded.get("digest") == self.fingerprint.digest:
            return True
        return (record.get("weights") or {}).get(self.dtype) == self.digests.get(self.dtype)


def read_record(npz: str | Path) -> dict[str, Any] | None:
    """The record beside `npz` when it names a model; None without one (or with one that names no model)."""
    path = record_path(npz)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: the record of the mom2 statistics {Path(npz).name} is not valid JSON ({exc}); "
                         f"delete it to use the statistics without a record") from None
    if not isinstance(record, dict) or not isinstance(record.get("model_fingerprint"), dict):
        return None  # self-sampling settings written before records named the model
    return record


def _recorded(record: dict[str, Any]) -> str:
    try:
        short = ModelFingerprint.from_json(record["model_fingerprint"]).short()
    except (TypeError, ValueError, KeyError):
        short = "a model"
    return f"{short} from {record.get('model', '?')}"


def _folder(npz: Path) -> str:
    return npz.parent.parent.name  # {stats_dir}/{folder}/{dataset}_stats/{file}


def check_writable(paths: Iterable[Path], model: nn.Module) -> None:
    """A ValueError when any of `paths` holds another model's recorded statistics: they are never written over."""
    identity = None
    for npz in paths:
        record = read_record(npz)
        if record is None:
            continue
        identity = identity or Identity(model)
        if not identity.owns(record):
            raise ValueError(
                f"{npz}: mom2 statistics of another model ({_recorded(record)}) are there, and rome-locate does "
                f"not write over them; this model is {identity.describe()}. EasyEdit files statistics under the "
                f"model folder's name ({_folder(npz)!r}), which both share: write this model's into another "
                f"--stats-dir (or another --model-name folder)")


def key_size(model: nn.Module, layer_name: str) -> int:
    """The size of the keys the rewrite module `layer_name` takes (its input features)."""
    module = get_module(model, layer_name)
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = module.weight
    return int(weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[-1])


def npz_shape(npz: Path, key: str = "mom2.mom2") -> tuple[int, ...] | None:
    """The shape of array `key` in `npz`, read from its header only; None when it cannot be read (the loader
    reports that)."""
    try:
        with zipfile.ZipFile(npz) as z, z.open(key + ".npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                return None
            return tuple(read[version](fh)[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _recompute(npz: Path) -> str:
    return (f"EasyEdit files statistics under the model folder's name ({_folder(npz)!r}): compute this model's own "
            f"with `rome-locate stats --model PATH --stats-dir OTHER` and set stats_dir: OTHER in its YAML")


def check_readable(npz: Path, model: nn.Module, layer_name: str, identity: Identity | None = None) -> Identity | None:
    """A ValueError when the statistics `npz` are another model's: by their record, or, without one, by a shape
    that does not fit the keys of `layer_name`. Checked once per file and model object; returns the identity
    computed, if one was, for the next file."""
    checked = _CHECKED.setdefault(model, set())
    if str(npz) in checked:
        return identity
    record = read_record(npz)
    if record is not None:
        identity = identity or Identity(model)
        if not identity.owns(record):
            raise ValueError(f"mom2 statistics {npz} were computed on another model ({_recorded(record)}); this "
                             f"model is {identity.describe()}. {_recompute(npz)}")
    shape, n = npz_shape(npz), key_size(model, layer_name)
    if shape is not None and shape != (n, n):
        raise ValueError(f"mom2 statistics {npz} have shape {shape}, but {layer_name} of this model takes keys of "
                         f"{n}: they belong to another model. {_recompute(npz)}")
    checked.add(str(npz))
    return identity

