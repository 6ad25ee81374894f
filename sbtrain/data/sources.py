"""Raw corpus reading: local files / globs (jsonl, parquet, text, arrow) or a hub dataset, via HF datasets.

Each file is loaded on its own so that every error names the file, and every file gets its own
fingerprint in the manifest. Invalid UTF-8 is our policy, not the loader's (see
:mod:`sbtrain.data.prepare`). The plain-text rule lives here, in one place, because every command
that reads ``.txt`` (``sbtrain-data``, ``sbtrain-eval``) must cut it into the same documents:

- ``text_unit=file`` (default): the whole file is one document, exactly as written (newlines,
  indentation and blank lines kept; a leading UTF-8 byte-order mark dropped).
- ``text_unit=paragraph``: every block of consecutive non-blank lines is one document; blank
  (whitespace-only) lines separate documents and are not part of any; the line break that ends a
  block's last line is dropped, the ones inside it are kept.

A file (or block) with no non-whitespace character is no document.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from sbtrain.config.model import ConfigError

EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
}
FULL_HASH_LIMIT = 1 << 20  # files up to 1 MiB are hashed whole, larger ones by their first MiB
TEXT_UNITS = ("file", "paragraph")
BOM = "\ufeff"


class DataError(ConfigError):
    """Bad input data or a data setting that cannot work; the message names the value and the fix.

    A ConfigError, so the command wrappers print it as one message (exit status 2), not a traceback."""


@dataclass
class DecodeStats:
    """What decoding one file met: its bytes, the invalid UTF-8 bytes replaced, and on which lines."""

    bytes: int = 0
    bad_bytes: int = 0
    bad_lines: int = 0
    first_bad_lines: list[int] = field(default_factory=list)  # the first 10, for the manifest and messages

    @property
    def fraction(self) -> float:
        return self.bad_bytes / self.bytes if self.bytes else 0.0


@dataclass
class Source:
    path: str  # a local file, or a hub dataset name
    format: str  # json | parquet | text | arrow | hub
    load_path: str | None = None  # what the loader reads: a cleaned copy, or the documents of a text file
    utf8: DecodeStats = field(default_factory=DecodeStats)
    bad_records: int = 0  # malformed JSON Lines records skipped (data.on_bad_record=skip)
    first_bad_records: list[str] = field(default_factory=list)  # "line N: why", the first 10
    empty: bool = False  # no record / no document at all


def _looks_local(spec: str) -> bool:
    # A hub name is "name" or "org/name"; anything with a glob, an extension or a path prefix is meant as a file.
    return (
        any(c in spec for c in "*?[")
        or spec.startswith((".", "/", "~"))
        or os.path.splitext(spec)[1].lower() in EXTENSIONS
        or spec.count("/") > 1
    )


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when HF offline mode is set or huggingface.co cannot be reached in ``timeout`` s."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def format_of(path: str, declared: str | None) -> str:
    if declared:
        return declared
    name = path.lower()
    if name.endswith((".gz", ".zst")):
        name = name.rsplit(".", 1)[0]
    fmt = EXTENSIONS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path!r} from its extension (known: {sorted(EXTENSIONS)}): "
            "set data.format=json|parquet|text|arrow"
        )
    return fmt


def resolve_sources(paths: list[str], declared_format: str | None = None) -> list[Source]:
    """Expand globs into files; a spec that is neither a local path nor a glob is a hub dataset name."""
    if not paths:
        raise DataError("data.paths is empty: give local files or globs, e.g. data.paths=[corpus/*.jsonl]")
    sources: list[Source] = []
    for spec in paths:
        spec = os.path.expanduser(str(spec))
        if os.path.isdir(spec):
            files = sorted(f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if os.path.isfile(f))
            files = [f for f in files if declared_format or os.path.splitext(f)[1].lower() in EXTENSIONS]
        else:
            files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if files:
            sources.extend(Source(path=f, format=format_of(f, declared_format)) for f in files)
        elif _looks_local(spec):
            raise DataError(f"data.paths entry {spec!r} matches no file: check the path or glob")
        elif not hub_reachable():
            raise DataError(
                f"data.paths entry {spec!r} is not a local file or glob, and the Hugging Face hub is offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, or huggingface.co unreachable): download the dataset "
                "and give its local files, e.g. data.paths=[path/to/*.parquet]"
            )
        else:
            sources.append(Source(path=spec, format="hub"))
    return sources


def fingerprint_file(path: str) -> dict[str, object]:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FULL_HASH_LIMIT))
    scope = "full" if st.st_size <= FULL_HASH_LIMIT else "first_1MiB"
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime, "sha256": h.hexdigest(),
            "sha256_scope": scope}


_bad_bytes = [0]


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    # Like errors="replace" (one U+FFFD per maximal invalid subsequence), but counts the bytes it replaced.
    _bad_bytes[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("sbtrain-count-replace", _count_and_replace)


def decode_replacing(raw: bytes) -> tuple[str, int]:
    """``raw`` decoded as UTF-8 with invalid bytes replaced by U+FFFD, and how many bytes were replaced."""
    _bad_bytes[0] = 0
    return raw.decode("utf-8", "sbtrain-count-replace"), _bad_bytes[0]


def decoded_lines(path: str, stats: DecodeStats, strict: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, line with its line break)`` of a local file, decoded as UTF-8.

    Line by line, so memory stays at one line; a newline byte is never part of a multi-byte UTF-8
    sequence, so this decodes exactly as the whole file would. ``strict``: invalid UTF-8 is an error
    naming file and line; otherwise it is replaced and counted in ``stats``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            stats.bytes += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if strict:
                    raise DataError(
                        f"invalid UTF-8 in {path} line {lineno} (byte {e.start} of the line): fix the file, "
                        "or set data.invalid_utf8=replace to replace bad bytes with U+FFFD and count the lines"
                    ) from None
                line, bad = decode_replacing(raw)
                stats.bad_bytes += bad
                stats.bad_lines += 1
                if len(stats.first_bad_lines) < 10:
                    stats.first_bad_lines.append(lineno)
            if lineno == 1 and line.startswith(BOM):
                line = line[1:]
            yield lineno, line


def _paragraph(lines: list[str]) -> str:
    doc = "".join(lines)
    if doc.endswith("\n"):  # the break after the block's last line separates documents, it is not text
        doc = doc[:-2] if doc.endswith("\r\n") else doc[:-1]
    return doc


def text_documents(lines: Iterable[str], unit: str = "file") -> Iterator[str]:
    """The documents of a plain-text file given its lines (line breaks included): the module's rule."""
    if unit not in TEXT_UNITS:
        raise DataError(f"data.text_unit={unit!r} is not one of {TEXT_UNITS} (file: a .txt is one document; "
                        "paragraph: one per block of non-blank lines)")
    if unit == "file":
        doc = "".join(lines)
        if doc.strip():
            yield doc
        return
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield _paragraph(block)
            block = []
    if block:
        yield _paragraph(block)


