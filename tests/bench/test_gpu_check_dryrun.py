"""benchmarks/gpu_check.sh --dry-run end to end: the prepared GPU check's own path (torchrun, a
1-rank process group, synthetic megatron data, checkpoint + resume, sb7b vs qwen2 throughput)
on the CPU with gloo and tiny shapes, through the shell script itself. About 30-60 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed  # torchrun + gloo process groups


def test_dry_run_records_every_section_and_an_exact_resume(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["mode"] == "dry-run" and report["ok"] and report["failed"] == []
    assert list(steps) == ["env", "data", "train_qwen2", "train_sb7b", "resume_sb7b", "throughput", "ops_bench",
                           "pytest_cuda"]
    for name in ("pytest_cuda", "ops_bench"):  # GPU-only: skipped, and saying why
        assert steps[name]["status"] == "skipped" and steps[name]["reason"] == "needs a GPU"
    for name in ("env", "data", "train_sb7b", "resume_sb7b", "train_qwen2", "throughput"):
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["wall_s"] >= 0

    env = steps["env"]["result"]
    assert env["platform"] == "cpu" and env["process_group_backend"] == "gloo"
    assert env["op_backends"]["gla"]["backend"] == "chunked"

    for name in ("train_sb7b", "train_qwen2"):
        run = steps[name]["result"]
        assert run["process_group"] == {"initialized_by": "gpu_check (world size 1)", "backend": "gloo", "world": 1}
        assert run["all_reduce_calls"].get("cpu", 0) > 0  # the trainer's collectives went through the group
        assert run["summary"]["step"] == 6
        assert (out / run["kept"] / "metrics.jsonl").is_file() and (out / run["kept"] / "train.log").is_file()
    assert steps["train_sb7b"]["result"]["checkpoint_saves"] == [3]  # the middle step only, not the end
    assert steps["train_sb7b"]["result"]["op_backends"]["gla@cpu"] == "chunked"

    resume = steps["resume_sb7b"]["result"]
    assert resume["resumed_from"].endswith("step_00000003")
    assert resume["compared_steps"] == [4, 6] and resume["steps_found"] == 3
    assert resume["bit_exact"] and resume["max_rel_diff"] == 0.0
    assert resume["uninterrupted"] == resume["resumed"]

    tp = steps["throughput"]["result"]
    for model in ("sb7b", "qwen2"):
        x = tp[model]
        assert x["tokens_per_s"] > 0 and x["tflops_per_device"] > 0 and x["memory_gb_peak"] > 0
        assert x["steps_used"] == [3, 6]  # steps 1-2 are warm-up
        assert x["mfu"] is None and x["pct_of_measured_matmul"] > 0  # a CPU matmul is no hardware peak
    assert tp["tokens_per_s_ratio_sb7b_over_qwen2"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "**PASS**" in md and "% of a measured CPU matmul" in md
    assert "MFU" not in md, "the CPU figure must not be called MFU"
    assert not (out / "scratch").exists()  # runs and checkpoints are removed
