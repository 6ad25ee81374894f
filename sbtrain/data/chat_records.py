"""The conversation records of one source, encoded for ``sbtrain-data`` (``data.records=chat``).

JSON Lines / JSON files are read here record by record (not through HF ``datasets``, whose schema
inference refuses conversations whose messages carry different keys, e.g. a ``name`` on tool turns),
so an error names the file and its line; Parquet / Arrow / hub sources go through
:func:`sbtrain.data.sources.load_source` with ``data.chat.field`` as the column. Input checks (UTF-8,
malformed lines) have already run (:mod:`sbtrain.data.prepare`): lines it dropped are skipped here.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from jinja2 import TemplateError

from sbtrain.data.chat import BadConversation, ChatTemplate, check_messages, encode_conversation
from sbtrain.data.sources import DataError, DecodeStats, Source, decoded_lines, load_source, parse_json_line
from sbtrain.data.tokenizer import cached_tokenizer

BATCH = 256  # records per worker task


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


def encode_record(where: str, record, tokenizer, eod_id: int, template: ChatTemplate, chat_cfg) -> Encoded:
    """One record as token ids + loss mask, or the reason it cannot be one."""
    try:
        messages = check_messages(record, chat_cfg.field)
        ids, mask = encode_conversation(tokenizer, messages, template, chat_cfg.loss_on)
        if chat_cfg.max_tokens is not None and ids.size + 1 > chat_cfg.max_tokens:
            raise BadConversation("too_long", f"{ids.size + 1} tokens > data.chat.max_tokens={chat_cfg.max_tokens}")
    except BadConversation as exc:
        return Encoded(where, reason=exc.reason, why=str(exc))
    except (TemplateError, ValueError, TypeError, KeyError) as exc:  # the template refuses it (e.g. role order)
        return Encoded(where, reason="template_error", why=f"the chat template failed: {type(exc).__name__}: {exc}")
    eod_mask = np.uint8(chat_cfg.loss_on == "all")  # loss_on=all trains on the document end too
    return Encoded(where, np.append(ids, eod_id), np.append(mask, eod_mask))


def _batched(items: Iterator, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _encode_batch(batch: list[tuple[str, dict]], tok_path: str, eod_token: str | None, template: ChatTemplate,
                  chat_cfg) -> list[Encoded]:
    tokenizer, eod_id = cached_tokenizer(tok_path, eod_token)
    return [encode_record(where, record, tokenizer, eod_id, template, chat_cfg) for where, record in batch]


def encode_source(src: Source, chat_cfg, tok_path: str, eod_token: str | None, template: ChatTemplate,
                  streaming: bool, cache_dir: str, hub_split: str, num_proc: int = 1) -> Iterator[Encoded]:
    """Every record of ``src`` encoded (:func:`encode_record`), in order; ``num_proc`` > 1 spreads batches
    of records over worker processes, a bounded number in flight (memory stays flat)."""
    batches = _batched(records(src, chat_cfg.field, streaming, cache_dir, hub_split), BATCH)
    if num_proc <= 1:
        for batch in batches:
            yield from _encode_batch(batch, tok_path, eod_token, template, chat_cfg)
        return
    with ProcessPoolExecutor(max_workers=num_proc) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_encode_batch, batch, tok_path, eod_token, template, chat_cfg))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


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


__all__ = ["Encoded", "bad_record_error", "bpe_texts", "encode_record", "encode_source", "records"]
