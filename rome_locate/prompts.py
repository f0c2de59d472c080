"""The text a model reads for a user's prompt: the prompt itself, or (chat_template) the prompt as a user turn of
the tokenizer's chat template, followed by the template's generation prompt; a target (the assistant's answer)
is appended after that (`tokens.continuation`).

`model_input` is the only place that makes that text; every stage that tokenizes a prompt (tracing, the ROME edit,
scoring and generation, mom2 self-sampling) goes through it via `rome_locate.tokens`, with the setting passed
explicitly (`TraceSettings.chat_template`, the pipeline's and the editors' `chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Rendered in place of the prompt to find where the template puts the user's text: a prompt may also occur in the
# template's own text (a system prompt), so searching the rendered prompt alone could find the wrong place.
_MARKER = "\ue000rome-locate-prompt\ue001"


@dataclass(frozen=True)
class ModelInput:
    """What the tokenizer reads for one prompt, and where the prompt's characters sit in it."""

    text: str
    start: int  # the prompt's first character in `text`
    special_tokens: bool  # whether the tokenizer adds its own special tokens (a chat template writes them itself)


def check_chat_template(tok: Any) -> None:
    """A one-line ValueError naming --chat-template when the tokenizer has no chat template."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("--chat-template: the tokenizer has no chat template (tokenizer.chat_template is not set); "
                         "leave --chat-template out for a base model, or load a chat model whose tokenizer has one")


def _render(tok: Any, content: str) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    if not isinstance(text, str):  # a template returning several conversations or a dict is not a prompt
        raise ValueError(f"--chat-template: the tokenizer's chat template rendered {type(text).__name__}, not text")
    return text


def model_input(tok: Any, prompt: str, chat_template: bool = False) -> ModelInput:
    """The text the model reads for `prompt`: the prompt, or its user turn of the chat template (`chat_template`)."""
    if not chat_template:
        return ModelInput(prompt, 0, True)
    check_chat_template(tok)
    text = _render(tok, prompt)
    start = _render(tok, _MARKER).find(_MARKER)
    if start < 0 or text[start:start + len(prompt)] != prompt:
        start = text.find(prompt)  # the template's own text before the turn may depend on the content's length
    if start < 0:
        raise ValueError(f"--chat-template: the tokenizer's chat template does not keep prompt {prompt!r} as "
                         f"written (it trims or rewrites it), so its subject cannot be found in the templated text")
    return ModelInput(text, start, False)
