"""ops.linear_cross_entropy: every backend vs a float64 oracle; chunked-only behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from operators import ops
from operators.chunked_cross_entropy import linear_cross_entropy_chunked
from tests.operators.conformance import assert_close, devices, platform_for, poisoned_allocations, to64, tolerances

IGNORE = -100
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def oracle(hidden, weight, labels, ignore_index=IGNORE):
    """The reference's formula, in float64 (the reference itself computes in fp32)."""
    h64, w64 = to64(hidden, weight)
    loss = F.cross_entropy(h64 @ w64.t(), labels.cpu(), ignore_index=ignore_index, reduction="sum")
    return loss, *torch.autograd.grad(loss, (h64, w64))


def make_case(n, d, v, dtype, ignore_every=4, device="cpu"):
    hidden = (torch.randn(n, d) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, d) * 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,)).to(device)
    labels[::ignore_every] = IGNORE
    return hidden, weight, labels


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_backends_match_float64_oracle(device, dtype, chunk_size):
    for backend in ops.linear_cross_entropy.available_backends(platform_for(device)):
        _check_backend(backend, device, dtype, chunk_size)


def _check_backend(backend, device, dtype, chunk_size):
    n, d, v = 45, 24, 37  # n not a multiple of 7; 64 > n (a single chunk)
    hidden, weight, labels = make_case(n, d, v, dtype, device=device)
    with poisoned_allocations():
        loss = ops.linear_cross_entropy.call_backend(backend, hidden, weight, labels, chunk_size=chunk_size)
        gh, gw = torch.autograd.grad(loss * 0.37, (hidden, weight))  # a non-unit upstream gradient
    want_loss, want_gh, want_gw = oracle(hidden, weight, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gh.dtype == dtype and gw.dtype == dtype
    # The inputs are exact in float64, and the loss is computed in fp32 whatever their dtype.
    assert_close(loss, want_loss, **tolerances(torch.float32), name=f"{backend} loss")
    assert_close(gh, want_gh * 0.37, **tolerances(dtype), name=f"{backend} grad hidden")
    assert_close(gw, want_gw * 0.37, **tolerances(dtype), name=f"{backend} grad weight")
    # Ignored tokens get exactly zero gradient.
    assert torch.count_nonzero(gh[labels == IGNORE]) == 0


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, weight, labels = make_case(20, 8, 12, torch.float32)
    weight.requires_grad_(False)
    loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=6)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    _, want_gh, _ = oracle(hidden, weight.requires_grad_(), labels)
    assert_close(gh, want_gh, **tolerances(torch.float32), name="grad hidden with a frozen head")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk_size", [8, 64])
@pytest.mark.parametrize("with_grad", [True, False])
def test_autocast_reads_bf16_operands_and_accumulates_in_fp32(chunk_size, with_grad):
    """Under bf16 autocast the head's matmuls take bf16 inputs; everything after them is fp32.
    So the loss equals a float64 reference on the bf16-ROUNDED hidden and head (to fp32
    accumulation error), and differs from the unrounded fp32 loss by the rounding. Gradients
    additionally round ``softmax - onehot`` to bf16 before their GEMMs: relative RMS <= 2e-3
    (bf16's unit roundoff is 3.9e-3)."""
    hidden, weight, labels = make_case(37, 24, 101, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(with_grad):
        loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=chunk_size)
    assert loss.dtype == torch.float32
    rounded_loss, rounded_gh, rounded_gw = oracle(hidden.bfloat16().float(), weight.bfloat16().float(), labels)
    fp32_loss, _, _ = oracle(hidden, weight, labels)
    assert abs(loss.item() - rounded_loss.item()) <= 1e-6 * abs(rounded_loss.item())
    assert abs(fp32_loss.item() - rounded_loss.item()) > 10 * abs(loss.item() - rounded_loss.item()), \
        "the operands were not rounded to bf16: autocast is not reaching the head's matmuls"
    if with_grad:
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
        assert _rel(gh, rounded_gh) <= 2e-3, _rel(gh, rounded_gh)
        assert _rel(gw, rounded_gw) <= 2e-3, _rel(gw, rounded_gw)


