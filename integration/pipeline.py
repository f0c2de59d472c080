#!/usr/bin/env python
"""Causal tracing → ROME hyperparameters → EasyEdit's BaseEditor → metrics, in one run.

Point EASYEDIT_PATH at an EasyEdit clone and run

    python integration/pipeline.py --config integration/config.yaml

Steps (each writes into OUT/RUN, where RUN names the model, its fingerprint and
the settings, so that a run never reuses another model's or setting's traces):
  1. locate:  trace every fact (ROME causal tracing, MLP restoration at the last
              subject token) → locate.jsonl, one line per fact with its layer;
              skipped with `layers: fixed`;
  2. hparams: the dataset-level layer (largest mean indirect effect), or the base
              YAML's with `layers: fixed`, in complete ROME hyperparameters →
              hparams.yaml (EasyEdit format; absolute model_name and stats_dir);
  3. edit:    one EasyEdit BaseEditor (edit_requests) over the loaded model, each
              fact at the dataset layer (`layers: dataset`), its own traced layer
              (`layers: traced`) or the base YAML's (`layers: fixed`); one at a
              time, weights restored, or accumulating with `sequential: true`;
  4. metrics: EasyEdit's own per-request metrics beside rome-locate's, the layer
              of every edit, retention when sequential → results.json, report.md.
See integration/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml

MODES = ("dataset", "traced", "fixed")


def _load_config(path: str) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a mapping")
    base = Path(path).resolve().parent
    for key in ("model", "facts", "base_hparams", "out", "stats_dir"):
        # Paths in the config are relative to the config file's folder unless they exist as given.
        value = config.get(key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            config[key] = str(base / value)
    mode = config.get("layers", "dataset")
    if mode not in MODES:
        raise SystemExit(f"{path}: layers must be one of {MODES}, got {mode!r}")
    if mode == "fixed" and not config.get("base_hparams"):
        raise SystemExit(f"{path}: layers: fixed edits at base_hparams' layer; set base_hparams")
    return config


def run_name(model_path: str, model_digest: str, config: dict, limit: int | None) -> str:
    """The run's folder name: the model, its fingerprint, and a digest of every setting that changes the traces
    or the edits (so a changed model or setting never resumes another run's files)."""
    keys = ("facts", "layers", "trace", "base_hparams", "hparams_overrides", "stats_dir", "editor", "sequential")
    settings = {k: config.get(k) for k in keys}
    settings["limit"] = limit
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{Path(model_path).name}-{model_digest[:12]}-{digest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (see integration/config.yaml)")
    parser.add_argument("--easyedit", default=None, help="EasyEdit clone (default: $EASYEDIT_PATH or importable)")
    parser.add_argument("--editor", default=None, choices=["easyedit", "builtin"], help="override the config")
    parser.add_argument("--limit", type=int, default=None, help="override the config's limit")
    args = parser.parse_args(argv)
    config = _load_config(args.config)
    if args.editor:
        config["editor"] = args.editor
    editor = config.setdefault("editor", "easyedit")
    limit = args.limit if args.limit is not None else config.get("limit")
    mode = config.get("layers", "dataset")

    from rome_locate.arch import arch_for
    from rome_locate.choose import choose_dataset_layer, dataset_edit_layer
    from rome_locate.easyedit import hide_unloadable, hidden_modules, import_easyedit, stubbed_modules
    from rome_locate.facts import load_facts
    from rome_locate.hparams import bind_model, dataset_header, generate_hparams, load_hparams, with_layer, \
        write_hparams
    from rome_locate.locate import locate
    from rome_locate.models import fingerprint, load_model
    from rome_locate.pipeline import run_pipeline
    from rome_locate.report import edit_summary_line, written_summary
    from rome_locate.trace import TraceSettings

    if editor == "easyedit":
        import_easyedit(args.easyedit)
        print(f"EasyEdit imported; stand-ins during its import: {stubbed_modules()}; "
              f"hidden (cannot load): {hidden_modules() or 'none'}")
    else:
        hide_unloadable("torchvision")
    # A local model is named by its absolute path (EasyEdit may run from another folder); a hub name as given.
    model_path = str(Path(config["model"]).resolve()) if Path(config["model"]).exists() else str(config["model"])
    model, tok = load_model(model_path, device=config.get("device"))
    arch = arch_for(model)
    facts = [f for f in load_facts(config["facts"], limit=limit) if f.target_new]
    if not facts:
        raise SystemExit(f"{config['facts']}: no fact with a target_new to edit")
    out = Path(config.get("out", "runs/pipeline")).resolve() / run_name(model_path, fingerprint(model).digest,
                                                                         config, limit)
    out.mkdir(parents=True, exist_ok=True)
    print(f"run folder {out}")

    # 1. locate (not with `layers: fixed`)
    trace = TraceSettings.from_json(config.get("trace") or {}, strict=True)
    located, dataset = None, None
    if mode != "fixed":
        located = locate(model, tok, facts, trace, out=out / "locate.jsonl", arch=arch, progress=True)
        dataset = choose_dataset_layer([r for r, _ in located])
        # The layer ROME edits: the editable layer of largest mean effect (the rule's, never the last layer).
        dataset = dataclasses.replace(dataset, layer=dataset_edit_layer(dataset.mean_effects))
        print(f"dataset layer {dataset.layer}; per-fact histogram {list(dataset.histogram)}")

    # 2. hyperparameters
    device = next(model.parameters()).device
    hp_device = (device.index or 0) if device.type == "cuda" else "cpu"
    if config.get("base_hparams"):
        hparams = load_hparams(config["base_hparams"], n_layers=arch.n_layers, easyedit=False)
        hparams = dataclasses.replace(hparams, device=hp_device)
        if dataset is not None:
            hparams = with_layer(hparams, dataset.layer, n_layers=arch.n_layers)
    else:
        hparams = generate_hparams(model, arch, dataset.layer, model_path, device=hp_device,
                                   **(config.get("hparams_overrides") or {}))
    hparams = bind_model(hparams, model_path)
    if config.get("stats_dir"):
        hparams = dataclasses.replace(hparams, stats_dir=str(config["stats_dir"]))
    # Absolute: the file must mean the same from any working directory (EasyEdit runs inside OUT).
    hparams = dataclasses.replace(hparams, stats_dir=str(Path(hparams.stats_dir).resolve()))
    if dataset is not None:
        header = dataset_header(config["facts"], dataset.n_facts, trace.to_json(), dataset.mean_effects,
                                dataset.histogram, dataset.layer, dataset.kind)
    else:
        header = f"layers: fixed (not traced): the layer of {config['base_hparams']}"
    hp_path = write_hparams(hparams, out / "hparams.yaml", header=header)
    print(f"wrote {hp_path}")

    # 3. edit, 4. metrics: rome-locate's pipeline, through one BaseEditor with `editor: easyedit`.
    records, paths = run_pipeline(
        model, tok, facts, hparams, out, model_name=model_path, layers="traced" if mode == "traced" else "fixed",
        # The layer rule reads the validation record beside the base YAML, when there is one.
        hparams_path=config.get("base_hparams"), located=located, trace_settings=trace, generation=None, sweep=False, editor=editor,
        sequential=bool(config.get("sequential")), facts_path=str(config["facts"]), progress=True,
        extra_settings={"integration": {"config": str(Path(args.config).resolve()), "layers": mode}})
    print(edit_summary_line(written_summary(paths["json"]), editor, mode))
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
