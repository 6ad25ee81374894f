"""W8ASpike weight quantizer and fake-quant path (sbtrain.spike.w8a), against hand computations and
a naive per-group loop: codes/scales of a known group, groups of 128 + 72 for d_in = 200, the MSE
search never worse than absmax and its [-128, 127] clamp (with the clipped codes counted), the
scale/2 error bound, the layers covered, and a fake-quant tiny model whose loss stays close."""

from __future__ import annotations

import math

import pytest
import torch

from sbtrain.models import build_model
from sbtrain.spike.w8a import (
    MSE_CLIP_STEPS,
    MSE_MIN_CLIP,
    W8AError,
    apply_w8aspike,
    dequantize,
    quantize_weight,
    quantized_weight_names,
    validation_loss,
)

VOCAB = 96
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "sliding_window": 6, "init_std": 0.2}
SB7B = dict(TINY, name="sb7b_w8a", layer_pattern=["gla", "swa"], gla={"gate_rank": 8})
SB76B = dict(TINY, name="sb76b_w8a", layer_pattern=["hybrid_swa"], hybrid={"num_sink_tokens": 2},
             moe={"num_experts": 3, "top_k": 1, "num_shared_experts": 1, "dense_layers": [0]})


def naive_absmax(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row, group by group, in Python."""
    codes = torch.zeros(w.shape, dtype=torch.int8)
    scales = torch.zeros(w.shape[0], math.ceil(w.shape[1] / group))
    for r in range(w.shape[0]):
        for g, start in enumerate(range(0, w.shape[1], group)):
            chunk = w[r, start:start + group]
            scale = chunk.abs().max() / 127
            scales[r, g] = scale
            codes[r, start:start + group] = torch.round(chunk / scale).to(torch.int8)
    return codes, scales


def test_absmax_hand_example_and_groups_of_128_and_72():
    w = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) * 0.1
    w[0, 5] = 2.54  # group 0 of row 0: absmax 2.54 -> scale 0.02
    w[0, 0], w[0, 1] = 0.5, -1.26  # codes 25, -63
    w[0, 150] = -1.27  # group 1 (columns 128..199, 72 wide): scale 0.01
    w[0, 131] = 0.05  # code 5
    q = quantize_weight(w, "absmax")
    assert q.codes.dtype == torch.int8 and q.codes.shape == (3, 200) and q.scales.shape == (3, 2)
    assert q.scales[0].tolist() == pytest.approx([0.02, 0.01], rel=1e-6)
    assert q.codes[0, [0, 1, 5, 131, 150]].tolist() == [25, -63, 127, 5, -127]
    codes, scales = naive_absmax(w, 128)
    assert torch.equal(q.codes, codes) and torch.allclose(q.scales, scales, rtol=0, atol=0)
    assert q.clipped == 0 and int(q.codes.abs().max()) == 127
    assert torch.equal(q.dequantize(), q.codes.float() * scales.repeat_interleave(128, -1)[:, :200])


def test_zero_group_and_batched_expert_shapes():
    w = torch.zeros(2, 4, 10)
    w[1, 2, :3] = torch.tensor([1.0, -2.0, 0.5])
    q = quantize_weight(w, "mse", group_size=4)  # groups 4 + 4 + 2
    assert q.codes.shape == (2, 4, 10) and q.scales.shape == (2, 4, 3)
    assert torch.isfinite(q.dequantize()).all() and not q.dequantize()[0].any()
    assert torch.allclose(q.dequantize(), w, atol=2.0 / 127)


def naive_mse_scale(group: torch.Tensor) -> float:
    """The clipping search, one ratio at a time, with the clamp."""
    absmax = group.abs().max()
    best, best_err = absmax / 127, float("inf")
    for ratio in torch.linspace(1.0, MSE_MIN_CLIP, MSE_CLIP_STEPS).tolist():
        scale = absmax * ratio / 127
        err = ((torch.round(group / scale).clamp(-128, 127) * scale - group) ** 2).sum().item()
        if err < best_err:
            best, best_err = scale, err
    return float(best)


def test_mse_clips_an_outlier_and_clamps_its_code():
    """127 entries at 100.5/127 of the outlier sit half a step off the absmax grid; a ratio just
    under 1 puts them on the grid and pushes the positive outlier to round(w/scale) = 128 > 127."""
    group = torch.full((1, 128), 100.5 / 127)
    group[0, 0] = 1.0
    absmax_q, mse_q = quantize_weight(group, "absmax"), quantize_weight(group, "mse")
    assert mse_q.scales.item() == pytest.approx(naive_mse_scale(group[0]), rel=1e-6)
    assert mse_q.scales.item() < group.abs().max().item() / 127  # ratio < 1
    assert round(1.0 / mse_q.scales.item()) > 127  # the outlier's raw code leaves the int8 range ...
    assert mse_q.clipped == 1 and mse_q.codes[0, 0].item() == 127  # ... is counted and clamped (not wrapped to -128)
    assert mse_q.codes.min().item() >= -128 and mse_q.codes.max().item() <= 127
    assert mse_q.dequantize()[0, 0].item() == pytest.approx(1.0, abs=0.01)
    mse_err = (mse_q.dequantize() - group).pow(2).sum().item()
    absmax_err = (absmax_q.dequantize() - group).pow(2).sum().item()
    assert mse_err < absmax_err / 10


def test_mse_never_worse_than_absmax_per_group_and_errors_bounded():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 200, generator=gen) * torch.rand(16, 1, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 8  # outliers make clipping pay
    reports = {}
    for method in ("absmax", "mse"):
        q = quantize_weight(w, method)
        deq = q.dequantize()
        err = (deq - w).pow(2)
        reports[method] = torch.stack([err[:, :128].sum(-1), err[:, 128:].sum(-1)], -1)  # per group
        half_step = q.scales.repeat_interleave(128, -1)[:, :200] / 2
        unclipped = (w.abs() <= 127 * q.scales.repeat_interleave(128, -1)[:, :200])
        assert ((deq - w).abs() <= half_step * (1 + 1e-5) + 1e-9)[unclipped].all()
        assert q.codes.min() >= (-127 if method == "absmax" else -128) and q.codes.max() <= 127
        expected_clipped = int((torch.round(w / q.scales.repeat_interleave(128, -1)[:, :200]).abs() > 127).sum()
                               - (torch.round(w / q.scales.repeat_interleave(128, -1)[:, :200]) == -128).sum())
        assert q.clipped == expected_clipped
    assert (reports["mse"] <= reports["absmax"] * (1 + 1e-6)).all()
    assert (reports["mse"] < reports["absmax"] * 0.999).any()  # the search does something here


def test_dequantize_is_exactly_codes_times_scale():
    codes = torch.tensor([[127, -128, 3]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 0.25]])
    assert dequantize(codes, scales, group_size=2).tolist() == [[63.5, -64.0, 0.75]]


def test_covered_layers():
    torch.manual_seed(0)
    names = quantized_weight_names(build_model(SB76B))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    assert names["model.layers.1.mlp.experts.gate_proj"] is True  # routed experts, stored transposed
    assert "model.layers.1.mlp.shared_expert.up_proj.weight" in names
    assert not [n for n in names if "router" in n or "lm_head" in n or "embed" in n or "norm" in n]
    gla = quantized_weight_names(build_model(SB7B))
    assert {"model.layers.0.self_attn.gk_proj.0.weight", "model.layers.0.self_attn.gk_proj.1.weight"} <= set(gla)


@pytest.mark.parametrize("config", [SB7B, SB76B], ids=["sb7b", "sb76b"])
def test_fake_quant_model_weights_spikes_and_loss(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": ids, "labels": ids.roll(-1, 1)}]
    base = validation_loss(model, batches)
    report = apply_w8aspike(model, method="mse", k=3.0, spike_down_proj=True, group_size=16)
    state = model.state_dict()
    for name, transposed in quantized_weight_names(model).items():
        q = quantize_weight(original[name].transpose(-1, -2) if transposed else original[name], "mse", 16)
        expected = q.dequantize().transpose(-1, -2) if transposed else q.dequantize()
        assert torch.equal(state[name], expected), name
        assert report["layers"][name]["clipped"] == q.clipped
    assert torch.equal(state["lm_head.weight"], original["lm_head.weight"])
    assert model.config.spike.mode == "eval" and model.config.spike.spike_down_proj
    spiked = validation_loss(model, batches)
    with torch.no_grad():
        eval_logits = model(ids, return_logits=True).logits
        model.train()  # mode eval: no spikes in train mode, only the int8 weights
        w8_logits = model(ids, return_logits=True).logits
    model.eval()
    assert not torch.allclose(eval_logits, w8_logits, atol=1e-3)  # the spikes are on at eval
    assert math.isfinite(spiked) and abs(spiked - base) < 0.05 * base, (base, spiked)
    torch.manual_seed(0)
    w8_only = build_model(config).eval()
    apply_w8aspike(w8_only, method="mse", spike=False, group_size=16)  # W8 only: spiking off, even in eval
    with torch.no_grad():
        assert torch.allclose(w8_only(ids, return_logits=True).logits, w8_logits, atol=1e-5)


def test_bad_settings_name_the_choices():
    with pytest.raises(W8AError, match=r"method='gptq' is unknown.*absmax.*mse"):
        quantize_weight(torch.ones(2, 4), "gptq")
    torch.manual_seed(0)
    with pytest.raises(W8AError, match="k=0"):
        apply_w8aspike(build_model(SB7B), k=0)
    with pytest.raises(W8AError, match="group_size=0"):
        quantize_weight(torch.ones(2, 4), "absmax", group_size=0)
