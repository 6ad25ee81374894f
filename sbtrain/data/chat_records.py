"""The conversation records of one source, encoded for ``sbtrain-data`` (``data.records=chat``).

JSON Lines / JSON files are read here record by record (not through HF ``datasets``, whose schema
inference refuses conversations whose messages carry different keys, e.g. a ``name`` on tool turns),
so an error names the file and its line; Parquet / Arrow / hub sources go through
:func:`sbtrain.data.sources.load_source` with ``data.chat.field`` as the column. Input checks (UTF-8,
malformed lines) have already run (:mod:`sbtrain.data.prepare`): lines it dropped are skipped here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from jinja2 import TemplateError

from sbtrain.data.chat import BadConversation, ChatTemplate, check_messages, encode_conversation
from sbtrain.data.sources import DataError, DecodeStats, Source, decoded_lines, load_source, parse_json_line


@dataclass
class Encoded:
    where: str  # "line 12" / "record 3": with the file, names the record
    ids: np.ndarray | None = None  # EOD appended
    mask: np.ndarray | None = None  # uint8, 1 = trained on; same length as ids
    reason: str = ""  # why it was skipped ("" when kept)
    why: str = ""


def records(src: Source, field: str, streaming: bool, cache_dir: str, hub_split: str) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for every record of ``src``."""
    if src.format == "json" and src.path.endswith(".json") and _is_array(src.path):
        with open(src.load_path or src.path, encoding="utf-8") as f:
            for i, record in enumerate(json.load(f), start=1):
                yield f"record {i}", record
        return
    if src.format == "json":
        # The original file (line numbers as the user sees them); malformed lines were counted by prepare.
        for lineno, line in decoded_lines(src.path, DecodeStats()):
            if line.strip():
                record, why = parse_json_line(line)
                if why is None:
                    yield f"line {lineno}", record
        return
    ds, _ = load_source(src, field, streaming, cache_dir, hub_split)
    for i, row in enumerate(ds, start=1):
        yield f"record {i}", dict(row)


def _is_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def encode_source(src: Source, chat_cfg, tokenizer, eod_id: int, template: ChatTemplate, streaming: bool,
                  cache_dir: str, hub_split: str) -> Iterator[Encoded]:
    """Every record of ``src`` as token ids + loss mask, or the reason it cannot be one."""
    eod_mask = np.uint8(chat_cfg.loss_on == "all")  # loss_on=all trains on the document end too
    for where, record in records(src, chat_cfg.field, streaming, cache_dir, hub_split):
        try:
            messages = check_messages(record, chat_cfg.field)
            ids, mask = encode_conversation(tokenizer, messages, template, chat_cfg.loss_on)
            if chat_cfg.max_tokens is not None and ids.size + 1 > chat_cfg.max_tokens:
                raise BadConversation("too_long", f"{ids.size + 1} tokens > data.chat.max_tokens={chat_cfg.max_tokens}")
        except BadConversation as exc:
            yield Encoded(where, reason=exc.reason, why=str(exc))
            continue
        except (TemplateError, ValueError, TypeError, KeyError) as exc:  # the template refuses it (e.g. role order)
            yield Encoded(where, reason="template_error", why=f"the chat template failed: {type(exc).__name__}: {exc}")
            continue
        yield Encoded(where, np.append(ids, eod_id), np.append(mask, eod_mask))


def bpe_texts(src: Source, field: str, streaming: bool, cache_dir: str, hub_split: str) -> Iterator[str]:
    """The message texts (and roles) of ``src``, to train a BPE on before any template can render."""
    for _, record in records(src, field, streaming, cache_dir, hub_split):
        messages = record.get(field) if isinstance(record, dict) else None
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                yield f"{message.get('role', '')}\n{message['content']}"


def bad_record_error(src: Source, item: Encoded) -> DataError:
    return DataError(f"{src.path} {item.where}: {item.why}. Fix the record, or set data.on_bad_record=skip to "
                     "skip such records (counted per reason in the manifest)")


__all__ = ["Encoded", "bad_record_error", "bpe_texts", "encode_source", "records"]
