"""ops.grouped_mm: every backend, the ``reference`` included, vs a float64 oracle written out
here (a loop of ``torch.mm`` per expert with the gradients in closed form); what
torch_grouped_mm declines."""

from __future__ import annotations

import pytest
import torch

from operators import ops
from tests.operators.conformance import assert_close, devices, platform_for, poisoned_allocations, tolerances

E, DIN, DOUT = 4, 16, 24  # multiples of 8: torch._grouped_mm wants 16-byte strides in bf16 too


def make_case(n_per_expert, dtype, tail=0, device="cpu"):
    """Tokens sorted by expert; ``tail`` extra rows past offs[-1] that belong to nobody."""
    n = sum(n_per_expert) + tail
    x = torch.randn(n, DIN).to(device, dtype).requires_grad_()
    w = (torch.randn(E, DIN, DOUT) / DIN**0.5).to(device, dtype).requires_grad_()
    offs = torch.tensor(n_per_expert).cumsum(0).to(device, torch.int32)
    return x, w, offs


def oracle(x, w, offs, grad):
    """``(out, grad x, grad w)`` in float64 on the CPU, independent of ``ops.grouped_mm.reference``
    (which is itself a backend under test): expert ``e`` owns rows ``offs[e-1]:offs[e]``, so
    ``out = x_e @ w_e``, ``grad x_e = grad_e @ w_e^T``, ``grad w_e = x_e^T @ grad_e``; rows past
    ``offs[-1]`` and experts without rows get zeros."""
    x, w, grad = (t.detach().double().cpu() for t in (x, w, grad))
    out, gx, gw = x.new_zeros(x.shape[0], w.shape[2]), torch.zeros_like(x), torch.zeros_like(w)
    start = 0
    for e, end in enumerate(int(o) for o in offs.cpu()):
        rows = slice(start, end)
        out[rows] = torch.mm(x[rows], w[e])
        gx[rows] = torch.mm(grad[rows], w[e].t())
        gw[e] = torch.mm(x[rows].t(), grad[rows])
        start = end
    return out, gx, gw


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "counts,tail",
    [((5, 0, 9, 3), 0), ((0, 7, 0, 4), 3), ((6, 6, 6, 6), 5)],
    ids=["expert1-empty", "empty-experts-and-tail", "even-with-tail"],
)
@pytest.mark.parametrize("backend", sorted(ops.grouped_mm.backends))
def test_backends_match_float64_oracle(device, dtype, counts, tail, backend):
    if backend not in ops.grouped_mm.available_backends(platform_for(device)):
        pytest.skip(f"backend {backend} is not available on {platform_for(device)}")
    x, w, offs = make_case(counts, dtype, tail, device)
    grad = torch.randn(x.shape[0], DOUT).to(device, dtype)
    with poisoned_allocations():
        out = ops.grouped_mm.call_backend(backend, x, w, offs)
        gx, gw = torch.autograd.grad(out, (x, w), grad)
    want, want_gx, want_gw = oracle(x, w, offs, grad)
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
    _, want_gx, want_gw = oracle(x, w, offs, torch.ones(x.shape[0], DOUT))
    assert_close(x.grad, want_gx, **tolerances(torch.float32), name="grad x")
    assert_close(w.grad, want_gw, **tolerances(torch.float32), name="grad w")


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
