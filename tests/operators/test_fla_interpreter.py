"""The ``fla`` / ``fla_maca`` backends on the CPU, through Triton's interpreter.

fla's kernels are Triton; ``TRITON_INTERPRET=1`` runs them in NumPy on CPU tensors, so CI
checks our wrappers around them (GQA expansion, per-KV-head state, scalar gates, varlen,
initial and final state, the MetaX tuning filter) against the float64 references of
``operators/gla/reference.py``, forward and backward, with no GPU.

The variable must be set before fla is imported (that is when ``triton.jit`` decides to
interpret), and it would change which backend every other test module gets. So the cases run
in one subprocess (this file with ``--worker``) that sets it before importing anything, and
reports each case's relative errors as JSON; the tests here only compare those errors with
the bounds. The conformance suite (``tests/operators/test_gla.py``) is run the same way,
restricted to the fla backends. Error measure per tensor: relative RMS ``||a - b|| / ||b||``
(as fla's own tests), in float64, against the reference run on the same rounded inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
MISSING = [name for name in ("triton", "fla") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not installed (pip install '.[dev]')")

# name: (op, B, T, Hq, Hkv, Dk, Dv, gate, initial state, cu_seqlens, platform); gla_step uses T=1.
CASES = {
    "gqa_dim_gate": ("gla", 2, 50, 4, 2, 16, 32, "dim", True, None, "cpu"),
    "scalar_gate_gqa": ("gla", 1, 40, 2, 1, 16, 16, "scalar", True, None, "cpu"),
    "no_initial_state": ("gla", 1, 33, 2, 2, 32, 16, "dim", False, None, "cpu"),
    # documents of length 1 and 26, a boundary exactly on fla's chunk edge (64), an empty one
    "varlen": ("gla", 1, 70, 4, 2, 16, 16, "dim", True, [0, 5, 6, 32, 32, 64, 70], "cpu"),
    "varlen_scalar_noinit": ("gla", 1, 45, 2, 1, 16, 16, "scalar", False, [0, 17, 45], "cpu"),
    "step_gqa_dim_gate": ("gla_step", 2, 1, 4, 2, 16, 32, "dim", True, None, "cpu"),
    "step_scalar_gate": ("gla_step", 2, 1, 2, 1, 16, 16, "scalar", True, None, "cpu"),
    # SBTRAIN_PLATFORM=maca: the MetaX walk picks fla_maca (not forced) and filters fla's configs
    "maca_gqa_varlen": ("gla", 1, 40, 4, 2, 16, 16, "dim", True, [0, 11, 40], "maca"),
    "maca_step": ("gla_step", 2, 1, 4, 2, 16, 16, "dim", True, None, "maca"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BF16_REASON = "bf16 tl.dot is computed wrongly by the Triton interpreter (a Triton limitation), not by fla"

# Relative RMS error bounds per op, dtype and tensor ("*": every other tensor), about 4x the
# largest error measured over the cases (fla-core 0.6.0; the same on triton 3.7.1 and 3.9.0).
# fp16 is dominated by rounding the outputs and gradients to fp16 (~2.8e-4 RMS by itself);
# gla_step's state stays fp32 (fp32 math on fp16 inputs), so its bound is fp32-tight.
BOUNDS = {
    ("gla", "fp32"): {"*": 2e-6},  # measured max 4.5e-7 (dg); o/state/dq/dk/dv/ds0 <= 3.1e-7
    ("gla", "fp16"): {"*": 2.5e-3},  # measured max 5.4e-4 (dg, varlen scalar gate); others <= 3.9e-4
    ("gla_step", "fp32"): {"*": 3e-6},  # measured max 7.6e-7 (dg, scalar gate); others <= 1.1e-7
    # measured max 6.8e-4 (dg, scalar gate); final state 3.2e-8, ds0 7.4e-5
    ("gla_step", "fp16"): {"*": 2.5e-3, "final_state": 1.5e-7, "ds0": 3e-4},
}


# --- the worker: runs under TRITON_INTERPRET=1 in its own process ----------------------------


def _inputs(case, dtype, gen):
    op, B, T, Hq, Hkv, Dk, Dv, gate, init, cu, _ = CASES[case]
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    lead = (B,) if op == "gla_step" else (B, T)
    leaves = {"q": rnd(*lead, Hq, Dk), "k": rnd(*lead, Hkv, Dk), "v": rnd(*lead, Hkv, Dv)}
    gate_shape = (*lead, Hkv, Dk) if gate == "dim" else (*lead, Hkv)
    leaves["g"] = F.logsigmoid(rnd(*gate_shape) + 2) / 2  # per-step decays mostly 0.5-1: the state matters over T
    n = len(cu) - 1 if cu else B
    if init:
        leaves["s0"] = rnd(n, Hkv, Dk, Dv) / 4
    # inputs in dtype, states in fp32 (the op's contract); the reference sees the same rounded values
    leaves = {k: t.to(torch.float32 if k == "s0" else dtype).requires_grad_() for k, t in leaves.items()}
    return leaves, None if cu is None else torch.tensor(cu, dtype=torch.int32)


def _arguments(op_name, leaves, cu):
    """``(args, kwargs)`` of the op call (gla_step: the state is the initial state)."""
    q, k, v, g, s0 = (leaves.get(n) for n in ("q", "k", "v", "g", "s0"))
    if op_name == "gla_step":
        return (q, k, v, g, s0), {}
    return (q, k, v, g), {"initial_state": s0, "output_final_state": True, "cu_seqlens": cu}


def _rel(a, b) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))  # no broadcasting past a wrong shape
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(case, dtype):
    """``{"backend", "errors": {tensor: relative error}, "seconds"}`` of one case in this process."""
    from operators import ops
    from operators.platform import detect_platform

    op_name, platform = CASES[case][0], CASES[case][-1]
    os.environ["SBTRAIN_PLATFORM"] = platform
    detect_platform.cache_clear()
    op = getattr(ops, op_name)
    if platform == "cpu":
        os.environ["SBTRAIN_OPS"] = f"{op_name}:fla"  # forced: an error, not a fallback, if fla declines
    else:
        os.environ.pop("SBTRAIN_OPS", None)  # the MetaX walk must pick fla_maca by itself
    gen = torch.Generator().manual_seed(0)
    leaves, cu = _inputs(case, dtype, gen)
    args, kwargs = _arguments(op_name, leaves, cu)
    start = time.perf_counter()
    backend = op.select(*args, **kwargs).name
    o, state = op(*args, **kwargs)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)  # a distinct gradient per element
    ws = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * wo).sum() + (state.double() * ws).sum(), list(leaves.values()))
    seconds = time.perf_counter() - start
    leaves64 = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    args64, kwargs64 = _arguments(op_name, leaves64, cu)
    o64, state64 = op.reference(*args64, **kwargs64)  # float64 in, float64 math (operators/gla/reference.py)
    grads64 = torch.autograd.grad((o64 * wo).sum() + (state64 * ws).sum(), list(leaves64.values()))
    assert o.dtype == dtype and state.dtype == torch.float32, (o.dtype, state.dtype)
    errors = {"o": _rel(o, o64), "final_state": _rel(state, state64)}
    errors.update({f"d{name}": _rel(g, g64) for name, g, g64 in zip(leaves, grads, grads64)})
    return {"backend": backend, "errors": errors, "seconds": round(seconds, 2)}


def worker() -> dict:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 set before Python starts (the tests do)")
    from operators import maca, ops, triton_interpreter

    out = {"cases": {}}
    for case in CASES:
        for dtype_id, dtype in DTYPES.items():
            try:
                out["cases"][f"{case}-{dtype_id}"] = run_case(case, dtype)
            except Exception:  # noqa: BLE001 - reported per case by the test that reads it
                out["cases"][f"{case}-{dtype_id}"] = {"error": traceback.format_exc()}
    from triton.runtime import autotuner

    prune = autotuner.Autotuner.prune_configs
    triton_interpreter.install_shims()  # a second install must not wrap the autotuner again
    out["shims_idempotent"] = autotuner.Autotuner.prune_configs is prune and triton_interpreter.shims_installed()
    out["maca_tuned_ops"] = sorted(maca._applied)
    q = torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16)
    out["bf16_decline"] = ops.gla.backends["fla"].accepts(q, q, q, q)
    return out


# --- the tests: run the worker once, compare ------------------------------------------------


def _interpreter_env() -> dict:
    # No visible GPU: on a GPU CI box fla would otherwise pick its cuda path for the same calls.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", SBTRAIN_PLATFORM="cpu")
    env.pop("SBTRAIN_OPS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def measured():
    proc = subprocess.run([sys.executable, "-m", "tests.operators.test_fla_interpreter", "--worker"], cwd=ROOT,
                          env=_interpreter_env(), capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("dtype_id", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fla_matches_float64_reference(measured, case, dtype_id):
    if dtype_id == "bf16":
        assert "bf16" in measured["bf16_decline"]  # declined by the backend, not just skipped here
        pytest.skip(BF16_REASON)
    result = measured["cases"][f"{case}-{dtype_id}"]
    assert "error" not in result, result.get("error")
    op_name, platform = CASES[case][0], CASES[case][-1]
    assert result["backend"] == ("fla" if platform == "cpu" else "fla_maca")
    bounds = BOUNDS[(op_name, dtype_id)]
    errors = result["errors"]
    expected = {"o", "final_state", "dq", "dk", "dv", "dg"} | ({"ds0"} if CASES[case][8] else set())
    assert set(errors) == expected
    over = {n: (e, bounds.get(n, bounds["*"])) for n, e in errors.items() if not e <= bounds.get(n, bounds["*"])}
    assert not over, f"{case} {dtype_id}: relative errors over their bounds (error, bound): {over}; all: {errors}"


def test_shims_are_idempotent_and_maca_tuning_applied(measured):
    assert measured["shims_idempotent"]
    assert measured["maca_tuned_ops"] == ["gla", "gla_step"]


def test_conformance_suite_runs_fla_under_interpreter():
    """``test_gla.py``'s conformance cases (poisoned allocations, its own bounds) for the fla
    backends, in an interpreter process whose platform is maca so that both ``fla_maca`` and
    ``fla`` take CPU calls. They take the head-dim >= 16 cases in fp32; bf16 and the head dims
    under 16 are declined there and skip."""
    env = dict(_interpreter_env(), SBTRAIN_PLATFORM="maca")
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/operators/test_gla.py",
               "-k", "test_gla_matches_float64_oracle and cpu and fla"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    passed = re.findall(r"\[[^\]]*-(fla|fla_maca)-cpu\] PASSED", proc.stdout)
    assert passed.count("fla") >= 2 and passed.count("fla_maca") >= 2, f"too few fla cases ran: {passed}"


def test_without_interpreter_nothing_changes():
    """This process has no TRITON_INTERPRET: fla stays CUDA-only and declines CPU tensors."""
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    from operators import ops

    assert ops.gla.backends["fla"].platforms == ("cuda",) and ops.gla.backends["fla_maca"].platforms == ("maca",)
    q = torch.zeros(1, 4, 2, 16)
    assert "CUDA tensors only" in ops.gla.backends["fla"].accepts(q, q, q, q)
    assert ops.gla.select(q, q, q, q).name == "chunked"


def test_interpreter_enabled_needs_the_variable(monkeypatch):
    from operators.triton_interpreter import interpreter_enabled

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreter_enabled()  # triton is installed (else the module skips)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(worker()))
