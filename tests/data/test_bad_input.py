"""Bad build inputs end in one message naming the file and the fix, or (by option) a counted skip; a killed
build's temp folder is cleaned by the next one (issue 21)."""

import json
import logging
import os
import subprocess
import sys

import pytest

from sbtrain.config.data import TokenizerConfig
from sbtrain.data import DataError

from .conftest import build

GOOD = '{"text": "alpha beta gamma"}\n{"text": "delta epsilon"}\n'


@pytest.fixture
def tok(corpus):
    return TokenizerConfig(kind="pretrained", path=corpus["tokenizer"])


def _no_temp_left(tmp_path):
    return not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("name,content", [("empty.txt", b""), ("blank.txt", b" \n\n\t\n"), ("empty.jsonl", b""),
                                          ("blank.jsonl", b"\n  \n")])
def test_empty_file_is_named(tmp_path, tok, name, content):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "good.jsonl").write_text(GOOD)
    paths = [tmp_path / "good.jsonl", tmp_path / name]
    with pytest.raises(DataError, match=rf"{tmp_path / name} is empty: it holds no .*data.on_bad_record=skip"):
        build(tmp_path, paths, tokenizer=tok)
    assert _no_temp_left(tmp_path)
    m, _ = build(tmp_path, paths, tokenizer=tok, on_bad_record="skip")
    assert m["num_documents"] == 2 and m["bad_records"] == {"policy": "skip", "malformed_records": 0, "empty_files": 1}
    assert m["sources"][1]["empty"] is True and m["sources"][1]["documents"] == 0


def test_malformed_json_line_names_file_line_and_error(tmp_path, tok, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + '{"text": "broken\n["an array"]\n{"text": "zeta eta"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON \(Unterminated string starting at: column 10\): "
                                        r"fix it, or set data.on_bad_record=skip"):
        build(tmp_path, [path], tokenizer=tok)
    with caplog.at_level(logging.WARNING):
        m, _ = build(tmp_path, [path], tokenizer=tok, on_bad_record="skip")
    assert m["num_documents"] == 3 and m["bad_records"]["malformed_records"] == 2
    src = m["sources"][0]
    assert src["bad_records"] == 2 and src["first_bad_records"][1].startswith("line 4: a JSON array, not an object")
    assert "skipped 2 bad record(s)" in caplog.text


def test_broken_json_array_file(tmp_path, tok):
    path = tmp_path / "recs.json"
    path.write_text('[{"text": "alpha"},\n {"text": "beta"\n]')
    with pytest.raises(DataError, match=rf"{path}:1: not valid JSON \(Expecting ',' delimiter: line 3 column 1\)"):
        build(tmp_path, [path], tokenizer=tok)
    path.write_text('[{"text": "alpha"},\n {"text": "beta"}\n]')
    assert build(tmp_path, [path], tokenizer=tok)[0]["num_documents"] == 2


def test_random_bytes_are_refused_by_fraction(tmp_path, tok, caplog):
    import random

    path = tmp_path / "noise.txt"
    path.write_bytes(random.Random(0).randbytes(20000))
    with pytest.raises(DataError, match=rf"{path}: \d+\.\d% of its bytes \(\d+ of 20000, on \d+ line\(s\), the first "
                                        r"at line 1\) are not valid UTF-8, above data.max_undecodable_fraction=0.01"):
        build(tmp_path, [path], tokenizer=tok)
    with caplog.at_level(logging.WARNING):
        m, _ = build(tmp_path, [path], tokenizer=tok, max_undecodable_fraction=1.0)
    src = m["sources"][0]
    assert src["undecodable_fraction"] > 0.3 and src["invalid_utf8_bytes"] > 6000
    assert m["invalid_utf8"]["replaced_bytes"] == src["invalid_utf8_bytes"]
    assert "replaced by U+FFFD; allowed by data.max_undecodable_fraction=1" in caplog.text


def test_few_bad_bytes_are_replaced_with_a_warning(tmp_path, tok, caplog):
    path = tmp_path / "mostly.txt"
    path.write_bytes(b"clean text " * 100 + b"\xff\n")
    with caplog.at_level(logging.WARNING):
        m, _ = build(tmp_path, [path], tokenizer=tok)
    assert m["sources"][0]["invalid_utf8_bytes"] == 1 and "mostly.txt: 1 invalid UTF-8 bytes" in caplog.text


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_build_temp_dir_is_removed_but_not_a_live_one(tmp_path, tok, caplog):
    (tmp_path / "in.jsonl").write_text(GOOD)
    out = tmp_path / "ds"
    dead = tmp_path / f"ds.tmp-{_dead_pid()}"
    (dead / "_scratch").mkdir(parents=True)
    (dead / "data.bin").write_bytes(b"half written")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"ds.tmp-{live_proc.pid}"
        live.mkdir()
        other_host = tmp_path / f"ds.tmp-{_dead_pid()}9"  # a dead pid here, but written by a build on another node
        other_host.mkdir()
        (other_host / "_owner.json").write_text(json.dumps({"host": "another-node", "pid": 1}))
        unrelated = tmp_path / "ds.tmp-notapid"
        unrelated.mkdir()
        with caplog.at_level(logging.WARNING):
            build(tmp_path, [tmp_path / "in.jsonl"], tokenizer=tok)
        assert not dead.exists() and f"removed {dead}, left by a build" in caplog.text
        assert live.is_dir() and other_host.is_dir() and unrelated.is_dir()
        assert (out / "manifest.json").is_file() and not (out / "_owner.json").exists()
    finally:
        live_proc.kill()
        live_proc.wait()


def test_cli_prints_one_line_not_a_traceback(tmp_path, corpus, capsys):
    from sbtrain.cli.app import run_app
    from sbtrain.cli.data import task

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    args = [f"data.paths=[{path}]", f"data.output={tmp_path / 'out'}", "tokenizer=pretrained",
            f"tokenizer.path={corpus['tokenizer']}"]
    with pytest.raises(SystemExit) as exc:
        run_app(task, "build_data", args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"error: {path}:2: not valid JSON (Expecting value: column 10)" in err
    run_app(task, "build_data", [*args, "data.on_bad_record=skip"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bad_records"] == {"policy": "skip", "malformed_records": 1, "empty_files": 0}


@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_file_is_named_not_a_loader_traceback(tmp_path, tok, streaming):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=rf"{path} cannot be read as parquet: \w+: .*fix or remove the file"):
        build(tmp_path, [path], tokenizer=tok, streaming=streaming)
    assert _no_temp_left(tmp_path)
