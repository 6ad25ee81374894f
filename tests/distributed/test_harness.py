"""The gloo harness itself: results per rank, a worker's traceback in the parent, death, hang."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import DistributedWorkerError, run_distributed

pytestmark = pytest.mark.distributed


# Workers are module-level so that spawn can pickle them by name.
def _report(offset):
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)  # proves the group is live, not just that the processes ran
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS", "SBTRAIN_PROBE")}
    return {"rank": rank, "world": world, "sum": t, "env": env, "threads": torch.get_num_threads()}


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        _a_helper_that_fails(1234)
    return "fine"


def _a_helper_that_fails(value):
    raise ValueError(f"worker-side failure with value {value}")


def _die_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(7)
    time.sleep(30)  # rank 0 would wait; the harness must stop it once rank 1 is gone


def _hang():
    time.sleep(60)


def test_results_come_back_per_rank_in_order(monkeypatch):
    # Set after the forkserver may already be running: workers must still see the caller's env.
    monkeypatch.setenv("SBTRAIN_PROBE", "from-the-parent")
    results = run_distributed(_report, 2, 10.0)
    assert [r["rank"] for r in results] == [0, 1]
    for rank, r in enumerate(results):
        assert r["world"] == 2
        assert r["sum"].item() == (0 + 10.0) + (1 + 10.0)
        assert r["env"]["RANK"] == str(rank) and r["env"]["WORLD_SIZE"] == "2"
        assert r["env"]["OMP_NUM_THREADS"] == "1" and r["threads"] == 1
        assert r["env"]["SBTRAIN_PROBE"] == "from-the-parent"
    assert results[0]["env"]["MASTER_PORT"] == results[1]["env"]["MASTER_PORT"]


def test_worker_exception_is_reraised_with_its_traceback():
    with pytest.raises(DistributedWorkerError) as info:
        run_distributed(_raise_on_rank_one, 2)
    msg = str(info.value)
    assert "rank 1 of 2" in msg
    assert "worker-side failure with value 1234" in msg
    # The worker's own frames, not just the exception line: the traceback text made it across.
    assert "_a_helper_that_fails" in msg and "Traceback" in msg


def test_dead_or_hung_worker_fails_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(DistributedWorkerError, match=r"rank 1 of 2 died .*exit code 7"):
        run_distributed(_die_on_rank_one, 2)
    with pytest.raises(DistributedWorkerError, match=r"still running after timeout=3"):
        run_distributed(_hang, 2, timeout=3)
    assert time.monotonic() - start < 20, "the harness should kill the survivors, not wait for their sleep"
