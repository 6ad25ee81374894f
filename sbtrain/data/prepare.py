"""The build's pre-pass over local JSON and plain-text files: every input check that needs the bytes.

One pass per file, before anything is tokenized, so a bad file fails fast and by name:

- invalid UTF-8: ``data.invalid_utf8=error`` names file and line; ``replace`` swaps the bytes for
  U+FFFD and counts them, but a file whose replaced bytes exceed ``data.max_undecodable_fraction``
  of its size is refused (it is binary or another encoding: replacing would build garbage); below
  the limit each such file gets a warning and its counts go into the manifest.
- JSON Lines: every non-blank line must hold a JSON object. A bad line is an error naming
  ``file:line`` and the JSON error, or with ``data.on_bad_record=skip`` it is dropped and counted.
  A ``.json`` file whose first character is ``[`` is one JSON array of records instead.
- plain text: cut into documents by ``data.text_unit`` (the shared rule of
  :func:`sbtrain.data.sources.text_documents`) and handed to the loader as a jsonl of documents.
- an empty file (no record, no document): an error naming it, or skipped and counted.

A JSON file that needs no change is loaded in place; otherwise the loader reads a cleaned copy in
the build's scratch folder (deleted with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

from sbtrain.data.sources import DataError, DecodeStats, Source, decoded_lines, parse_json_line, read_text_file

log = logging.getLogger(__name__)
SKIP_HINT = "or set data.on_bad_record=skip to skip such input and count it in the manifest"


def _scratch_path(scratch: str, path: str, suffix: str) -> str:
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(scratch, f"{digest}-{os.path.basename(path)}{suffix}")


def _first_char(path: str) -> bytes:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _bad_record(src: Source, policy: str, where: str, why: str) -> None:
    if policy == "error":
        raise DataError(f"{src.path}:{where}: {why}: fix it, {SKIP_HINT}")
    src.bad_records += 1
    if len(src.first_bad_records) < 10:
        src.first_bad_records.append(f"line {where}: {why}")


def _json_lines(src: Source, policy: str, scratch: str, strict: bool) -> None:
    records, dropped = 0, set()
    for lineno, line in decoded_lines(src.path, src.utf8, strict):
        if not line.strip():
            continue  # blank lines are no records (the loader skips them too)
        _, why = parse_json_line(line)
        if why is None:
            records += 1
        else:
            _bad_record(src, policy, str(lineno), why)
            dropped.add(lineno)
    src.empty = records == 0
    if records and (dropped or src.utf8.bad_lines):
        src.load_path = _scratch_path(scratch, src.path, "")
        with open(src.load_path, "w", encoding="utf-8") as out:
            for lineno, line in decoded_lines(src.path, DecodeStats()):
                if lineno not in dropped:
                    out.write(line if line.endswith("\n") else line + "\n")


def _json_array(src: Source, policy: str, scratch: str, strict: bool) -> None:
    text = "".join(line for _, line in decoded_lines(src.path, src.utf8, strict))
    try:
        records = json.loads(text)
        why = None if isinstance(records, list) and all(isinstance(r, dict) for r in records) else \
            "not an array of objects like [{\"text\": ...}, ...]"
    except json.JSONDecodeError as e:
        why, records = f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno})", []
    if why:  # a broken JSON document has no good records left: skipping it skips the file
        _bad_record(src, policy, "1", why)
        records = []
    src.empty = not records
    if records and src.utf8.bad_lines:
        src.load_path = _scratch_path(scratch, src.path, "")
        with open(src.load_path, "w", encoding="utf-8") as out:
            out.write(text)


def _text(src: Source, unit: str, scratch: str, strict: bool) -> None:
    src.load_path = _scratch_path(scratch, src.path, ".jsonl")
    n = 0
    with open(src.load_path, "w", encoding="utf-8") as out:
        for doc in read_text_file(src.path, unit, src.utf8, strict):
            out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            n += 1
    src.empty = n == 0


def check_undecodable(src: Source, max_fraction: float) -> None:
    """Refuse a file with too many invalid UTF-8 bytes; warn about one with a few."""
    st = src.utf8
    if not st.bad_bytes:
        return
    where = f"{st.bad_lines} line(s), the first at line {st.first_bad_lines[0]}"
    if st.fraction > max_fraction:
        allow = math.ceil(st.fraction * 100) / 100
        raise DataError(
            f"{src.path}: {st.fraction:.1%} of its bytes ({st.bad_bytes} of {st.bytes}, on {where}) are not valid "
            f"UTF-8, above data.max_undecodable_fraction={max_fraction:g}: it is not UTF-8 text (binary data, or "
            f"another encoding such as Latin-1 or UTF-16); convert it to UTF-8 or leave it out of data.paths, or "
            f"set data.max_undecodable_fraction={allow:g} to build it with those bytes replaced by U+FFFD"
        )
    log.warning("%s: %d invalid UTF-8 bytes (%.2f%% of the file, on %s) replaced by U+FFFD; allowed by "
                "data.max_undecodable_fraction=%g, counted in the manifest", src.path, st.bad_bytes,
                100 * st.fraction, where, max_fraction)


def check_empty(src: Source, policy: str) -> None:
    """An input file with no record (no document for plain text): an error, or a counted skip."""
    if not src.empty:
        return
    what = "document (it is blank)" if src.format == "text" else "record"
    if policy == "error":
        raise DataError(f"{src.path} is empty: it holds no {what}: fill it or leave it out of data.paths, "
                        f"{SKIP_HINT}")
    log.warning("%s is empty (no %s): skipped (data.on_bad_record=skip), counted in the manifest", src.path, what)


def prepare_source(src: Source, data, scratch: str) -> None:
    """Run the checks on one source (a :class:`~sbtrain.config.data.DataConfig` ``data``); sets
    ``src.load_path`` when the loader must read a prepared copy, and the counts the manifest reports."""
    if src.format not in ("json", "text") or src.path.endswith((".gz", ".zst")):
        return  # parquet/arrow store validated strings; compressed files are left to the loader
    os.makedirs(scratch, exist_ok=True)
    strict = data.invalid_utf8 == "error"
    if src.format == "text":
        _text(src, data.text_unit, scratch, strict)
    elif _first_char(src.path) == b"[":
        _json_array(src, data.on_bad_record, scratch, strict)
    else:
        _json_lines(src, data.on_bad_record, scratch, strict)
    check_undecodable(src, data.max_undecodable_fraction)
    if src.bad_records:
        log.warning("%s: skipped %d bad record(s) (data.on_bad_record=skip), counted in the manifest; first: %s",
                    src.path, src.bad_records, src.first_bad_records[0])
    check_empty(src, data.on_bad_record)
