"""Conversation records -> token ids + a loss mask (``data.records=chat``, ``data.chat.*``).

A record holds ``messages: [{role, content}, ...]`` (OpenAI / HF style; roles system, user,
assistant, tool; an assistant message may carry ``tool_calls`` instead of text, which the template
renders — the built-in chatml renders only text). It is rendered with a chat template — the tokenizer's own (``tokenizer_config.json``
``chat_template``), a built-in one by name (``chatml``: Qwen's ``<|im_start|>role\\n...<|im_end|>``),
or a Jinja file — through transformers' ``apply_chat_template``, so training sees exactly the text a
serving stack renders.

The mask marks the tokens that carry loss: the assistant turns only (default), or every token
(``data.chat.loss_on=all``). An assistant turn's span is found by rendering the conversation up to
it: ``render(messages[:i], add_generation_prompt=True)`` is where its content starts and
``render(messages[:i+1])`` where it ends (its end-of-turn marker included, so the model learns to
stop); both must be prefixes of the whole rendering, which every incremental template satisfies (a
template that is not is refused, naming the record). The whole conversation is then tokenized once,
and a token is masked in when its first character lies inside a span (fast-tokenizer offsets).

A bad record (unknown role, no assistant turn, a message without text, a conversation longer than
``data.chat.max_tokens``) is an error naming file and record, or with ``data.on_bad_record=skip``
a skip counted per reason in the manifest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from sbtrain.data.sources import DataError

ROLES = ("system", "user", "assistant", "tool")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# name -> (template, its special tokens: a trained BPE gets them as whole tokens)
BUILTIN_TEMPLATES = {"chatml": (CHATML, ("<|im_start|>", "<|im_end|>"))}


class BadConversation(ValueError):
    """A record that cannot become a training conversation; ``reason`` is the manifest's skip key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ChatTemplate:
    text: str  # the Jinja source
    name: str  # chatml | tokenizer | a file path: what the manifest records
    special_tokens: tuple[str, ...] = ()


def resolve_template(name: str | None, tokenizer=None) -> ChatTemplate:
    """``data.chat.template``: None (the tokenizer's own), a built-in name, or a Jinja file."""
    if name is None:
        text = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if not text or not isinstance(text, str):
            raise DataError(
                "the tokenizer has no chat template (tokenizer_config.json has no chat_template): name one with "
                f"data.chat.template={'|'.join(BUILTIN_TEMPLATES)} or data.chat.template=/path/to/template.jinja")
        return ChatTemplate(text, "tokenizer")
    if name in BUILTIN_TEMPLATES:
        text, special = BUILTIN_TEMPLATES[name]
        return ChatTemplate(text, name, special)
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return ChatTemplate(f.read(), os.path.abspath(name))
    raise DataError(f"data.chat.template={name!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
                    "nor a file: name one of those, give a .jinja file, or null for the tokenizer's own template")


def check_messages(record, field: str) -> list[dict]:
    """The record's messages as ``[{role, content}]``, or :class:`BadConversation` saying why not."""
    messages = record.get(field) if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadConversation("no_messages", f"no {field!r} list of messages (set data.chat.field to the field "
                                             "holding [{role, content}, ...])")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadConversation("bad_message", f"message {i} is not an object with a role")
        role = message["role"]
        if role not in ROLES:
            raise BadConversation("unknown_role", f"message {i} has role {role!r}; the roles are {', '.join(ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""  # an OpenAI-style tool call: the template renders message["tool_calls"]
        if not isinstance(content, str):
            raise BadConversation("bad_message", f"message {i} ({role}) has no text content")
        out.append({**message, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadConversation("no_assistant", "no assistant turn: nothing to learn from")
    return out


def render(tokenizer, messages: list[dict], template: ChatTemplate, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], template: ChatTemplate, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full`` (the whole rendering)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], template, add_generation_prompt=True)) if i else 0
        before = render(tokenizer, messages[:i + 1], template)
        if not full.startswith(before) or start > len(before):
            raise BadConversation("template_not_incremental",
                                  f"the chat template {template.name} does not render the conversation up to "
                                  f"message {i} as a prefix of the whole; its assistant turns cannot be located "
                                  "(use data.chat.loss_on=all, or another template)")
        spans.append((start, len(before)))
    return spans


def encode_conversation(tokenizer, messages: list[dict], template: ChatTemplate, loss_on: str = "assistant"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` of one conversation (no EOD; the caller appends it); mask 1 = trained on."""
    full = render(tokenizer, messages, template)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    if loss_on == "all":
        return ids, np.ones(ids.size, dtype=np.uint8)
    starts = np.asarray([s for s, _ in encoded["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(ids.size, dtype=np.uint8)
    for begin, end in assistant_spans(tokenizer, messages, template, full):
        mask[(starts >= begin) & (starts < end)] = 1
    if not mask.any():
        raise BadConversation("no_assistant_tokens", "its assistant turns are empty once rendered")
    return ids, mask


__all__ = [
    "BUILTIN_TEMPLATES",
    "ROLES",
    "BadConversation",
    "ChatTemplate",
    "assistant_spans",
    "check_messages",
    "encode_conversation",
    "render",
    "resolve_template",
]
