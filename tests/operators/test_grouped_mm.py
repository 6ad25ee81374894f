"""ops.grouped_mm: every backend vs the float64 reference; what torch_grouped_mm declines."""

from __future__ import annotations

import pytest
import torch

from operators import ops
from tests.operators.conformance import assert_close, devices, platform_for, poisoned_allocations, to64, tolerances

E, DIN, DOUT = 4, 16, 24  # multiples of 8: torch._grouped_mm wants 16-byte strides in bf16 too


def make_case(n_per_expert, dtype, tail=0, device="cpu"):
    """Tokens sorted by expert; ``tail`` extra rows past offs[-1] that belong to nobody."""
    n = sum(n_per_expert) + tail
    x = torch.randn(n, DIN).to(device, dtype).requires_grad_()
    w = (torch.randn(E, DIN, DOUT) / DIN**0.5).to(device, dtype).requires_grad_()
    offs = torch.tensor(n_per_expert).cumsum(0).to(device, torch.int32)
    return x, w, offs


def oracle(x, w, offs):
    x64, w64 = to64(x, w)
    return x64, w64, ops.grouped_mm.reference(x64, w64, offs.cpu())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "counts,tail",
    [((5, 0, 9, 3), 0), ((0, 7, 0, 4), 3), ((6, 6, 6, 6), 5)],
    ids=["expert1-empty", "empty-experts-and-tail", "even-with-tail"],
)
def test_backends_match_float64_reference(device, dtype, counts, tail):
    for backend in ops.grouped_mm.available_backends(platform_for(device)):
        _check_backend(backend, device, dtype, counts, tail)


def _check_backend(backend, device, dtype, counts, tail):
    x, w, offs = make_case(counts, dtype, tail, device)
    grad = torch.randn(x.shape[0], DOUT).to(device, dtype)
    with poisoned_allocations():
        out = ops.grouped_mm.call_backend(backend, x, w, offs)
        gx, gw = torch.autograd.grad(out, (x, w), grad)
    x64, w64, want = oracle(x, w, offs)
    want_gx, want_gw = torch.autograd.grad(want, (x64, w64), grad.double().cpu())
    tol = tolerances(dtype)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, **tol, name=f"{backend} out")
    assert_close(gx, want_gx, **tol, name=f"{backend} grad x")
    assert_close(gw, want_gw, **tol, name=f"{backend} grad w")
    # Exact zeros where the contract says so: an expert without tokens, rows past offs[-1].
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(gw[e]) == 0, f"{backend}: expert {e} got no tokens but a gradient"
    if tail:
        assert torch.count_nonzero(out[-tail:]) == 0 and torch.count_nonzero(gx[-tail:]) == 0


def test_sum_backward_through_expanded_gradient():
    # out.sum() hands backward a zero-stride gradient, which the kernel itself rejects.
    x, w, offs = make_case((3, 0, 5, 4), torch.float32)
    ops.grouped_mm(x, w, offs).sum().backward()
    x64, w64, want = oracle(x, w, offs)
    want.sum().backward()
    assert_close(x.grad, x64.grad, **tolerances(torch.float32), name="grad x")
    assert_close(w.grad, w64.grad, **tolerances(torch.float32), name="grad w")


@pytest.mark.parametrize("device", devices())
def test_dispatch_picks_torch_grouped_mm_for_supported_calls(device):
    if "torch_grouped_mm" not in ops.grouped_mm.available_backends(platform_for(device)):
        pytest.skip("torch._grouped_mm missing from this torch build / platform")
    x, w, offs = make_case((3, 0, 5, 4), torch.bfloat16, device=device)
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch_grouped_mm declines GPUs older than sm90")
    assert ops.grouped_mm.select(x, w, offs).name == "torch_grouped_mm"


def _declined_cases():
    x, w, offs = make_case((3, 0, 5, 4), torch.float32)
    n = x.shape[0]
    return {
        "float64": (x.detach().double(), w.detach().double(), offs),
        "int64 offs": (x, w, offs.long()),
        "mixed dtypes": (x, w.detach().bfloat16(), offs),
        "Dout=6 misaligned": (x, w.detach()[..., :6], offs),
        "Din=6 misaligned": (x.detach()[:, :6], w.detach()[:, :6], offs),
        "no tokens": (x.detach()[:0], w, torch.zeros(E, dtype=torch.int32)),
        "offs past N": (x, w, torch.tensor([3, 3, 8, n + 4], dtype=torch.int32)),
        "decreasing offs": (x, w, torch.tensor([5, 3, 8, n], dtype=torch.int32)),
    }


@pytest.mark.parametrize("case", list(_declined_cases()))
def test_torch_grouped_mm_declines_what_the_kernel_rejects(case):
    if "torch_grouped_mm" not in ops.grouped_mm.available_backends("cpu"):
        pytest.skip("torch._grouped_mm missing from this torch build")
    x, w, offs = _declined_cases()[case]
    reason = ops.grouped_mm.backends["torch_grouped_mm"].accepts(x, w, offs)
    assert reason, f"{case}: should be declined"
    # The dispatcher then hands the call to the reference instead of failing in the kernel.
    assert ops.grouped_mm.select(x, w, offs).name == "reference"
