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


def tolerances(dtype: torch.dtype) -> dict:
    return {
        torch.float64: {"atol": 1e-9, "rtol": 1e-7},
        torch.float32: {"atol": 2e-4, "rtol": 2e-4},
        torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
        torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    }[dtype]
