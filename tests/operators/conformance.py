"""Helpers of the conformance suite: poisoned allocations, float64 oracles, devices."""

from __future__ import annotations

import contextlib

import pytest
import torch

from operators.platform import detect_platform


def devices() -> list:
    """Devices every conformance case runs on: cpu always, cuda where present."""
    out = [pytest.param("cpu", id="cpu")]
    out.append(
        pytest.param(
            "cuda",
            id="cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        )
    )
    return out


def platform_for(device: str) -> str:
    return "cpu" if device == "cpu" else detect_platform()


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


@contextlib.contextmanager
def poisoned_allocations():
    """Every ``torch.empty*`` / ``new_empty`` made from Python during the block is filled with
    NaN (or int max), so a backend that forgets to write an element produces a visible error."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*a, **k):
        return _poison(real_empty(*a, **k))

    def empty_like(*a, **k):
        return _poison(real_empty_like(*a, **k))

    def new_empty(self, *a, **k):
        return _poison(real_new_empty(self, *a, **k))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_empty_like, real_new_empty


def to64(*tensors):
    """Detached float64 CPU copies that require grad (for the oracle)."""
    return [None if t is None else t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]


def assert_close(actual, expected, *, atol, rtol, name=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten element?)"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def rel_rms_error(actual, expected) -> float:
    """``||a - b|| / ||b||`` in float64: the error of a tensor relative to its own size (the
    measure fla's tests use)."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_rel_close(actual, expected, *, rel, atol, rtol, name=""):
    """Bounds relative to the tensor's own size instead of its largest entry.

    - the bulk: relative RMS error ``||a - b|| / ||b|| <= rel``;
    - each entry: ``|a - b| <= rtol * |b| + atol * rms(b)``. ``atol`` is in units of the
      tensor's RMS, so an entry that is small against the largest must still be right to a
      small fraction of a typical entry: a sign flipped on the small entries fails here, while a
      bound scaled by the largest entry (or the RMS error alone, when those entries carry little
      of the norm) lets it through.
    """
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten element?)"
    err = (a - b).abs()
    rms = float(b.pow(2).mean().sqrt())
    relative = rel_rms_error(a, b)
    assert relative <= rel, f"{name}: relative RMS error {relative:.2e} > {rel:.1e}"
    excess = err - (rtol * b.abs() + atol * rms)
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        n = int((excess > 0).sum())
        raise AssertionError(
            f"{name}: {n} of {b.numel()} entries off by more than {rtol:.1e} * |expected| + {atol:.1e} * rms "
            f"(rms {rms:.3e}); worst at flat index {i}: {a.flatten()[i].item():.6e} vs {b.flatten()[i].item():.6e} "
            f"(error {err.flatten()[i].item():.2e} = {err.flatten()[i].item() / max(rms, 1e-300):.2e} rms)"
        )


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float64: {"atol": 1e-9, "rtol": 1e-7},
        torch.float32: {"atol": 2e-4, "rtol": 2e-4},
        torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
        torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    }[dtype]