def read_text_file(path: str, unit: str = "file", stats: DecodeStats | None = None,
                   strict: bool = False) -> Iterator[str]:
    """The documents of one plain-text file (see the module docstring)."""
    stats = DecodeStats() if stats is None else stats
    yield from text_documents((line for _, line in decoded_lines(path, stats, strict)), unit)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def parse_json_line(line: str) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a JSON Lines line holding an object, else ``(None, why)``."""
    try:
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:  # its own "line 1" would confuse next to the file's line number
        return None, f"not valid JSON ({e.msg}: column {e.colno})"
    except ValueError as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return None, f"a JSON {_JSON_TYPES.get(type(record), 'null')}, not an object like {{\"text\": ...}}"
    return record, None


def load_source(source: Source, text_field: str, streaming: bool, cache_dir: str, hub_split: str = "train"):
    """The HF dataset of one source, checked to have ``text_field``."""
    from datasets import load_dataset

    # A text file reaches the loader as the jsonl of its documents (sbtrain.data.prepare), field "text".
    fmt = "json" if source.format == "text" else source.format
    field_name = "text" if source.format == "text" else text_field
    try:
        if source.format == "hub":
            ds = load_dataset(source.path, split=hub_split, streaming=streaming, cache_dir=cache_dir)
        else:
            ds = load_dataset(fmt, data_files=[source.load_path or source.path], split="train",
                              streaming=streaming, cache_dir=cache_dir)
        columns = ds.column_names
        if columns is None:  # streaming json: the schema is known only from the first record
            first = next(iter(ds), None)
            columns = list(first) if first is not None else [field_name]
    except DataError:
        raise
    except Exception as e:  # whatever the loader chokes on, the message must name the file
        fix = ("check the dataset name and hub_split" if source.format == "hub" else
               "fix or remove the file, or set data.format if its extension misleads")
        raise DataError(f"{source.path} cannot be read as {source.format}: {reader_error(e)}: {fix}") from e
    if field_name not in columns:
        raise DataError(
            f"{source.path} has no field {field_name!r}; its fields are {sorted(columns)}: "
            f"set data.text_field to one of them"
        )
    return ds, field_name


def reader_error(e: BaseException) -> str:
    """The informative part of a loader exception (HF wraps the real one in a generic DatasetGenerationError)."""
    while e.__cause__ is not None and type(e).__name__ == "DatasetGenerationError":
        e = e.__cause__
    return f"{type(e).__name__}: {e}"
