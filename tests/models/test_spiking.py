"""model.spike on tiny models: which inputs are spiked, that the hooked input is exactly the op
applied to the module's input, the off/eval/train modes, one training step, the large-k limit,
MoE coverage (router, shared expert, routed experts) and config validation."""

from __future__ import annotations

import pytest
import torch

from operators.spike import spike
from sbtrain.config.model import ConfigError, SpikeConfig
from sbtrain.models.build import to_model_config
from sbtrain.models.spiking import apply_spiking, set_spiking_step, spiked_module_names
from tests.models.helpers import recipe, tiny_model

SMALL = ["model.num_layers=2", "model.sliding_window=5", "model.vocab_size=128", "model.hidden_size=32",
         "model.head_dim=16", "model.num_attention_heads=2", "model.num_key_value_heads=1",
         "model.intermediate_size=64", "model.gla.gate_rank=4"]
SB7B = ("sb7b_tiny", SMALL)
SB76B = ("sb76b_tiny", SMALL + ["model.layer_pattern=[hybrid_swa]", "model.moe.dense_layers=[]",
                                "model.hybrid.num_sink_tokens=2", "model.moe.num_experts=2"])


def build(spec, *overrides, seed=0):
    name, base = spec
    return tiny_model(name, base + list(overrides), dtype=torch.float64, seed=seed)


