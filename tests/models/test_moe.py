"""MoE dispatch against an independent per-token loop; aux-loss-free bias; capacity dropping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sbtrain.config.model import MoEConfig
from sbtrain.models.ffn.moe import MoE, Router

D, FFN = 16, 24


def make_moe(**kw) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 1, "num_shared_experts": 1, **kw})
    moe = MoE(D, FFN, cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def loop_reference(moe: MoE, x: torch.Tensor, capacity=None):
    """Token by token over its chosen experts, computed from the config alone (float64)."""
    cfg, flat = moe.cfg, x.reshape(-1, D)
    logits = flat.float() @ moe.router.weight.float().t()  # the router runs in fp32 by design
    scores = logits.softmax(-1) if cfg.router_activation == "softmax" else torch.sigmoid(logits)
    chosen = (scores + moe.router.expert_bias.double()).topk(cfg.top_k, -1).indices
    out = torch.zeros_like(flat)
    used = [0] * cfg.num_experts
    dropped = 0
    for a in range(flat.shape[0] * cfg.top_k):  # assignments in token order (capacity is first come)
        t, j = divmod(a, cfg.top_k)
        e = int(chosen[t, j])
        w = scores[t, chosen[t]]
        w = (w / w.sum() if cfg.norm_topk_prob else w).double()
        if capacity is not None and used[e] >= capacity:
            dropped += 1
            continue
        used[e] += 1
        ex = moe.experts
        h = F.silu(flat[t] @ ex.gate_proj[e]) * (flat[t] @ ex.up_proj[e])
        out[t] += w[j] * (h @ ex.down_proj[e])
    sh = moe.shared_expert
    out += sh.down_proj(F.silu(sh.gate_proj(flat)) * sh.up_proj(flat))
    return out.view_as(x), chosen, dropped


@pytest.mark.parametrize("kw", [{}, {"top_k": 2, "norm_topk_prob": True}, {"router_activation": "sigmoid", "top_k": 2}])
def test_dropless_dispatch_equals_per_token_loop(kw):
    moe = make_moe(**kw)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y, _ = moe(x)
    ref, chosen, _ = loop_reference(moe, x)
    torch.testing.assert_close(y, ref)
    assert moe.last_dropped == 0
    assert torch.equal(moe.last_tokens_per_expert, torch.bincount(chosen.flatten(), minlength=4))


def test_balance_and_z_loss_match_their_formulas():
    moe = make_moe(aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(20, D, dtype=torch.float64)
    _, aux = moe(x.unsqueeze(0))
    logits = x @ moe.router.weight.t()
    probs = logits.softmax(-1)
    share = F.one_hot(probs.argmax(-1), 4).double().mean(0)
    expected = 0.1 * 4 * (share * probs.mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(aux.double(), expected)


def test_aux_free_bias_changes_selection_not_weights():
    moe = make_moe(aux_free_balancing=True)
    x = torch.randn(1, 12, D, dtype=torch.float64)
    before = moe.router(x.reshape(-1, D))
    moe.router.expert_bias[2] = 10.0  # every token now selects expert 2
    after = moe.router(x.reshape(-1, D))
    assert (after.expert_ids == 2).all() and not (before.expert_ids == 2).all()
    scores = (x.reshape(-1, D) @ moe.router.weight.t()).softmax(-1)
    torch.testing.assert_close(after.weights[:, 0], scores[:, 2].to(after.weights.dtype))  # unbiased score
    y, _ = moe(x)
    torch.testing.assert_close(y, loop_reference(moe, x)[0])
    # The update rule lowers the bias of the overloaded expert and raises the others.
    bias = moe.router.expert_bias.clone()
    moe.update_expert_bias()
    step = moe.router.expert_bias - bias
    assert step[2] < 0 and (step[[0, 1, 3]] > 0).all()


def test_capacity_factor_drops_and_counts():
    moe = make_moe(capacity_factor=0.5)
    torch.nn.init.normal_(moe.router.weight, std=0.01)
    moe.router.weight.data[1] += 1.0  # skew routing so that some expert overflows
    x = torch.randn(1, 16, D, dtype=torch.float64).abs()
    capacity = math.ceil(0.5 * 16 * 1 / 4)
    y, _ = moe(x)
    ref, _, dropped = loop_reference(moe, x, capacity=capacity)
    assert dropped > 0 and moe.last_dropped == dropped
    torch.testing.assert_close(y, ref)


def test_router_logits_are_fp32_under_autocast():
    """bf16 autocast around the model must not reach the router's matmul (issue 18)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, num_shared_experts=0, aux_loss_coef=0.01, z_loss_coef=0.001)
    router = Router(64, cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(200, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    ref = router(x)  # no autocast: the fp32 reference
    assert routing.weights.dtype == torch.float32
    assert torch.equal(routing.expert_ids, ref.expert_ids)
    assert torch.equal(routing.weights, ref.weights)
    assert torch.equal(routing.aux_loss, ref.aux_loss)
    # The check can fail: weights from bf16 logits differ from the fp32 ones.
    bf16_weights = (x.bfloat16() @ router.weight.bfloat16().t()).float().softmax(-1).gather(-1, ref.expert_ids)
    assert not torch.equal(bf16_weights, ref.weights)
