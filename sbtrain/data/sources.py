"""Raw corpus reading: local files / globs (jsonl, parquet, text, arrow) or a hub dataset, via HF datasets.

Each file is loaded on its own so that every error names the file, and every file gets its own
fingerprint in the manifest. Invalid UTF-8 is our policy, not the loader's: local json/text files
get a byte-level pre-pass that either fails naming file and line, or writes a cleaned copy.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
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


class DataError(ConfigError):
    """Bad input data or a data setting that cannot work; the message names the value and the fix.

    A ConfigError, so the command wrappers print it as one message (exit status 2), not a traceback."""


@dataclass
class Source:
    path: str  # a local file, or a hub dataset name
    format: str  # json | parquet | text | arrow | hub
    load_path: str | None = None  # cleaned copy when invalid UTF-8 was replaced
    replaced_lines: list[int] = field(default_factory=list)


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


def check_utf8(source: Source, policy: str, scratch_dir: str) -> None:
    """Pre-pass over a local json/text file's bytes, line by line; sets load_path / replaced_lines."""
    if source.format not in ("json", "text") or source.path.endswith((".gz", ".zst")):
        return  # parquet/arrow store validated strings; compressed files are left to the loader
    bad: list[int] = []
    with open(source.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if policy == "error":
                    raise DataError(
                        f"invalid UTF-8 in {source.path} line {lineno} (byte {e.start} of the line): fix the file, "
                        "or set data.invalid_utf8=replace to replace bad bytes with U+FFFD and count the lines"
                    ) from None
                bad.append(lineno)
    if not bad:
        return
    os.makedirs(scratch_dir, exist_ok=True)
    digest = hashlib.sha1(os.path.abspath(source.path).encode()).hexdigest()[:12]
    clean = os.path.join(scratch_dir, f"{digest}-{os.path.basename(source.path)}")
    with open(source.path, "rb") as src, open(clean, "w", encoding="utf-8") as dst:
        for raw in src:
            dst.write(raw.decode("utf-8", errors="replace"))
    source.load_path, source.replaced_lines = clean, bad


def load_source(source: Source, text_field: str, streaming: bool, cache_dir: str, hub_split: str = "train"):
    """The HF dataset of one source, checked to have ``text_field``."""
    from datasets import load_dataset

    if source.format == "hub":
        ds = load_dataset(source.path, split=hub_split, streaming=streaming, cache_dir=cache_dir)
    else:
        ds = load_dataset(source.format, data_files=[source.load_path or source.path], split="train",
                          streaming=streaming, cache_dir=cache_dir)
    field_name = "text" if source.format == "text" else text_field
    columns = ds.column_names
    if columns is None:  # streaming json: the schema is known only from the first record
        first = next(iter(ds), None)
        columns = list(first) if first is not None else [field_name]
    if field_name not in columns:
        raise DataError(
            f"{source.path} has no field {field_name!r}; its fields are {sorted(columns)}: "
            f"set data.text_field to one of them"
        )
    return ds, field_name
