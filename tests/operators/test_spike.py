"""The spiking neuron op: hand examples of V_th / counts / output, a formula check on random
tokens, straight-through gradient (identity), all-zero tokens, clamp, dtypes, registration."""

from __future__ import annotations

import pytest
import torch

from operators.registry import OPS
from operators.spike import spike, spike_reference


def formula(x: torch.Tensor, k: float) -> torch.Tensor:
    """docs/DESIGN_NOTES.md §5 written out independently in float64: V_th * round(x / V_th) per token."""
    x = x.double()
    v_th = x.abs().mean(-1, keepdim=True) / k
    return v_th * torch.round(x / v_th)


def test_hand_example_k3():
    x = torch.tensor([[3.0, -3.0, 0.0, 6.0]], dtype=torch.float64)  # mean|x| = 3, V_th = 1
    out, counts = spike(x, 3.0, return_counts=True)
    assert counts.dtype == torch.int32
    assert counts.tolist() == [[3, -3, 0, 6]]
    assert out.tolist() == [[3.0, -3.0, 0.0, 6.0]]


def test_hand_example_k2_rounds():
    x = torch.tensor([1.0, 2.0, -0.4, 0.6], dtype=torch.float64)  # mean|x| = 1, V_th = 0.5
    out, counts = spike(x, 2.0, return_counts=True)
    assert counts.tolist() == [2, 4, -1, 1]  # x / V_th = [2, 4, -0.8, 1.2]
    assert out.tolist() == [1.0, 2.0, -0.5, 0.5]


def test_threshold_is_per_token_over_the_last_dim():
    x = torch.tensor([[[3.0, -3.0, 0.0, 6.0], [30.0, -30.0, 0.0, 60.0]]])  # second token: V_th = 10
    _, counts = spike(x, 3.0, return_counts=True)
    assert counts.tolist() == [[[3, -3, 0, 6], [3, -3, 0, 6]]]


def test_matches_formula_on_random_tokens():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for k in (1.0, 2.5, 3.0, 4.0):
        out = spike(x, k)
        assert torch.allclose(out, formula(x, k), rtol=0, atol=1e-12)


def test_straight_through_gradient_is_identity():
    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(x)
    (spike(x, 3.0) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)  # no d V_th / dx term: V_th is detached


def test_all_zero_token_is_safe():
    x = torch.randn(3, 8, dtype=torch.float64)
    x[1] = 0.0
    x.requires_grad_(True)
    out, counts = spike(x, 3.0, return_counts=True)
    assert torch.isfinite(out).all()
    assert counts[1].abs().sum() == 0 and out[1].abs().sum() == 0
    assert torch.equal(out[0], formula(x[0].detach(), 3.0))  # the other tokens are unaffected
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_clamp_limits_counts_and_keeps_identity_gradient():
    x = torch.tensor([3.0, -3.0, 0.0, 6.0], dtype=torch.float64, requires_grad=True)
    out, counts = spike(x, 3.0, max_count=2, return_counts=True)
    assert counts.tolist() == [2, -2, 0, 2]
    assert out.tolist() == [2.0, -2.0, 0.0, 2.0]
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_large_k_approaches_identity():
    x = torch.randn(4, 32, dtype=torch.float64)
    out = spike(x, 1000.0)
    v_th = x.abs().mean(-1, keepdim=True) / 1000.0
    assert ((out - x).abs() <= v_th / 2 + 1e-15).all()


def test_bf16_counts_are_computed_in_fp32():
    x = (torch.randn(2, 64) * 10).to(torch.bfloat16)
    out, counts = spike(x, 1000.0, return_counts=True)  # counts in the thousands: not exact in bf16
    ref_out, ref_counts = spike(x.float(), 1000.0, return_counts=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(counts, ref_counts)
    assert torch.equal(out, ref_out.to(torch.bfloat16))


@pytest.mark.parametrize("kwargs, message", [({"k": 0.0}, "k=0.0 must be positive"),
                                             ({"max_count": 0}, "max_count=0 must be >= 1")])
def test_bad_arguments_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spike(torch.ones(4), **kwargs)


def test_registered_as_an_op():
    assert OPS["spike"] is spike
    assert spike.reference is spike_reference
    assert spike.select(torch.ones(4)).name == "reference"
