"""ModelConfig validation messages, suggestions, meta-device build and materialisation."""

from __future__ import annotations

import pytest
import torch

from sbtrain.cli.app import suggest
from sbtrain.config.model import ConfigError, ModelConfig, MoEConfig
from sbtrain.models import build_model, count_parameters, materialize
from tests.models.helpers import recipe


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"layer_pattern": ["gla", "swa", "full"]}, "layer_pattern has 3 entries"),
        ({"layer_pattern": ["gla", "mamba"]}, "'mamba' is not a layer kind"),
        ({"moe": MoEConfig(num_experts=4, dense_layers=[8])}, "dense_layers contains 8"),
        ({"moe": MoEConfig(num_experts=4, top_k=5)}, "top_k=5"),
        ({"moe": MoEConfig(num_experts=4, router_activation="softplus")}, "router_activation='softplus'"),
        ({"hidden_size": 250, "num_attention_heads": 4, "head_dim": None}, "hidden_size=250"),
    ],
)
def test_validate_names_the_bad_value(changes, message):
    cfg = ModelConfig(**changes)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        cfg.validate()


def test_recipes_are_valid_and_tiny_shapes_are_exact():
    for name in ("qwen2_tiny", "sb7b_tiny", "sb76b_tiny"):
        cfg = recipe(name).validate()
        assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.resolved_head_dim, cfg.intermediate_size, cfg.sliding_window) == (8192, 256, 8, 4, 2, 64, 768, 512)
    moe = recipe("sb76b_tiny")
    assert [i for i, k in enumerate(moe.layer_types()) if k == "hybrid_full"] == [3, 7]
    assert (moe.moe.num_experts, moe.moe.num_shared_experts, moe.moe.top_k, moe.hybrid.num_sink_tokens) == (4, 1, 1, 16)
    assert recipe("sb7b").layer_types()[:3] == ["gla", "swa", "gla"]


def test_suggestions_for_typos():
    keys = ["trainer", "trainer.max_steps", "trainer.lr", "model.hidden_size"]
    assert "trainer.max_steps" in suggest("trainer.max_stepz", keys)
    assert "model.hidden_size" in suggest("model.hiden_size", keys)


def test_meta_build_then_materialize_matches_init_rules():
    cfg = recipe("sb76b_tiny", ["model.num_layers=4", "model.vocab_size=512", "model.tie_embeddings=true"])
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model)
    materialize(model, "cpu")
    assert count_parameters(model) == counts
    assert model.lm_head.weight is model.model.embed_tokens.weight
    attn = model.model.layers[0].self_attn
    assert torch.all(attn.beta_attn == 0.5) and torch.all(attn.attn_norm.weight == 1)
    assert torch.all(attn.q_proj.bias == 0) and 0.015 < attn.q_proj.weight.std() < 0.025
    assert torch.isfinite(model(torch.randint(0, 512, (1, 5)), return_logits=True).logits).all()
