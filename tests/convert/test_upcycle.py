"""What MoE upcycling rests on (docs/DESIGN_NOTES.md §4), on sbtrain's own MoE module in float64.

Setting: softmax router WITHOUT top-k renormalisation, router weights 0 (uniform p = 1/N),
k of N routed experts plus S shared ones, each a scaled copy of the dense FFN F. The MoE
output is then ``(S + k/N) * F_s``.

- exact (up, down times c^(1/2), c = 1/(S + k/N)): F_s = c F, so the MoE reproduces F.
- report (all three times alpha = (S + k/N)^(-1/3)): with z = gate x, h = silu(z) * (up x),
  the MoE gives ``alpha^-1 down(silu(alpha z) * up x) = down(r * h)``, r = sigmoid(alpha z) / sigmoid(z)
  (since silu(alpha z) / alpha = z sigmoid(alpha z)). Hence the error
  ``|y_moe - y| = |down((r - 1) * h)| <= ||down||_2 * max|r - 1| * |h|`` per token: the bound the
  test asserts, next to the identity itself, and the measured relative error it prints.
"""

from __future__ import annotations

import pytest
import torch

from sbtrain.config.model import MoEConfig
from sbtrain.convert.upcycle import upcycle_factors, upcycle_moe_state
from sbtrain.models.ffn.moe import MoE
from sbtrain.models.layers import MLP

D, I = 16, 24  # hidden and intermediate width


def dense_and_moe(N, k, S, router_std=0.0, norm_topk_prob=False, scale="exact"):
    torch.manual_seed(0)
    dense = MLP(D, I).double()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cfg = MoEConfig(num_experts=N, top_k=k, num_shared_experts=S, norm_topk_prob=norm_topk_prob,
                    router_activation="softmax", aux_loss_coef=0.0)
    moe = MoE(D, I, cfg).double().eval()
    router = torch.randn(N, D, dtype=torch.float64) * router_std
    state = upcycle_moe_state(dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight, cfg, scale, router)
    moe.load_state_dict(state, strict=True)
    return dense, moe


def relative_error(moe, dense, x) -> float:
    with torch.no_grad():
        y = dense(x)
        return ((moe(x)[0] - y).norm() / y.norm()).item()


@pytest.mark.parametrize("N, k, S", [(16, 1, 1), (4, 2, 1), (8, 1, 0), (4, 4, 2)])
def test_exact_scale_reproduces_the_dense_ffn_at_uniform_routing(N, k, S):
    dense, moe = dense_and_moe(N, k, S, scale="exact")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    assert relative_error(moe, dense, x) < 1e-12
    # Near-uniform (a fresh router, std 1e-3): close, and the error is the router's, not the scale's.
    dense, moe = dense_and_moe(N, k, S, router_std=1e-3, scale="exact")
    err = relative_error(moe, dense, x)
    print(f"exact, N={N} k={k} S={S}, router std 1e-3: relative error {err:.2e}")
    assert err < 1e-2


def test_exact_scale_needs_no_renormalisation():
    """The test can fail: with top-k renormalisation the weights sum to 1, not k/N."""
    dense, moe = dense_and_moe(16, 1, 1, norm_topk_prob=True, scale="exact")
    assert relative_error(moe, dense, torch.randn(2, 7, D, dtype=torch.float64)) > 0.1


@pytest.mark.parametrize("N, k, S", [(16, 1, 1), (4, 1, 1), (8, 1, 0)])
def test_report_scale_error_is_the_silu_ratio(N, k, S):
    dense, moe = dense_and_moe(N, k, S, scale="report")
    alpha = upcycle_factors("report", N, k, S)["alpha"]
    x = torch.randn(64, D, dtype=torch.float64)
    with torch.no_grad():
        z, u = dense.gate_proj(x), dense.up_proj(x)
        h = torch.nn.functional.silu(z) * u
        ratio = torch.sigmoid(alpha * z) / torch.sigmoid(z)
        y, y_moe = dense(x), moe(x)[0]
        torch.testing.assert_close(y_moe, dense.down_proj(ratio * h), rtol=1e-10, atol=1e-12)  # the identity
        bound = torch.linalg.matrix_norm(dense.down_proj.weight, 2) * (ratio - 1).abs().max() * h.norm(dim=-1)
        assert ((y_moe - y).norm(dim=-1) <= bound + 1e-12).all()
    err = ((y_moe - y).norm() / y.norm()).item()
    print(f"report rule alpha={alpha:.4f} (N={N} k={k} S={S}): relative error {err:.3e}, "
          f"max |r-1| = {(ratio - 1).abs().max().item():.3e}")
    assert err > 1e-6  # not exact: SiLU is not homogeneous
    if (N, k, S) == (16, 1, 1):  # the report's setting, alpha = 0.98: a few percent at most
        assert err < 0.05
