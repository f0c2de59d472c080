"""The model as every stage sees it: where its inputs go, its dtype, and a fingerprint that tells two models apart."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import socket
import sys
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .records import Record

if TYPE_CHECKING:  # arch imports nothing from here, but only the annotation needs it
    from .arch import Arch

# Values read from each parameter for the fingerprint: enough to tell two trainings, a fine-tune or an edit
# apart, and cheap on a 70B model (a few hundred parameters x 64 values).
_FINGERPRINT_VALUES = 64


def input_device(model: nn.Module) -> torch.device:
    """The device the model's input ids must be on: its input embedding's (the first block's under a device map)."""
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        weight = next(model.parameters())
    if weight.device.type == "meta":  # offloaded embedding: accelerate moves inputs to the execution device
        hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        return torch.device(device if device is not None else "cpu")
    return weight.device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its first floating-point parameter's."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@dataclass(frozen=True)
class ModelFingerprint(Record):
    """Enough to tell two models, two trainings or two dtypes apart; stored with every traced or edited record."""

    model_type: str
    n_params: int
    dtype: str
    digest: str  # sha256 over the config, parameter names, shapes and dtypes, and sampled values
    remote_code: bool = False  # built from Python code in the model's directory (loaded with trust_remote_code)

    def short(self) -> str:
        """One line for reports: family, size, dtype and the first digits of the digest."""
        code = " (remote code)" if self.remote_code else ""
        return f"{self.model_type}{code} {self.n_params:,} params {self.dtype} #{self.digest[:12]}"


def runs_remote_code(obj: object) -> bool:
    """Whether the class of a model (or tokenizer) comes from code in its model directory (trust_remote_code)."""
    # transformers imports a model directory's own modules under this package name (dynamic_module_utils).
    return type(obj).__module__.split(".")[0] == "transformers_modules"


@torch.no_grad()
def fingerprint(model: nn.Module) -> ModelFingerprint:
    """The fingerprint of the model as it is now (an edited model has another digest)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    n = 0
    for name, p in model.named_parameters():
        n += p.numel()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type != "meta":  # an offloaded parameter counts by name and shape only
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_VALUES)
            h.update(flat[::step][:_FINGERPRINT_VALUES].to("cpu", torch.float64).numpy().tobytes())
    model_type = str(getattr(config, "model_type", None) or type(model).__name__)
    return ModelFingerprint(model_type=model_type, n_params=n, dtype=str(model_dtype(model)).replace("torch.", ""),
                            digest=h.hexdigest(), remote_code=runs_remote_code(model))


def context_length(model: nn.Module) -> int | None:
    """The most positions the model was built for (n_positions, max_position_embeddings, ...); None if unknown."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICES = "cpu, cuda, cuda:N or mps"


def check_device(device: str) -> str:
    """`device` when torch knows it and this torch has it; else a ValueError naming it (before any loading)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device torch knows; use {_DEVICES}") from None
    kind = parsed.type
    if kind == "cpu":
        return device
    if kind == "meta":
        raise ValueError(f"--device {device!r} holds no weights (meta tensors have shapes only); use {_DEVICES}")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: this torch sees no CUDA device (use --device cpu)")
        if parsed.index is not None and parsed.index >= n:
            raise ValueError(f"--device {device!r}: this torch sees {n} CUDA device(s), cuda:0 to cuda:{n - 1} "
                             f"(devices: {_DEVICES})")
        return device
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ValueError(f"--device {device!r}: this torch has no {kind} device (use --device cpu; devices: "
                         f"{_DEVICES})")
    return device


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE = {"1", "on", "yes", "true"}


def _hub_unreachable(name: str) -> str | None:
    """Why the hub model `name` cannot be fetched now (offline and not cached, or no route); None if it may be."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None  # in the local cache: loads offline
    except ValueError:  # not a valid repo id
        return "it is not a hub model name like 'org/name'"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set, so the hub cannot be reached, and the model is not in the local cache"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
    try:
        # One quick probe instead of the hub client's retries (about a minute on a machine without a route).
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"the hub ({host}) cannot be reached from this machine ({exc.strerror or exc})"
    return None


# ---- loading -------------------------------------------------------------------

def parse_max_memory(text: str | dict | None) -> dict[int | str, str] | None:
    """`--max-memory` as from_pretrained wants it: "0=20GiB,1=20GiB,cpu=64GiB" → {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}."""
    if text is None or isinstance(text, dict):
        return text
    out: dict[int | str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--max-memory expects DEVICE=SIZE[,DEVICE=SIZE...] (e.g. 0=20GiB,cpu=64GiB), got {text!r}")
        out[int(key) if key.isdigit() else key] = value
    return out


def parse_device_map(spec: str | dict | None) -> str | dict | None:
    """`--device-map`: a strategy name ("auto", "balanced", "balanced_low_0", "sequential") or a JSON file
    mapping module names to a GPU index, "cpu" or "disk"."""
    if spec is None or isinstance(spec, dict):
        return spec
    if spec in ("auto", "balanced", "balanced_low_0", "sequential"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--device-map {spec!r} is neither auto|balanced|balanced_low_0|sequential "
                                f"nor a JSON file")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--device-map {spec}: not JSON ({exc})") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"--device-map {spec}: expected an object {{module name: device}}, got {type(mapping).__name__}")
    return mapping


_HIDDEN: dict[str, str] = {}


def hide_unloadable(name: str = "torchvision") -> str | None:
    """If `name` is installed but its import fails, make this process treat it as not installed; returns why.

    A torchvision built for another torch (EasyEdit's requirements bring a CUDA
    build next to a CPU torch) raises `RuntimeError: operator torchvision::nms does
    not exist` on import, and transformers, which imports it whenever it is
    installed, then cannot load any model. Afterwards `sys.modules[name]` is None:
    `import torchvision` raises ModuleNotFoundError, `importlib.util.find_spec`
    returns None, and transformers' availability checks say False. A module that
    imports cleanly, or is not installed, is left alone (returns None).
    """
    if name in _HIDDEN:
        return _HIDDEN[name]
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return None
    before = set(sys.modules)
    try:
        importlib.import_module(name)
        return None
    except Exception as exc:  # a broken build raises RuntimeError, OSError, AttributeError, ...
        for loaded in set(sys.modules) - before:
            if loaded == name or loaded.startswith(name + "."):
                del sys.modules[loaded]
        sys.modules[name] = None  # type: ignore[assignment]
        _HIDDEN[name] = f"{type(exc).__name__}: {exc}"
    utils = sys.modules.get("transformers.utils.import_utils")
    for fn in ("is_torchvision_available", "is_torchvision_v2_available", "is_torchvision_greater_or_equal"):
        cached = getattr(utils, fn, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    return _HIDDEN[name]


def hidden_modules() -> dict[str, str]:
    """The modules `hide_unloadable` made absent in this process, with the error their import raised."""
    return dict(_HIDDEN)


class WeightsFileError(ValueError):
    """A model's weights file that is truncated, damaged, or refused (a pickle that is not plain tensors)."""


def _one_line(exc: BaseException) -> str:
    # transformers' messages may span lines; the CLI prints one line per error.
    return " ".join(str(exc).split()) or type(exc).__name__


def _cause(exc: BaseException) -> str:
    """The informative line of a safetensors or torch.load message (torch wraps it in paragraphs of advice)."""
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((l for l in lines if not l.startswith(advice)), lines[0] if lines else type(exc).__name__)
    # miniz and safetensors append sentences of advice after the cause.
    return line.split(". ")[0].rstrip(".")


def _bin_problem(path: Path) -> str | None:
    """Why torch.load(weights_only=True) cannot read `path`, or None; weights_only runs nothing in the file."""
    import zipfile

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # any failure here is this file's
        return _cause(exc)
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (its header and extent are checked, no tensor read), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # SafetensorError, or an OSError reading the file
        return _cause(exc)
    return None


def _weights_problem(exc: BaseException, local: Path | None, name: str) -> str | None:
    """One line naming the weights file behind `exc`, when `exc` is a damaged or refused weights file; else None."""
    import pickle

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover (transformers requires safetensors)
        SafetensorError = ()  # noqa: N806
    if isinstance(exc, SafetensorError):
        kind, pattern, check = "safetensors", "*.safetensors", _safetensors_problem
        advice = "not a complete safetensors file ({}): truncated or damaged; download or save it again"
    elif isinstance(exc, pickle.UnpicklingError):
        kind, pattern, check = "PyTorch", "*.bin", _bin_problem
        advice = ("refused as model weights: torch.load(weights_only=True) found more than plain tensors or no "
                  "checkpoint ({}); nothing in the file was run. Use the model's safetensors, or a copy from a "
                  "trusted source")
    elif isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc):
        kind, pattern, check = "PyTorch", "*.bin", _bin_problem
        advice = "not a complete PyTorch checkpoint ({}): truncated or damaged; download or save it again"
    else:
        return None
    for path in sorted(local.glob(pattern)) if local is not None else ():
        why = check(path)
        if why is not None:
            return f"{path}: " + advice.format(why)
    return f"--model {name!r}: its {kind} weights cannot be read ({_cause(exc)})"


def _remote_code_needed(text: str) -> ValueError:
    return ValueError(f"--model {text!r} needs Python code from its own directory to load (its config names it in "
                      f"auto_map), and rome-locate runs such code only when asked: pass --trust-remote-code "
                      f"(trust_remote_code=True) if you trust the code in that directory")


def _remote_code_notice(text: str, model: nn.Module, tok: object) -> str:
    """The one stderr line of a load with trust_remote_code: whose code runs, if any."""
    ran = [f"{type(o).__module__}.{type(o).__name__}" for o in (model, tok) if runs_remote_code(o)]
    if not ran:
        return f"notice: --trust-remote-code: {text} needed no code of its own (transformers' classes were used)"
    return f"notice: --trust-remote-code: running Python code from the model directory of {text}: {', '.join(ran)}"


def load_model(name: str | Path, *, device: str | None = None, dtype: str = "float32",
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | Path | None = None, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) from a local directory or hub name: on `device` (default: default_device()),
    or spread by `device_map`.

    With a device map (accelerate), blocks may sit on several GPUs, on the CPU or
    on disk (`offload_folder`); `max_memory` bounds what each device holds.
    `trust_remote_code` (never on by default) lets transformers run the Python code the model's config names
    in its auto_map; a notice on stderr says whose code ran. Without it such a model is a one-line ValueError
    naming --trust-remote-code.
    """
    why = hide_unloadable("torchvision")
    if why:
        warnings.warn(f"torchvision is installed but cannot be imported ({why}); treated as absent so that "
                      f"transformers can load the model", stacklevel=2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("--max-memory and --offload-folder apply to a --device-map")
    if device_map is not None and device is not None:
        raise ValueError("give --device or --device-map, not both")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    trust_remote_code = bool(trust_remote_code)
    # Passed even when False: left None, transformers asks on the terminal whether to run the code.
    kw: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        try:
            import accelerate  # noqa: F401  (from_pretrained needs it for a device map)
        except ImportError:
            # A missing optional dependency for a flag the user gave: bad input, one line at the CLI.
            raise ValueError("--device-map needs accelerate: pip install accelerate (or rome-locate[large])") from None
        kw.update(device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory))
        if offload_folder is not None:
            kw["offload_folder"] = str(offload_folder)
    else:
        device = check_device(device or default_device())
    text = str(name)
    local = Path(text).expanduser()
    if not local.exists():
        if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
            raise FileNotFoundError(f"--model {text!r}: no such directory (nor a hub model name like 'org/name')")
        why = _hub_unreachable(text)
        if why is not None:
            raise FileNotFoundError(f"--model {text!r} is not a local directory, and {why}; pass the directory of a "
                                    f"downloaded model (save_pretrained output)")
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else text,
                                            trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else text, **kw)
    except (OSError, ValueError) as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise _remote_code_needed(text) from None
        where = "local directory" if local.exists() else "local directory or reachable hub model"
        raise FileNotFoundError(f"--model {text!r} is not a loadable {where}: {_one_line(exc)}") from None
    except Exception as exc:
        # safetensors and torch.load raise their own types (SafetensorError, UnpicklingError, RuntimeError) for
        # a damaged or refused weights file; other errors (a bug, out of memory) keep their traceback.
        why = _weights_problem(exc, local if local.is_dir() else None, text)
        if why is None:
            raise
        raise WeightsFileError(why) from None
    if device_map is None:
        model = model.to(device)
    if trust_remote_code:
        print(_remote_code_notice(text, model, tok), file=sys.stderr)
    return model.eval(), tok


# ---- weights that may be offloaded -----------------------------------------------


def _offload_slot(model: nn.Module, name: str):
    """(mapping, key) holding the value of parameter `name` when accelerate offloaded it, else None.

    An offloaded module's parameters are on the meta device; its AlignDevicesHook
    loads them at each forward from `weights_map`, a PrefixedDataset over an
    OffloadedWeightsLoader whose `state_dict` (tensors in CPU memory) takes
    priority over its `index` (tensors on disk: a safetensors file or .dat memmaps).
    """
    module_name, _, leaf = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights_map = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights_map is not None:
            dataset = getattr(weights_map, "dataset", weights_map)
            key = getattr(weights_map, "prefix", "") + leaf
            return dataset, key
    return None


@torch.no_grad()
def weight_value(model: nn.Module, name: str) -> torch.Tensor:
    """The current values of parameter `name` (a copy), also when accelerate keeps it offloaded on CPU or disk."""
    slot = _offload_slot(model, name)
    if slot is None:
        return model.get_parameter(name).detach().clone()
    dataset, key = slot
    return dataset[key].detach().clone()


@torch.no_grad()
def set_weight(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make `value` the values of parameter `name`, wherever they live (exactly: no rounding beyond the dtype).

    An offloaded weight is written where accelerate reads it from: in place into
    its CPU copy, or, for one on disk (which is never written: it may be the
    model's own checkpoint), as an in-memory override in the loader's state_dict,
    dropped again once the value equals the one on disk.
    """
    slot = _offload_slot(model, name)
    if slot is None:
        param = model.get_parameter(name)
        param.copy_(value.to(param.device, param.dtype))
        return
    dataset, key = slot
    memory = getattr(dataset, "state_dict", dataset)
    index = getattr(dataset, "index", {})
    if key in index and hasattr(dataset, "state_dict"):
        # Disk-backed: compare with the disk value to decide between an override and none.
        on_disk = _disk_value(dataset, key)
        value = value.to(on_disk.device, on_disk.dtype)
        if torch.equal(value, on_disk):
            memory.pop(key, None)
        else:
            memory[key] = value.clone()
        return
    target = memory[key]
    target.copy_(value.to(target.device, target.dtype))


def _disk_value(loader, key: str) -> torch.Tensor:
    """The value the loader would read for `key` without its in-memory override."""
    override = loader.state_dict.pop(key, None)
    try:
        return loader[key]
    finally:
        if override is not None:
            loader.state_dict[key] = override


# ---- the loaded model, resolved once ------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A model as every command sees it, resolved once: the module, its tokenizer, its architecture (module
    names, layer count), the device its inputs go to, its dtype and the name it was loaded by."""

    model: nn.Module
    tok: object
    arch: "Arch"
    device: torch.device
    dtype: torch.dtype
    name: str

    @classmethod
    def of(cls, model: nn.Module, tok: object, arch: object = None, name: str | None = None) -> "LoadedModel":
        """Resolve an already loaded (model, tokenizer): `arch` is what `arch.arch_for` takes (an --arch file)."""
        from .arch import arch_for

        name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        return cls(model, tok, arch_for(model, arch), input_device(model), model_dtype(model), str(name))


def load(name: str | Path, *, arch: object = None, **kwargs) -> LoadedModel:
    """`load_model(name, **kwargs)` resolved into a LoadedModel (`arch`: an --arch record for an unknown family)."""
    model, tok = load_model(name, **kwargs)
    return LoadedModel.of(model, tok, arch, str(name))
