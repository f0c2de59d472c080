"""The built-in edit as a context (apply ROME at a chosen layer, restore the weights afterwards) and the mom2
statistics the edit layers need. The editor registry is `rome_locate.editors`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .arch import Arch, arch_for
from .facts import Fact
from .files import write_bytes
from .rome import apply_rome, restore
from .mom2_owner import record_path
from .stats import check_mom2, compute_mom2, mom2_path, stats_model_name


@contextmanager
def edited(model: nn.Module, tok: Any, fact: Fact, hparams: Any, seed: int = 0,
           info: dict | None = None, chat_template: bool = False) -> Iterator[nn.Module]:
    """Apply the built-in ROME at `hparams.layers` for `fact.target_new`, yield the model, restore bit-identically
    (always). The editors (`rome_locate.editors`) wrap it."""
    originals: dict[str, torch.Tensor] = {}
    try:
        originals = apply_rome(model, tok, fact, hparams, seed=seed, info=info, chat_template=chat_template)
        yield model
    finally:
        restore(model, originals)


def ensure_stats(model: nn.Module, tok: Any, hparams: Any, layers: set[int], corpus: str | Path | None,
                 stats_dir: str | Path | None, arch: Arch | None = None) -> Any:
    """Hyperparameters whose stats_dir holds mom2 files of this model for every layer; missing ones are computed
    from `corpus` (`arch` is the model's resolved architecture, for a family known only through --arch). Files
    recorded as another model's, or of another shape, are an error (`stats.check_mom2`), said before any edit."""
    if not getattr(hparams, "mom2_adjustment", False):
        return hparams
    check_mom2(model, hparams, layers)
    name = stats_model_name(model) or Path(str(hparams.model_name)).name

    def path(d, layer):
        return mom2_path(d, name, hparams.rewrite_module_tmp.format(layer), hparams.mom2_dataset,
                         hparams.mom2_n_samples, hparams.mom2_dtype)

    missing = sorted(l for l in layers if not path(hparams.stats_dir, l).is_file())
    if not missing:
        return hparams
    if corpus is None:
        raise FileNotFoundError(
            f"mom2 statistics missing for layers {missing} in {hparams.stats_dir} (e.g. {path(hparams.stats_dir, missing[0])}); "
            f"compute them with `rome-locate stats`, pass a corpus (--corpus) or set mom2_adjustment: false")
    if stats_dir is None:
        raise ValueError("a writable stats directory is needed to compute the missing mom2 statistics")
    # The new directory must hold every layer: copy the existing files in.
    for layer in sorted(layers - set(missing)):
        src, dst = path(hparams.stats_dir, layer), path(stats_dir, layer)
        if not dst.exists():
            write_bytes(dst, src.read_bytes())
            if record_path(src).is_file():  # the copy names its model as the original does
                write_bytes(record_path(dst), record_path(src).read_bytes())
    todo = [l for l in missing if not path(stats_dir, l).is_file()]
    if todo:
        compute_mom2(model, tok, arch_for(model, arch), todo, corpus, stats_dir, model_name=name,
                     mom2_dataset=hparams.mom2_dataset, n_samples=hparams.mom2_n_samples, dtype=hparams.mom2_dtype)
    out = replace(hparams, stats_dir=str(stats_dir))
    check_mom2(model, out, layers)  # files an earlier run left in stats_dir
    return out
