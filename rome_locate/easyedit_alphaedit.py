"""AlphaEdit's state in EasyEdit, kept per model: its null-space projection P and its cache of earlier keys.

EasyEdit's AlphaEdit (easyeditor/models/alphaedit/AlphaEdit_main.py) keeps two module globals for the process:

- `P`, the projection onto the null space of each window layer's key covariance (from the mom2 statistics, the
  window and `nullspace_threshold`). When `P_loc` exists it is loaded once per process (`P_loaded`), whatever
  model or window comes later; when it does not, P is computed and saved to `./null_space_project.pt` in the
  working directory, never to `P_loc` (so it is computed anew at every call and the file in the working
  directory, which its shipped YAMLs then name as `P_loc`, is another model's for the next user).
- `cache_c`, the sum of k k^T over the keys of every earlier edit (AlphaEdit's memory of what it must not disturb),
  zeroed on the first call only; its shape is chosen by the model's name ("llama", "qwen", "gpt2-xl"), so any other
  name (a GPT-2 that is not gpt2-xl, a local folder) fails.

Here, before each AlphaEdit call: `P_loc` is a per-model file (`projection_path`: under the editor's work folder,
named by the model's fingerprint and everything P depends on) unless the user set one explicitly; a missing file is
computed with EasyEdit's own `get_project` and saved there (never in the working directory); and EasyEdit's globals
are set to that P, with `cache_c` zeroed where EasyEdit would zero it or where its shape is not this window's.
`fresh_key_cache` gives a block its own empty cache and puts the process's back afterwards (rome-locate's batches
are each edited on the unedited model, so no earlier edit is there to protect).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .easyedit_import import easyedit_module, easyedit_name

# EasyEdit's shipped P_loc (hparams/AlphaEdit/*.yaml): the working directory's file, whichever model wrote it.
DEFAULT_P_LOC = "null_space_project.pt"
# What the projection of one editor depends on, beside the model (the fingerprint).
_P_FIELDS = ("layers", "nullspace_threshold", "rewrite_module_tmp", "stats_dir", "mom2_dataset", "mom2_n_samples",
             "mom2_dtype")


def is_default_p_loc(p_loc: Any) -> bool:
    """Whether `p_loc` is EasyEdit's default, the working directory's null_space_project.pt (not a user's choice)."""
    return p_loc is None or (not Path(str(p_loc)).is_absolute() and os.path.normpath(str(p_loc)) == DEFAULT_P_LOC)


def model_identity(model: nn.Module) -> tuple[str, str]:
    """(the folder name EasyEdit files the model's statistics under, the model's fingerprint digest now)."""
    from .models import fingerprint

    # layer_stats: the last part of _name_or_path.
    name = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/").rsplit("/")[-1] or "model"
    return name, fingerprint(model).digest


def projection_path(hparams: Any, identity: tuple[str, str], folder: str | Path) -> Path:
    """Where P of `hparams` lives: an explicit `P_loc` (absolute), else a file in `folder`/alphaedit named by the
    model (`model_identity`) and a digest of what P depends on (a JSON beside it lists them)."""
    if not is_default_p_loc(hparams.P_loc):
        return Path(hparams.P_loc).resolve()
    name, digest = identity
    inputs = {"model": name, "fingerprint": digest, **{k: getattr(hparams, k) for k in _P_FIELDS}}
    inputs["stats_dir"] = str(Path(inputs["stats_dir"]).resolve())
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(folder).resolve() / "alphaedit" / f"null_space_project-{name}-{key}.pt"
    if not path.with_suffix(".json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(inputs, indent=1, default=str) + "\n")
    return path


def _projection(model: nn.Module, tok: Any, hparams: Any) -> torch.Tensor:
    """P as EasyEdit computes it (AlphaEdit_main: one get_project per window layer, stacked), saved to P_loc."""
    get_project = easyedit_name("get_project")
    p = torch.stack([get_project(model, tok, layer, hparams).float().cpu() for layer in hparams.layers])
    path = Path(hparams.P_loc)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(p, partial)
    os.replace(partial, path)  # a run stopped mid-write leaves no half file for the next to load
    return p


def prepare(model: nn.Module, tok: Any, hparams: Any) -> None:
    """Set EasyEdit's AlphaEdit globals for an edit with `hparams`: P from `hparams.P_loc` (computed and saved
    there when missing), and `cache_c` zeroed where EasyEdit would zero it or where its shape does not fit."""
    main = easyedit_module("apply_AlphaEdit_to_model")
    path = str(Path(hparams.P_loc).resolve())
    if getattr(main, "P_loaded", False) and _LOADED.get("path") == path and getattr(main, "P", None) is not None:
        p = main.P  # this editor's P, loaded by the call before
    elif Path(path).is_file():
        p = torch.load(path, map_location="cpu")
    else:
        p = _projection(model, tok, hparams)
    if p.ndim != 3 or p.shape[0] != len(hparams.layers) or p.shape[1] != p.shape[2]:
        raise ValueError(f"P_loc {path}: a null-space projection of shape {tuple(p.shape)}, not one "
                         f"(key x key) matrix for each of the {len(hparams.layers)} layers of {list(hparams.layers)}")
    main.P, main.P_loaded = p, True
    _LOADED["path"] = path
    shape = (len(hparams.layers), p.shape[1], p.shape[2])
    cache = getattr(main, "cache_c", None)
    if not main.cache_c_new or cache is None or tuple(cache.shape) != shape:
        main.cache_c, main.cache_c_new = torch.zeros(shape, device="cpu"), True


_LOADED: dict[str, str] = {}  # the P_loc whose P is in EasyEdit's global now


def apply_alphaedit(model: nn.Module, tok: Any, requests: list[dict], hparams: Any,
                    **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit's ALG_DICT entry for AlphaEdit (`apply_AlphaEdit_to_model`), its globals set by `prepare` first."""
    prepare(model, tok, hparams)
    return easyedit_name("apply_AlphaEdit_to_model")(model, tok, requests, hparams, **kwargs)


@contextlib.contextmanager
def fresh_key_cache() -> Iterator[None]:
    """AlphaEdit's cache of earlier keys empty inside the block (the next `prepare` zeroes it), and the process's
    cache as it was afterwards."""
    main = easyedit_module("apply_AlphaEdit_to_model")
    saved = (getattr(main, "cache_c", None), main.cache_c_new)
    main.cache_c_new = False
    try:
        yield
    finally:
        if saved[0] is None:
            main.__dict__.pop("cache_c", None)
        else:
            main.cache_c = saved[0]
        main.cache_c_new = saved[1]
