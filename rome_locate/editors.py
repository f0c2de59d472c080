"""The editors: a name maps to an editor object with one `edited(model, tok, fact, hparams)` context manager.

`edited` applies the edit at `hparams.layers[0]`, yields the editor's own report
of it (a mapping, or None), and restores the weights bit-identically when the
block ends, also on an exception. `close()` frees what the editor holds (EasyEdit's
scratch folder). Every entrance gets its editor from `make_editor`; a test double
is any object with `name` and `edited`. An editor reads the prompts as the run does:
its `chat_template` (absent: False) must be the run's. The EasyEdit editor also has
`edited_batch(model, tok, facts, hparams)`: all facts edited together (MEMIT, AlphaEdit: one EasyEdit batch_edit),
EasyEdit's metrics of each yielded, the weights restored bit-identically when the block ends.
"""

from __future__ import annotations

import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Protocol, Sequence

from torch import nn

from .facts import Fact


class Editor(Protocol):
    """What the pipeline needs of an editor."""

    name: str

    def edited(self, model: nn.Module, tok: Any, fact: Fact, hparams: Any) -> ContextManager[Mapping | None]:
        """Edit `fact` at `hparams.layers[0]`, yield the editor's report (or None), restore."""
        ...

    # Mass editing (`rome_locate.batches`) also needs
    # edited_batch(model, tok, facts, hparams) -> ContextManager[Mapping | None]: every fact in one update over
    # `hparams.layers` (MEMIT, AlphaEdit), the report of each fact in the facts' order under "metrics" where the
    # editor has one (EasyEdit's).


class BuiltinEditor:
    """rome-locate's own editors, seeded: ROME (`rome_locate.rome`), MEMIT and AlphaEdit (`rome_locate.memit`),
    by the hyperparameters' alg_name (`rome_locate.algorithms`)."""

    name = "builtin"

    def __init__(self, seed: int = 0, info: dict | None = None, chat_template: bool = False,
                 reuse_targets: bool = False):
        self.seed = seed
        self.info = info  # filled with the optimisation's figures per layer (benchmarks read the steps)
        self.chat_template = chat_template  # prompts read as user turns of the tokenizer's chat template
        # MEMIT's z of each fact kept across edits: only right when every edit starts from the unedited model (the
        # window search's trials), never for sequential editing.
        self._z_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" | None = \
            weakref.WeakKeyDictionary() if reuse_targets else None
        # AlphaEdit's memory per model (its null space, and the keys of the edits kept): weakly keyed, so it never
        # outlives the model or crosses to another one.
        self._states: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()

    @contextmanager
    def edited(self, model: nn.Module, tok: Any, fact: Fact, hparams: Any) -> Iterator[None]:
        """Apply the edit of one fact, yield None, restore bit-identically (always)."""
        from .algorithms import is_window
        from .edit import edited

        if is_window(hparams):
            with self.edited_batch(model, tok, [fact], hparams):
                yield None
            return
        with edited(model, tok, fact, hparams, seed=self.seed, info=self.info, chat_template=self.chat_template):
            yield None

    @contextmanager
    def edited_batch(self, model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any) -> Iterator[None]:
        """Write every fact in one update (MEMIT, AlphaEdit; ROME: one after another), yield None, restore
        bit-identically (always; AlphaEdit forgets the batch's keys again)."""
        from .algorithms import algorithm
        from .rome import restore

        alg = algorithm(hparams)
        state = None
        if alg.state is not None:
            state = self._states.setdefault(model, alg.state())
        kept = None if state is None else {k: v.clone() for k, v in state.kept.items()}
        originals = {}
        try:
            z_cache = None if self._z_cache is None else self._z_cache.setdefault(model, {})
            originals = alg.apply(model, tok, facts, hparams, seed=self.seed, info=self.info,
                                  chat_template=self.chat_template, state=state, z_cache=z_cache)
            yield None
        finally:
            restore(model, originals)
            if state is not None:
                state.kept = kept

    def close(self) -> None:
        """Nothing to free."""


# The name every entrance used before the built-in editor learnt MEMIT and AlphaEdit.
BuiltinRome = BuiltinEditor


