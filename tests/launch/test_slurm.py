"""``launch/slurm/train.sbatch`` on a real single-node Slurm (tests/launch/slurm_cluster.py).

Three jobs of the same tiny 2-rank run (one torchrun per node, two ranks, gloo):
- A runs uninterrupted: the reference (its loss falls, its checkpoints exist);
- B gets USR1 in its batch script mid-run (what ``--signal=B:USR1@120`` sends before the time
  limit): the trap forwards it through srun and torchrun to the ranks, the trainer checkpoints and
  exits 0, the script requeues the job, and the requeued job resumes from that checkpoint;
- C loses a rank to SIGKILL mid-step (tests/launch/fault_worker.py): torchrun fails, the script
  requeues, and the job resumes from its newest checkpoint.
B's and C's per-step losses equal A's exactly (fp32, CPU), so both resumed where they stopped.

Without Slurm the test skips, unless ``SBTRAIN_REQUIRE_SLURM=1`` (set by .ci/run), which makes a
missing Slurm a failure.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster, slurm_missing
from tests.trainer.e2e import ROOT, SMALL, losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
STEPS, EVERY = 24, 4


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_missing()
    if why:
        if os.environ.get("SBTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"SBTRAIN_REQUIRE_SLURM=1 but Slurm cannot run here: {why}")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()  # by PID, pass or fail


def submit(slurm: SlurmCluster, dataset: str, out: Path, **env: str) -> int:
    overrides = [*SMALL, f"data.datasets=[{dataset}]", f"trainer.max_steps={STEPS}", f"checkpoint.every={EVERY}"]
    job_env = {"NPROC": "2", "OMP_NUM_THREADS": "1", "SBTRAIN_OUT_DIR": str(out), **env}
    return slurm.sbatch("--cpus-per-task=1", f"--output={out}.slurm.out", str(SBATCH), *overrides,
                        env=job_env, cwd=ROOT)


def summaries(out: Path) -> list[dict]:
    """The run summaries rank 0 printed, one per (re)start of the job, in order."""
    lines = Path(f"{out}.slurm.out").read_text(errors="replace").splitlines()
    return [json.loads(x)["summary"] for x in lines if x.startswith('{"summary"')]


def finished(slurm: SlurmCluster, job: int, out: Path, timeout: float = 400) -> dict:
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout)
    log = Path(f"{out}.slurm.out")
    assert info["JobState"] == "COMPLETED", (info, log.read_text(errors="replace")[-4000:] if log.exists() else "")
    return info


def wait_for_step(out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= step:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{out} did not reach step {step} in {timeout} s")


def test_sbatch_trains_preempts_requeues_and_resumes(slurm, dataset, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    job_a = submit(slurm, dataset, a)
    job_b = submit(slurm, dataset, b)
    job_c = submit(slurm, dataset, c, SBTRAIN_MODULE="tests.launch.fault_worker", SBTRAIN_FAULT_STEP="6",
                   SBTRAIN_FAULT_ONCE=str(tmp_path / "c.killed"))

    # B: USR1 to the batch script mid-run, as Slurm's --signal=B:USR1@120 delivers it.
    wait_for_step(b, 3)
    slurm.signal_batch(job_b, "USR1")

    # A: the uninterrupted reference.
    info_a = finished(slurm, job_a, a)
    reference = losses(a)
    assert list(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1] - 0.5  # it learns
    assert (a / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").is_file()
    assert info_a["Restarts"] == "0"

    info_b = finished(slurm, job_b, b)
    first, second = summaries(b)
    assert info_b["Restarts"] == "1"  # requeued once by the script
    assert first["stopped_by"] == "SIGUSR1" and first["step"] < STEPS
    stopped = first["step"]
    log = Path(f"{b}.slurm.out").read_text(errors="replace")
    assert "USR1 received: forwarding to the job step" in log and f"requeueing job {job_b}" in log
    assert second["resumed_from"].endswith(f"step_{stopped:08d}") and second["step"] == STEPS
    assert losses(b) == reference  # resumed exactly where it stopped

    info_c = finished(slurm, job_c, c)
    assert (tmp_path / "c.killed").is_file()  # the fault did fire
    runs = summaries(c)
    assert info_c["Restarts"] == "1" and len(runs) == 1  # the killed run printed no summary
    assert runs[0]["resumed_from"].endswith(f"step_{EVERY:08d}") and runs[0]["step"] == STEPS
    assert losses(c) == reference
