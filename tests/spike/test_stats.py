"""SpikeStats and the energy model against hand computations on tiny fixed tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sbtrain.config.model import SpikeConfig
from sbtrain.models.spiking import apply_spiking
from sbtrain.spike.energy import PJ, OtherMatmuls, SpikedMatmul, energy_report, fan_out, mean_context
from sbtrain.spike.stats import SpikeStats

# 4 tokens x 4 channels; channel 3 never fires. Values cover counts above 7 and above 15.
COUNTS = torch.tensor([[[0, 1, -3, 0], [5, -9, 0, 0]], [[0, 20, 7, 0], [-1, 0, 16, 0]]], dtype=torch.int32)


def test_figures_match_hand_counts():
    stats = SpikeStats(window=3)
    stats("layer", COUNTS)
    stats.add_tokens(4)
    s = stats.summary()["layers"]["layer"]
    assert s["entries"] == 16 and s["rows"] == 4 and s["rows_per_token"] == 1.0
    assert s["zero_fraction"] == 8 / 16
    assert s["silent_channel_fraction"] == 1 / 4
    hist = s["abs_histogram"]
    expected = {"0": 8, "1": 2, "3": 1, "5": 1, "7": 1, "9": 1, ">15": 2}  # 20 and 16 land in ">15"
    assert hist == pytest.approx({key: expected.get(key, 0) / 16 for key in hist})
    codings = s["codings"]
    # |s| = 1,3,5,9,20,7,1,16: a rate code emits sum |s| = 62 spikes; popcounts 1,2,2,2,2,3,1,1 = 14.
    assert codings["ternary"]["spikes_per_channel"] == 62 / 16 and codings["ternary"]["time_steps"] == 20
    assert codings["binary_abs"]["spikes_per_channel"] == 62 / 16
    assert codings["bitwise_bidirectional"]["spikes_per_channel"] == 14 / 16
    assert codings["bitwise_bidirectional"]["time_steps"] == 5
    assert codings["bitwise_pure_abs"]["spikes_per_channel"] == 14 / 16
    # 6-bit two's complement (20 needs it): 1->1, -3=111101->5, 5->2, -9=110111->5, 20->2, 7->3, -1->6, 16->1.
    assert codings["twos_complement"]["time_steps"] == 6
    assert codings["twos_complement"]["spikes_per_channel"] == 25 / 16
    assert codings["ternary"]["train_sparsity"] == pytest.approx(1 - 62 / (16 * 20))


def test_three_step_window_readings_by_hand():
    stats = SpikeStats(window=3)
    stats("layer", COUNTS)
    w = stats.summary()["overall"]["window"]
    assert w["primary"] == "bitwise_carry" and w["steps"] == 3
    # bitwise, carry: 9 (1001) and 16, 20 (5 bits) take two windows (6 steps); 14 spikes over 8*3 + 5*3 + 3*6 = 57.
    assert w["bitwise_carry"] == pytest.approx(1 - 14 / 57)
    # bitwise, clamp to 7: 9, 20, 16 -> 111: popcounts 1,2,2,3,3,3,1,3 = 18 spikes over 16*3 steps.
    assert w["bitwise_clamp"] == pytest.approx(1 - 18 / 48)
    # ternary, clamp to 3: 1,3,3,3,3,3,1,3 = 20 spikes over 48 steps.
    assert w["ternary_clamp"] == pytest.approx(1 - 20 / 48)
    # ternary, carry: 62 spikes over 8*3 + (3+3+6+9+21+9+3+18) = 96 steps.
    assert w["ternary_carry"] == pytest.approx(1 - 62 / 96)
    assert w["zero_count"] == pytest.approx(0.5)


def test_streaming_equals_one_pass_and_overall_merges_layers():
    whole, parts = SpikeStats(), SpikeStats()
    whole("a", COUNTS)
    for chunk in COUNTS.reshape(4, 4).split(1):
        parts("a", chunk)
    assert whole.summary()["layers"] == parts.summary()["layers"]
    other = torch.tensor([[0, 0], [0, 3]], dtype=torch.int32)
    parts("b", other)
    overall = parts.summary()["overall"]
    assert overall["entries"] == 20 and overall["zero_fraction"] == (8 + 3) / 20
    assert overall["silent_channel_fraction"] == (1 + 1) / 6  # a: channel 3; b: channel 0
    with pytest.raises(ValueError, match="channels"):
        parts("b", COUNTS)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 3)
        self.out_proj = nn.Linear(3, 5)  # not spiked: counted the same on both sides

    def forward(self, x):
        return self.out_proj(self.q_proj(x))


def test_energy_of_a_one_layer_toy_by_hand():
    model = Toy()
    stats = SpikeStats()
    names = apply_spiking(model, SpikeConfig(mode="train", k=3.0, targets=["q_proj"]), stats)
    others = OtherMatmuls(model, names)
    # Token 1: mean|x| = 1.5, V_th = 0.5, s = [6, -2, 0, 4] (bitwise popcounts 2, 1, 0, 1); token 2 all zero.
    model(torch.tensor([[[3.0, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]]))
    stats.add_tokens(2)
    s = stats.summary()["layers"]["q_proj"]
    assert s["codings"]["bitwise_bidirectional"]["spikes_per_channel"] == 4 / 8
    layer = SpikedMatmul("q_proj", 4, fan_out(model.q_proj), stats.rows_per_token("q_proj"), 4 / 8)
    other = others.macs_per_token(stats.tokens)
    assert other == {"out_proj": 15.0}
    report = energy_report([layer], other)
    # Per token: 2 spikes x 3 adds x 0.03 pJ + 3 outputs x V_th multiply (FP16 MAC, 1.5 pJ).
    spike_pj = 2 * 3 * 0.03 + 3 * 1.5
    assert report["spiked_layers"]["spike_pj"] == pytest.approx(spike_pj)
    assert report["spiked_layers"]["fp16_pj"] == pytest.approx(12 * 1.5)
    assert report["spiked_layers"]["int8_pj"] == pytest.approx(12 * 0.23)
    assert report["spiked_layers"]["fp16_over_spike"] == pytest.approx(18 / spike_pj)
    assert report["with_other"]["int8_over_spike"] == pytest.approx((2.76 + 22.5) / (spike_pj + 22.5))
    assert PJ == {"fp16_mac": 1.5, "int8_mac": 0.23, "int8_add": 0.03}


def test_moe_router_and_experts_fan_out_and_rows():
    """Routed experts see top_k rows per token; their gate+up is the spiked matmul, down_proj is not."""
    from tests.models.helpers import tiny_model

    model = tiny_model("sb76b_tiny", ["model.hidden_size=32", "model.num_layers=4", "model.num_attention_heads=2",
                                      "model.num_key_value_heads=1", "model.head_dim=16", "model.intermediate_size=48",
                                      "model.vocab_size=64", "model.moe.top_k=2", "model.hybrid.num_sink_tokens=2"])
    stats = SpikeStats()
    names = apply_spiking(model, SpikeConfig(mode="eval", k=3.0), stats)
    others = OtherMatmuls(model, names)
    with torch.no_grad():
        model(torch.arange(10).view(1, 10))
    stats.add_tokens(10)
    experts, router = "model.layers.2.mlp.experts", "model.layers.2.mlp.router"
    assert stats.rows_per_token(experts) == 2 and stats.rows_per_token(router) == 1
    modules = dict(model.named_modules())
    assert fan_out(modules[experts]) == 2 * 48 and fan_out(modules[router]) == 4
    assert fan_out(modules["model.layers.2.mlp.shared_expert.up_proj"]) == 48
    other = others.macs_per_token(stats.tokens)
    assert other[f"{experts}.down_proj"] == 2 * 48 * 32
    assert experts not in other and router not in other and "model.layers.2.mlp.shared_expert.up_proj" not in other


def test_mean_context_counts_window_and_sinks():
    assert mean_context(4, window=None) == (1 + 2 + 3 + 4) / 4
    assert mean_context(4, window=1) == (1 + 2 + 2 + 2) / 4
    assert mean_context(4, window=1, sinks=3) == (1 + 2 + 2 + 2) / 4 + 3