class EasyEditEditor:
    """EasyEdit's ROME, R-ROME, MEMIT and AlphaEdit through one BaseEditor over the loaded model
    (`rome_locate.easyedit_session.EasyEditSession`); its logs go to `workdir`, or to a temporary folder removed by
    `close()`."""

    name = "easyedit"

    def __init__(self, model: nn.Module, tok: Any, hparams: Any, model_name: str, workdir: str | Path | None = None):
        from .easyedit_session import EasyEditSession

        self._scratch = None if workdir is not None else tempfile.TemporaryDirectory(prefix="rome-locate-easyedit-")
        folder = Path(workdir) if workdir is not None else Path(self._scratch.name)
        try:
            self.session = EasyEditSession(model, tok, hparams, model_name, folder)
        except BaseException:
            self.close()
            raise

    @contextmanager
    def edited(self, model: nn.Module, tok: Any, fact: Fact, hparams: Any) -> Iterator[Mapping]:
        """EasyEdit's edit at the fact's layer; yields EasyEdit's own metrics of it; restores."""
        with self.session.edited(model, tok, fact, hparams) as metrics:
            yield metrics

    @contextmanager
    def edited_batch(self, model: nn.Module, tok: Any, facts: Sequence[Fact], hparams: Any) -> Iterator[Mapping]:
        """All `facts` edited together (MEMIT, AlphaEdit: one EasyEdit batch_edit in the window; ROME, R-ROME: one
        after another at `hparams.layers[0]`); yields {"alg_name", "layers", "metrics": EasyEdit's metrics of each
        fact, in order}; restores every changed weight bit-identically."""
        with self.session.edited_batch(model, tok, facts, hparams) as batch:
            yield batch

    def close(self) -> None:
        """Remove the scratch folder, if there is one."""
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


EasyEditRome = EasyEditEditor  # its name from when it edited ROME only


def _builtin(model, tok, hparams, *, model_name: str, workdir: Path | None, seed: int, chat_template: bool) -> Editor:
    return BuiltinEditor(seed=seed, chat_template=chat_template)


def _easyedit(model, tok, hparams, *, model_name: str, workdir: Path | None, seed: int,
              chat_template: bool) -> Editor:
    return EasyEditEditor(model, tok, hparams, model_name, workdir)


EDITORS: dict[str, Callable[..., Editor]] = {"builtin": _builtin, "easyedit": _easyedit}


# The editors that can read prompts through the tokenizer's chat template (EasyEdit tokenizes the raw prompts).
CHAT_EDITORS = ("builtin",)


def check_editor(name: Any, chat_template: bool = False) -> None:
    """A ValueError listing the editors when `name` is neither a registered name nor an editor object, or naming
    --chat-template when the editor would read the prompts otherwise than the run does."""
    if isinstance(name, str) and name not in EDITORS:
        raise ValueError(f"editor must be one of {tuple(EDITORS)}, got {name!r}")
    if not isinstance(name, str) and not callable(getattr(name, "edited", None)):
        raise ValueError(f"an editor is one of {tuple(EDITORS)} or an object with edited(), got {name!r}")
    if isinstance(name, str) and chat_template and name not in CHAT_EDITORS:
        raise ValueError(f"--chat-template: --editor {name} tokenizes the raw prompts, not the chat template's "
                         f"user turns; use --editor {' or '.join(CHAT_EDITORS)} with --chat-template")
    if not isinstance(name, str) and bool(getattr(name, "chat_template", False)) != chat_template:
        raise ValueError(f"editor {getattr(name, 'name', name)!r} has chat_template="
                         f"{bool(getattr(name, 'chat_template', False))}, the run chat_template={chat_template}: "
                         f"it would edit other prompts than the run measures")
    if name == "easyedit":
        check_easyedit()


def check_easyedit() -> None:
    """A ValueError naming EASYEDIT_PATH when EasyEdit cannot be imported: said before a model is loaded."""
    import os

    from .easyedit_import import import_easyedit

    try:
        import_easyedit()
    except ImportError as exc:
        where = os.environ.get("EASYEDIT_PATH")
        now = f"EASYEDIT_PATH is {where}" if where else "EASYEDIT_PATH is not set"
        why = " ".join(str(exc).split())  # one line, whatever EasyEdit's import raised
        raise ValueError(f"--editor easyedit: EasyEdit cannot be imported ({why}); {now}: set it to a clone of "
                         f"EasyEdit (the folder holding easyeditor/), or use --editor builtin") from None


def make_editor(editor: str | Editor, model: nn.Module, tok: Any, hparams: Any, *, model_name: str = "model",
                workdir: str | Path | None = None, seed: int = 0, chat_template: bool = False) -> Editor:
    """The editor of that name over this model, reading prompts as `chat_template` says (an editor object is
    returned as it is)."""
    check_editor(editor, chat_template)
    if not isinstance(editor, str):
        return editor
    return EDITORS[editor](model, tok, hparams, model_name=model_name,
                           workdir=None if workdir is None else Path(workdir), seed=seed, chat_template=chat_template)
