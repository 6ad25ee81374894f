"""The bundled corpus of `make train`: the standard library's own files, one JSON line each."""

import json
from pathlib import Path

from sbtrain.data.stdlib_corpus import stdlib_files, write_corpus


def test_corpus_is_the_stdlib_source_one_file_per_line(tmp_path):
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    info = write_corpus(tmp_path / "c.jsonl", max_bytes=200_000)
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    assert info["documents"] == len(lines) and info["bytes"] >= 200_000
    first = json.loads(lines[0])
    assert Path(first["path"]).read_text(encoding="utf-8") == first["text"]
    assert not (tmp_path / "c.jsonl.tmp").exists()