def test_without_autocast_the_head_stays_fp32():
    hidden, weight, labels = make_case(30, 16, 40, torch.float32)
    loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=8)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    want_loss, want_gh, want_gw = oracle(hidden, weight, labels)
    assert_close(loss, want_loss, **tolerances(torch.float32), name="fp32 loss")
    assert_close(gh, want_gh, **tolerances(torch.float32), name="fp32 grad hidden")
    assert_close(gw, want_gw, **tolerances(torch.float32), name="fp32 grad weight")


def test_all_tokens_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels = make_case(10, 8, 12, torch.float32)
    labels[:] = -1
    loss = linear_cross_entropy_chunked(hidden, weight, labels, ignore_index=-1, chunk_size=3)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_default_dispatch_on_cpu_is_chunked():
    hidden, weight, labels = make_case(4, 8, 12, torch.float32)
    assert ops.linear_cross_entropy.select(hidden, weight, labels).name == "chunked"


@pytest.mark.parametrize("bad", [12, 999, -5])
def test_out_of_range_label_is_an_error_naming_it(bad):
    hidden, weight, labels = make_case(10, 8, 12, torch.float32)
    labels[6] = bad
    with pytest.raises(ValueError, match=rf"label {bad} at token 6 is out of range.*vocabulary size is 12"):
        linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=4)


def test_bad_arguments_are_named():
    hidden, weight, labels = make_case(10, 8, 12, torch.float32)
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"do not fit"):
        linear_cross_entropy_chunked(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match=r"must be \[N, d\]"):
        linear_cross_entropy_chunked(hidden[None], weight, labels)


# Runs in a fresh interpreter so that ru_maxrss (a high-water mark) starts near the inputs' size.
_MEMORY_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from operators.chunked_cross_entropy import linear_cross_entropy_chunked
torch.set_num_threads(1)
n, v, d, chunk = (int(a) for a in sys.argv[2:6])
hidden = torch.randn(n, d, requires_grad=True)
weight = torch.randn(v, d, requires_grad=True)
labels = torch.randint(0, v, (n,))
labels[::5] = -100
# Warm up allocator and kernels on a tiny problem, then measure the big one.
linear_cross_entropy_chunked(hidden[:8], weight[:64], labels[:8] % 64, chunk_size=4).backward()
hidden.grad = weight.grad = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=chunk)
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all())
print(json.dumps({"peak_mib": (after - before) / 1024, "finite": finite, "loss_per_token": loss.item() / n}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB only on Linux")
def test_peak_memory_is_bounded_by_the_chunk_not_the_logits():
    # Full fp32 logits would be n*v*4 = 256 MiB; a chunk of 64 tokens is 8 MiB. (Measured here:
    # chunk=64 peaks at ~19 MiB, a single chunk of all 2048 tokens at ~512 MiB.)
    n, v, d, chunk = 2048, 32768, 16, 64
    full_mib, chunk_mib = n * v * 4 / 2**20, chunk * v * 4 / 2**20
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, REPO, str(n), str(v), str(d), str(chunk)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"]
    # A few chunk-sized temporaries (logits + exp temp) are allowed; the full logits are not.
    assert result["peak_mib"] < 4 * chunk_mib, f"peak {result['peak_mib']:.0f} MiB vs full logits {full_mib:.0f} MiB"
    assert result["peak_mib"] < full_mib / 8
    # Random head, d=16: a per-token loss near log(v) + O(|logits|) shows real work was done.
    assert 5.0 < result["loss_per_token"] < 60.0


def test_fp32_output_gemm_path_keeps_fp32_accumulators(monkeypatch):
    """The CUDA path (bf16 operands kept as bf16, mm(..., out_dtype=float32)) emulated on the CPU:
    the same numbers as the widening path, and the [V, d] weight-gradient accumulator stays fp32."""
    import operators.chunked_cross_entropy as cce

    hidden, weight, labels = make_case(37, 24, 101, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        widened = linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=8)
    want = torch.autograd.grad(widened, (hidden, weight))
    monkeypatch.setitem(cce._OUT_DTYPE_MM, "cpu", True)
    monkeypatch.setattr(cce, "_mm", lambda a, b: a @ b if a.dtype == torch.float32 else a.float() @ b.float())
    for chunk_size in (8, 64):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_size=chunk_size)
        got = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == pytest.approx(widened.item(), rel=1e-6)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32 and _rel(g, w) <= 1e-6