def batch(vocab, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, labels


def mean_loss(model, ids, labels):
    out = model(ids, labels=labels)
    return out.loss_sum / out.num_tokens + out.aux_loss


def test_spiked_modules_of_sb7b():
    model = build(SB7B, "model.spike.mode=train")
    names = set(spiked_module_names(model, model.config.spike))
    layer = "model.layers.{}.{}"
    expected = {layer.format(i, f"self_attn.{p}") for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {layer.format(0, "self_attn.gk_proj")}  # layer 0 is GLA, layer 1 SWA
    expected |= {layer.format(i, f"mlp.{p}") for i in (0, 1) for p in ("gate_proj", "up_proj")}
    assert names == expected  # no down_proj by default, never lm_head
    with_down = build(SB7B, "model.spike.mode=train", "model.spike.spike_down_proj=true")
    assert set(apply_spiking(with_down)) == expected | {layer.format(i, "mlp.down_proj") for i in (0, 1)}


def test_hooked_input_is_the_op_applied_to_the_module_input():
    model = build(SB7B, "model.spike.mode=train", "model.spike.k=2.5", "model.spike.max_count=4").train()
    attn = model.model.layers[0].self_attn
    seen = {}
    model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: seen.update(normed=out))
    attn.q_proj.register_forward_hook(lambda m, args, out: seen.update(q_in=args[0]))
    attn.gk_proj.register_forward_hook(lambda m, args, out: seen.update(gate_in=args[0]))
    model(*batch(128)[:1])
    expected = spike(seen["normed"], 2.5, 4)
    assert torch.equal(seen["q_in"], expected) and torch.equal(seen["gate_in"], expected)
    assert not torch.equal(expected, seen["normed"])


def test_mode_train_trains_one_step_and_differs_from_off():
    ids, labels = batch(128)
    off = build(SB7B).train()
    spiked = build(SB7B, "model.spike.mode=train").train()
    assert torch.equal(mean_loss(off, ids, labels), mean_loss(build(SB7B).train(), ids, labels))
    loss = mean_loss(spiked, ids, labels)
    assert torch.isfinite(loss) and abs(loss.item() - mean_loss(off, ids, labels).item()) > 1e-6
    loss.backward()
    for name, p in spiked.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    before = loss.item()
    with torch.no_grad():
        for p in spiked.parameters():
            p -= 0.5 * p.grad
    assert mean_loss(spiked, ids, labels).item() < before  # the STE gradient is a descent direction


def test_mode_eval_spikes_only_in_eval():
    ids, _ = batch(128)
    off = build(SB7B)
    post_hoc = build(SB7B, "model.spike.mode=eval")

    def logits(m):
        return m(ids, return_logits=True).logits

    assert torch.equal(logits(post_hoc.train()), logits(off.train()))
    assert not torch.allclose(logits(post_hoc.eval()), logits(off.eval()), rtol=0, atol=1e-6)
    # the mode is read at call time: switching to off restores the plain model
    post_hoc.config.spike.mode = "off"
    assert torch.equal(logits(post_hoc.eval()), logits(off.eval()))


def test_large_k_loss_approaches_the_unspiked_loss():
    """V_th * round(x / V_th) differs from x by at most V_th / 2 = mean|x| / (2k): the deviation
    of the model falls like 1/k, i.e. the rounding is the only change spiking makes."""
    ids, labels = batch(128)
    plain = build(SB7B).eval()
    base_loss, base_hidden = mean_loss(plain, ids, labels).item(), plain.hidden_states(ids)[0]
    deviation = {}
    for k in (3, 30, 1000):
        model = build(SB7B, "model.spike.mode=eval", f"model.spike.k={k}").eval()
        hidden = model.hidden_states(ids)[0]
        deviation[k] = ((hidden - base_hidden).abs().max() / base_hidden.abs().max()).item()
        if k == 1000:
            assert abs(mean_loss(model, ids, labels).item() - base_loss) < 1e-4 * base_loss
    assert deviation[3] > 0.03 and deviation[1000] < 2e-3
    assert deviation[3] > 3 * deviation[30] > 9 * deviation[1000]  # roughly 1/k


def test_moe_router_experts_and_shared_expert_are_covered():
    model = build(SB76B, "model.spike.mode=train")
    names = set(spiked_module_names(model, model.config.spike))
    mlp = "model.layers.0.mlp."
    assert {mlp + "router", mlp + "experts", mlp + "shared_expert.gate_proj", mlp + "shared_expert.up_proj"} <= names
    assert mlp + "shared_expert.down_proj" not in names
    # Spiking router, routed-expert and shared-expert inputs equals spiking the MoE input once.
    moe = model.model.layers[0].mlp.train()
    h = torch.randn(2, 6, 32, dtype=torch.float64)
    hooked, _ = moe(h)
    apply_spiking(model, SpikeConfig(mode="off"))  # removes the hooks
    manual, _ = moe(spike(h, 3.0))
    assert torch.allclose(hooked, manual, rtol=0, atol=1e-12)


def test_hybrid_separate_branch_projections_and_moe_train_step():
    model = build(SB76B, "model.spike.mode=train", "model.hybrid.share_branch_projections=false").train()
    names = spiked_module_names(model, model.config.spike)
    assert "model.layers.0.self_attn.linear_q_proj" in names and "model.layers.0.self_attn.linear_o_proj" in names
    loss = mean_loss(model, *batch(128))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("override, message", [
    ("model.spike.mode=always", "model.spike.mode='always' is unknown"),
    ("model.spike.k=0", "model.spike.k=0.0 must be positive"),
    ("model.spike.max_count=0", "model.spike.max_count=0 must be >= 1"),
    ("model.spike.targets=[q_proj,down_proj]", "set model.spike.spike_down_proj=true"),
    ("model.spike.targets=[qproj]", "entry 'qproj' is unknown"),
    ("model.spike.train_from_step=-1", "train_from_step=-1 must be >= 0"),
    ("model.spike.train_from_step=5", "needs model.spike.mode=train"),
])
def test_bad_spike_config_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        to_model_config(recipe("sb7b_tiny", [override]))


def test_train_from_step_gates_spiking_by_step():
    """mode=train with train_from_step=S: no spikes before step S (train or eval), spikes from S on."""
    spiked = build(SB7B, "model.spike.mode=train", "model.spike.train_from_step=3")
    plain = build(SB7B)
    ids, labels = batch(spiked.config.vocab_size)
    off = mean_loss(plain, ids, labels)
    assert not set_spiking_step(spiked, 2)
    for train in (True, False):
        assert torch.equal(mean_loss(spiked.train(train), ids, labels), off)
    assert set_spiking_step(spiked, 3)
    on = mean_loss(spiked.train(), ids, labels)
    assert not torch.allclose(on, off)
    reference = build(SB7B, "model.spike.mode=train")  # spikes from the start
    assert torch.equal(mean_loss(reference.train(), ids, labels), on)
