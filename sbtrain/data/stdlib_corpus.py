"""The bundled corpus of ``make train``: the Python standard library's own source files.

Every machine with Python has them (about 13 MB of real, permissively licensed text: code,
docstrings and comments), so a fresh clone can train on real text with no download and no
data committed. One JSON line per file: ``{"text": ..., "path": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo"}


def stdlib_files(root: str | None = None) -> list[Path]:
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def write_corpus(out: str | os.PathLike, root: str | None = None, max_bytes: int = 16 << 20) -> dict:
    """Write the corpus as jsonl (atomically); returns counts. Stops after ``max_bytes`` of text."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    files = total = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in stdlib_files(root):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few test fixtures are deliberately not UTF-8
            if not text.strip():
                continue
            f.write(json.dumps({"text": text, "path": str(path)}) + "\n")
            files += 1
            total += len(text.encode("utf-8"))
            if total >= max_bytes:
                break
    os.replace(tmp, out)
    return {"path": str(out), "documents": files, "bytes": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/stdlib/corpus.jsonl")
    parser.add_argument("--max-bytes", type=int, default=16 << 20)
    args = parser.parse_args()
    print(json.dumps(write_corpus(args.out, max_bytes=args.max_bytes)))


if __name__ == "__main__":
    main()
