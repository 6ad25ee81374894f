"""Raw corpus -> megatron-core indexed dataset (``data.bin`` / ``data.idx``) + ``manifest.json``.

Everything is written into ``<output>.tmp-<pid>`` and renamed into place at the end, so a crash
never leaves a half-written dataset under the final name; the next build of the same output removes
the temp folders of builds whose process is gone (never one of a live build). One document per
source record (plain text: per file or paragraph, :mod:`sbtrain.data.sources`); every kept document
ends with the EOD token; empty / whitespace-only / null records are skipped and counted per reason
in the manifest. Input checks (UTF-8, malformed records, empty files) run first, in
:mod:`sbtrain.data.prepare`.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from sbtrain.config.data import DataConfig, TokenizerConfig
from sbtrain.data.chat import resolve_template
from sbtrain.data.chat_records import bad_record_error, bpe_texts, encode_source
from sbtrain.data.prepare import check_empty, prepare_source
from sbtrain.data.sources import DataError, Source, fingerprint_file, load_source, reader_error, resolve_sources
from sbtrain.data.tokenizer import (
    cached_tokenizer,
    encode_texts,
    load_tokenizer,
    split_long,
    tokenizer_hash,
    train_bpe,
    vocab_info,
)

PREFIX = "data"  # <dir>/data.bin, <dir>/data.idx
MASK_PREFIX = "mask"  # chat datasets: <dir>/mask.bin|.idx, uint8 per token (1 = trained on), same lengths
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
BATCH = 1000
OWNER = "_owner.json"  # in a temp folder: which host and process is building it
DATASET_FILES = (f"{PREFIX}.bin", f"{PREFIX}.idx", MANIFEST)

log = logging.getLogger(__name__)

def dataset_prefix(dataset_dir: str) -> str:
    return os.path.join(dataset_dir, PREFIX)


def _skip_reason(text) -> str | None:
    if text is None:
        return "null"
    if not isinstance(text, str):
        return "not_string"
    if not text.strip():
        return "empty"
    return None


def encode_batch(texts: list, tok_path: str, eod_token: str | None) -> dict[str, list]:
    """Token ids (EOD appended) and a skip reason ("" when kept) for each text."""
    tok, eod = cached_tokenizer(tok_path, eod_token)
    reasons = [_skip_reason(t) or "" for t in texts]
    encoded = iter(encode_texts(tok, [t for t, r in zip(texts, reasons) if not r]))
    empty = np.zeros(0, dtype=np.int32)
    ids = [empty if r else np.append(next(encoded), np.int32(eod)) for r in reasons]
    return {"input_ids": ids, "skip": reasons}


def _map_batch(batch: dict[str, list], field_name: str, tok_path: str, eod_token: str | None):
    return encode_batch(batch[field_name], tok_path, eod_token)


def _batches(ds, field_name: str) -> Iterator[list]:
    buf: list = []
    for row in ds:
        buf.append(row.get(field_name))
        if len(buf) == BATCH:
            yield buf
            buf = []
    if buf:
        yield buf


def _encoded_rows(ds, field_name: str, streaming: bool, num_proc: int, tok_path: str,
                  eod_token: str | None) -> Iterator[tuple[list, str]]:
    """(ids, skip reason) per record, in source order."""
    if not streaming:
        mapped = ds.map(_map_batch, batched=True, batch_size=BATCH, num_proc=num_proc if num_proc > 1 else None,
                        remove_columns=ds.column_names, desc="tokenize",
                        fn_kwargs={"field_name": field_name, "tok_path": tok_path, "eod_token": eod_token})
        for row in mapped.with_format("numpy"):  # arrays, not lists of Python ints (9x smaller)
            yield row["input_ids"], row["skip"]
        return
    if num_proc <= 1:
        for texts in _batches(ds, field_name):
            out = encode_batch(texts, tok_path, eod_token)
            yield from zip(out["input_ids"], out["skip"])
        return
    # Streaming: IterableDataset.map has no num_proc, so fan batches out to a pool, keeping a bounded
    # number in flight (memory stays flat however large the corpus) and yielding in order.
    with ProcessPoolExecutor(max_workers=num_proc) as pool:
        pending = []
        for texts in _batches(ds, field_name):
            pending.append(pool.submit(encode_batch, texts, tok_path, eod_token))
            if len(pending) >= 2 * num_proc:
                out = pending.pop(0).result()
                yield from zip(out["input_ids"], out["skip"])
        for fut in pending:
            out = fut.result()
            yield from zip(out["input_ids"], out["skip"])


def _reading(src: Source, rows) -> Iterator:
    """``rows``, with any loader failure while fetching one (streaming reads lazily) turned into an error naming
    the file; what the caller does with a row (writing the .bin) is not wrapped."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as e:  # the message names the file; the chain keeps the original
            raise DataError(f"{src.path} cannot be read as {src.format}: {reader_error(e)}: fix or remove the "
                            "file") from e
        yield row


