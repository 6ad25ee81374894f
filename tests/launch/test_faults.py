"""Faults outside Slurm: a rank killed mid-step under ``torchrun --max-restarts``, a rank that
never joins a collective, and the timeout knob's bad values.

- kill -9: ``launch/torchrun.sh`` with ``MAX_RESTARTS=1`` runs a 2-rank job whose rank 1 sends
  itself SIGKILL on entering step 6 (tests/launch/fault_worker.py); torchrun restarts both ranks,
  they resume from the step-4 checkpoint, and the per-step losses equal an uninterrupted 2-rank
  run's exactly (fp32, CPU).
- a hung peer: two processes, one skips an all-reduce on a sub-group; the waiting rank fails
  after ``parallel.collective_timeout_s`` with an error naming its rank and the op, instead of
  hanging (the backend alone says only "Timed out waiting 2000ms for recv operation").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from sbtrain.config.model import ConfigError
from sbtrain.trainer.distributed import init_process_group, report_collective_timeouts
from tests.trainer.e2e import ROOT, SMALL, losses

TORCHRUN = ROOT / "launch" / "torchrun.sh"


def torchrun(dataset: str, out, *, env: dict | None = None, steps: int = 10) -> subprocess.Popen:
    overrides = [*SMALL, f"data.datasets=[{dataset}]", f"trainer.out_dir={out}", f"trainer.max_steps={steps}",
                 "checkpoint.every=4"]
    run_env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([str(TORCHRUN), *overrides], env=run_env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, stderr


@pytest.mark.slow
def test_rank_killed_mid_step_restarts_from_checkpoint_with_identical_losses(dataset, tmp_path):
    marker = tmp_path / "killed"
    reference = torchrun(dataset, tmp_path / "ref")  # both jobs at once: start-up dominates their time
    faulty = torchrun(dataset, tmp_path / "faulty", env={
        "MAX_RESTARTS": "1", "SBTRAIN_MODULE": "tests.launch.fault_worker", "SBTRAIN_FAULT_STEP": "6",
        "SBTRAIN_FAULT_ONCE": str(marker)})
    finish(reference)
    stdout, stderr = finish(faulty)
    assert marker.is_file()  # the fault fired: rank 1 died by SIGKILL in step 6
    assert "exitcode: -9" in stderr  # torchrun saw the SIGKILL and restarted the group
    assert "resumed_from" in stdout and "step_00000004" in stdout
    expected = losses(tmp_path / "ref")
    assert list(expected) == list(range(1, 11))
    assert losses(tmp_path / "faulty") == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_that_skips_a_collective_is_reported_with_rank_and_op():
    timeout_s, skipper = 2.0, 1
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.launch.hang_worker", str(timeout_s), str(skipper)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=120) for p in procs]  # bounded: a hang fails the test here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    waiting = procs[0]
    assert waiting.returncode == 3, results[0][1][-3000:]
    message = results[0][1]
    assert "CollectiveTimeoutError: rank 0 of 2: collective all_reduce timed out at step 3" in message
    assert "parallel.collective_timeout_s=2" in message
    assert procs[skipper].returncode == 0


def test_collective_names_are_restored_after_the_block():
    before = torch.distributed.all_reduce
    with report_collective_timeouts(5.0):
        assert torch.distributed.all_reduce is not before
    assert torch.distributed.all_reduce is before


@pytest.mark.parametrize("bad", [0.0, -5.0])
def test_bad_timeout_is_a_config_error_naming_the_knob(bad):
    with pytest.raises(ConfigError, match=r"parallel.collective_timeout_s=.* must be a positive"):
        init_process_group(torch.device("cpu"), bad)
