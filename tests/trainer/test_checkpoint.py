"""Checkpoints: round trip, atomic rename, corruption detection and fallback, kill mid-write."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sbtrain.trainer.checkpoint import Checkpointer, CheckpointError, verify

ROOT = Path(__file__).resolve().parents[2]


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        "trainer": {"step": seed, "rng_python": [3, [1, 2, 3], None], "name": f"run{seed}"},
    }


def _template() -> dict:
    return {
        "model": {"w": torch.zeros(4, 3), "b": torch.zeros(3)},
        "trainer": {"step": 0, "rng_python": None, "name": ""},
    }


def test_round_trip_and_latest(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"note": "x"})
    assert sorted(p.name for p in ck.list()) == ["step_00000002", "step_00000003"]  # keep_last=2 prunes
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    state = _template()
    meta = ck.load(state)
    assert meta["step"] == 3 and meta["note"] == "x"
    expected = _state(3)
    assert torch.equal(state["model"]["w"], expected["model"]["w"])
    assert state["trainer"] == {"step": 3, "rng_python": [3, [1, 2, 3], None], "name": "run3"}
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_corrupted_newest_falls_back_with_warning(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, _state(1), {})
    ck.save(2, _state(2), {})
    shard = next((tmp_path / "step_00000002").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "does not match its checksum" in verify(tmp_path / "step_00000002")
    state = _template()
    with caplog.at_level("WARNING", logger="sbtrain.checkpoint"):
        meta = ck.load(state)
    assert meta["step"] == 1 and state["trainer"]["step"] == 1
    assert any("skipping checkpoint" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="not usable: .*checksum"):
        ck.load(_template(), tmp_path / "step_00000002")


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, _state(1), {})
    other = {"model": {"w": torch.zeros(5, 3), "b": torch.zeros(3)}, "trainer": _template()["trainer"]}
    with pytest.raises(CheckpointError, match=r"model/w has shape \(4, 3\), this run expects \(5, 3\); is it from another model"):
        ck.load(other)
    missing = _template()
    missing["model"]["extra"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="lacks 1 entries"):
        ck.load(missing)


def test_async_save_round_trip(tmp_path):
    ck = Checkpointer(tmp_path, async_save=True)
    state = _state(5)
    ck.save(5, state, {})
    state["model"]["w"].add_(1.0)  # training goes on: the snapshot must not see this
    ck.wait()
    loaded = _template()
    Checkpointer(tmp_path).load(loaded)
    assert torch.equal(loaded["model"]["w"], _state(5)["model"]["w"])


def test_kill_during_save_leaves_previous_loadable(tmp_path):
    """A saver killed with SIGKILL while writing leaves the last good checkpoint loadable."""
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        import sbtrain.trainer.checkpoint as C
        ck = C.Checkpointer({str(tmp_path)!r})
        ck.save(1, {{"model": {{"w": torch.ones(8)}}}}, {{}})
        real = C._sha256
        def slow(path):  # stall inside the second save, after its shards are written
            print("WRITING", flush=True); time.sleep(60); return real(path)
        C._sha256 = slow
        ck.save(2, {{"model": {{"w": torch.full((8,), 2.0)}}}}, {{}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        line = ""
        while "WRITING" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "WRITING" in line, "the saver never reached the second save"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert (tmp_path / ".step_00000002.tmp").is_dir()  # the killed save stays a temp dir
    state = {"model": {"w": torch.zeros(8)}}
    meta = Checkpointer(tmp_path).load(state)
    assert meta["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(8))
    assert json.loads((tmp_path / "step_00000001" / "manifest.json").read_text())["step"] == 1