def _texts_for_bpe(sources: list[Source], loaded, limit: int | None) -> Iterator[str]:
    n = 0
    for src, (ds, field_name) in zip(sources, loaded):
        for row in _reading(src, ds):
            text = row.get(field_name)
            if _skip_reason(text):
                continue
            yield from split_long(text)  # bounded memory; the same words as the whole text (tokenizer.py)
            n += 1
            if limit is not None and n >= limit:
                return


def build_indexed_dataset(data: DataConfig, tokenizer: TokenizerConfig) -> dict:
    """Build ``data.output`` from ``data.paths``; returns the manifest."""
    data.validate()
    tokenizer.validate()
    output = os.path.abspath(data.output)
    if os.path.exists(output) and not data.overwrite:
        raise DataError(f"data.output={output} exists: choose another folder or set data.overwrite=true")
    sources = resolve_sources(list(data.paths), data.format)
    remove_stale_temp_dirs(output)
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = os.path.join(tmp, "_scratch")  # HF cache and cleaned copies; deleted before the rename
    os.makedirs(scratch)
    with open(os.path.join(tmp, OWNER), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    try:
        manifest = _build(data, tokenizer, sources, tmp, scratch, output)
        shutil.rmtree(scratch)
        os.remove(os.path.join(tmp, OWNER))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(output):
            old = f"{output}.old-{os.getpid()}"
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old)
        else:
            os.makedirs(os.path.dirname(output), exist_ok=True)
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if manifest["tokenizer"]["path"].startswith(tmp):
        manifest["tokenizer"]["path"] = output + manifest["tokenizer"]["path"][len(tmp):]
        with open(os.path.join(output, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temp_dirs(output: str) -> list[str]:
    """Delete ``<output>.tmp-<pid>`` folders of builds killed before they could clean up; returns them.

    Only folders made on this host (their ``_owner.json``, or none for a build killed before writing
    it) whose process is gone: a concurrent build's folder, here or on another node sharing the file
    system, is left alone. A reused pid keeps its folder until the next build after that process ends.
    """
    removed = []
    for path in glob.glob(glob.escape(output) + ".tmp-*"):
        m = re.fullmatch(r"\.tmp-(\d+)", path[len(output):])
        if not m or not os.path.isdir(path) or int(m.group(1)) == os.getpid():
            continue
        try:
            with open(os.path.join(path, OWNER)) as f:
                host = json.load(f).get("host")
        except (OSError, ValueError):
            host = None
        if host not in (None, socket.gethostname()) or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a build (pid %s) that was killed before it finished", path, m.group(1))
        removed.append(path)
    return removed


def _build(data: DataConfig, tok_cfg: TokenizerConfig, sources: list[Source], tmp: str, scratch: str,
           output: str) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    for src in sources:
        if src.format != "hub":
            prepare_source(src, data, os.path.join(scratch, "prepared"))
    kept = [s for s in sources if not s.empty]
    if not kept:
        raise DataError(f"every file of data.paths={list(data.paths)} is empty or bad (see the warnings above): "
                        "point data.paths at files with text")
    cache = os.path.join(scratch, "hf_cache")
    chat = data.records == "chat"  # conversations: read and encoded by sbtrain.data.chat_records
    loaded = [] if chat else [load_source(s, data.text_field, data.streaming, cache, data.hub_split) for s in kept]
    if tok_cfg.kind == "train_bpe":
        tok_path = os.path.abspath(tok_cfg.path) if tok_cfg.path else os.path.join(tmp, "tokenizer")
        if chat:  # a new tokenizer has no template: chatml unless named; its turn markers become tokens
            template = resolve_template(data.chat.template or "chatml")
            texts = itertools.islice((t for src in kept for t in bpe_texts(src, data.chat.field, data.streaming, cache,
                                                                            data.hub_split)), tok_cfg.train_max_documents)
            train_bpe(texts, tok_path, tok_cfg.vocab_size, tok_cfg.eod_token, tok_cfg.min_frequency,
                      special_tokens=template.special_tokens, chat_template=template.text)
        else:
            train_bpe(_texts_for_bpe(kept, loaded, tok_cfg.train_max_documents), tok_path, tok_cfg.vocab_size,
                      tok_cfg.eod_token, tok_cfg.min_frequency)
    else:
        tok_path = os.path.abspath(tok_cfg.path)
    tok, eod_id = load_tokenizer(tok_path, tok_cfg.eod_token)
    template = resolve_template(data.chat.template, tok) if chat else None  # a missing template fails here
    n_vocab, dtype_name = vocab_info(tok)
    dtype = np.dtype(dtype_name).type

    prefix = dataset_prefix(tmp)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    mask_builder = IndexedDatasetBuilder(get_bin_path(os.path.join(tmp, MASK_PREFIX)), dtype=np.uint8) if chat else None
    skipped: Counter = Counter()
    skipped_examples: list[str] = []  # chat: the first bad records, "file line N: why"
    trained_tokens = 0
    per_source = []
    n_docs = n_tokens = 0
    max_id = -1
    loaded_of = {id(src): pair for src, pair in zip(kept, loaded)}
    for src in sources:
        docs = toks = records = 0
        if not src.empty:
            if chat:
                rows = ((item.ids, item) for item in encode_source(src, data.chat, tok_path, tok_cfg.eod_token, template,
                                                                  data.streaming, cache, data.hub_split, data.num_proc))
            else:
                ds, field_name = loaded_of[id(src)]
                rows = _encoded_rows(ds, field_name, data.streaming, data.num_proc, tok_path, tok_cfg.eod_token)
            for ids, reason in _reading(src, rows):
                records += 1
                if chat:
                    item, reason = reason, reason.reason
                    if reason and data.on_bad_record == "error":
                        raise bad_record_error(src, item)
                    if reason and len(skipped_examples) < 10:
                        skipped_examples.append(f"{src.path} {item.where}: {item.why}")
                if reason:
                    skipped[reason] += 1
                    continue
                if chat:
                    mask_builder.add_document(item.mask, [item.mask.size])
                    trained_tokens += int(item.mask.sum())
                arr = np.asarray(ids, dtype=np.int64)
                max_id = max(max_id, int(arr.max()))
                builder.add_document(arr.astype(dtype), [arr.size])
                docs += 1
                toks += arr.size
            src.empty = records == 0  # parquet / arrow / hub: known only now
            check_empty(src, data.on_bad_record)
        n_docs += docs
        n_tokens += toks
        entry = {"path": src.path, "format": src.format} if src.format == "hub" else fingerprint_file(src.path)
        entry.update(format=src.format, documents=docs, tokens=toks, invalid_utf8_lines=src.utf8.bad_lines,
                     invalid_utf8_bytes=src.utf8.bad_bytes, undecodable_fraction=round(src.utf8.fraction, 6))
        if src.bad_records or src.empty:
            entry.update(bad_records=src.bad_records, first_bad_records=src.first_bad_records, empty=src.empty)
        per_source.append(entry)
    builder.finalize(get_idx_path(prefix))
    if mask_builder is not None:
        mask_builder.finalize(get_idx_path(os.path.join(tmp, MASK_PREFIX)))
    if n_docs == 0:
        raise DataError(f"no document left in {data.paths} after skipping {dict(skipped)}: check data.text_field")

    with open(get_idx_path(prefix), "rb") as f:
        idx_sha = hashlib.sha256(f.read()).hexdigest()
    tok_hash = tokenizer_hash(tok)
    replaced = sum(s.utf8.bad_lines for s in sources)
    bad = {"malformed_records": sum(s.bad_records for s in sources), "empty_files": sum(s.empty for s in sources)}
    return {
        "version": MANIFEST_VERSION,
        # Identifies the token content: document structure (.idx) and the ids' meaning (tokenizer).
        "fingerprint": hashlib.sha256(f"{idx_sha}:{tok_hash}:{n_tokens}".encode()).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prefix": PREFIX,
        "dtype": dtype_name,
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "max_token_id": max_id,
        "tokenizer": {"path": tok_path, "kind": tok_cfg.kind, "sha256": tok_hash, "vocab_size": n_vocab,
                      "eod_id": eod_id, "eod_token": tok.convert_ids_to_tokens(eod_id)},
        "text_field": data.text_field,
        "skipped": dict(skipped),
        "text_unit": data.text_unit,
        "invalid_utf8": {"policy": data.invalid_utf8, "replaced_lines": replaced,
                         "replaced_bytes": sum(s.utf8.bad_bytes for s in sources),
                         "max_undecodable_fraction": data.max_undecodable_fraction},
        # Input skipped under data.on_bad_record=skip (with error, any of it stops the build).
        "bad_records": {"policy": data.on_bad_record, **bad},
        "sources": per_source,
        "records": data.records,
        **({"loss_mask": {"prefix": MASK_PREFIX, "loss_on": data.chat.loss_on, "template": template.name,
                          "chat_template": template.text, "trained_tokens": trained_tokens,
                          "first_skipped": skipped_examples}} if chat else {}),
    }


def read_manifest(dataset_dir: str) -> dict:
    path = os.path.join(dataset_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{dataset_dir} has no {MANIFEST}: build it with sbtrain-data data.output={dataset_dir}")
    with open(path) as f:
        return json.load(f)


def check_dataset_dir(dataset_dir: str, need_manifest: bool = True) -> None:
    """A training input must be a folder written by sbtrain-data: say what is missing and how to make one
    (megatron's reader would fail with a bare AssertionError)."""
    need = DATASET_FILES if need_manifest else DATASET_FILES[:2]
    if not os.path.isdir(dataset_dir):
        problem = "does not exist" if not os.path.exists(dataset_dir) else "is a file, not a folder"
    else:
        missing = [f for f in need if not os.path.isfile(os.path.join(dataset_dir, f))]
        if not missing:
            return
        problem = f"has no {' / '.join(missing)}"
    where = "" if os.path.isabs(dataset_dir) else f" (from {os.getcwd()})"
    raise DataError(
        f"dataset {dataset_dir!r}{where} {problem}: a dataset is a folder written by sbtrain-data, holding "
        f"{', '.join(DATASET_FILES)}; fix the path in data.datasets (empty: data.output), or build it with "
        f"sbtrain-data data.paths=[...] data.output={dataset_dir}"
    )


def check_vocab(dataset_dir: str, vocab_size: int) -> int:
    """Fail before training if a token id of the dataset is >= the model's ``vocab_size``; returns the max id."""
    check_dataset_dir(dataset_dir, need_manifest=False)
    manifest_path = os.path.join(dataset_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        max_id = int(read_manifest(dataset_dir)["max_token_id"])
    else:  # a dataset built elsewhere: scan the tokens (memory-mapped, one pass)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(dataset_prefix(dataset_dir))
        max_id = int(max(int(ds[i].max()) for i in range(len(ds)))) if len(ds) else -1
    if max_id >= vocab_size:
        raise DataError(
            f"dataset {dataset_dir} has token id {max_id} >= model vocab_size={vocab_size}: use the tokenizer the "
            f"model was built for, or a model with vocab_size >= {max_id + 1}"
        )
    return max_id
