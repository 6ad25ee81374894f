"""Forward + backward on every tiny recipe and every layer kind: finite loss, every trainable
parameter that takes part gets a nonzero gradient."""

from __future__ import annotations

import pytest
import torch

from sbtrain.models.ffn.moe import MoE
from tests.models.helpers import tiny_model

SMALL = ["model.num_layers=2", "model.sliding_window=5", "model.vocab_size=512"]
VARIANTS = {
    "qwen2_tiny": ("qwen2_tiny", []),
    "sb7b_tiny": ("sb7b_tiny", []),
    "sb76b_tiny": ("sb76b_tiny", []),
    "full": ("qwen2_tiny", SMALL + ["model.layer_pattern=[full]"]),
    "swa": ("qwen2_tiny", SMALL + ["model.layer_pattern=[swa]"]),
    "gla": ("sb7b_tiny", SMALL + ["model.layer_pattern=[gla]"]),
    "hybrid_full_shared_moe": ("sb76b_tiny", SMALL + ["model.layer_pattern=[hybrid_full]", "model.moe.dense_layers=[]"]),
    "hybrid_swa_separate_dense": (
        "sb76b_tiny",
        SMALL + ["model.layer_pattern=[hybrid_swa]", "model.hybrid.share_branch_projections=false",
                 "model.moe.num_experts=0"],
    ),
    "moe_sigmoid_aux_free_tied": (
        "sb76b_tiny",
        SMALL + ["model.layer_pattern=[hybrid_swa,hybrid_full]", "model.moe.dense_layers=[0]",
                 "model.moe.router_activation=sigmoid", "model.moe.norm_topk_prob=true",
                 "model.moe.aux_free_balancing=true", "model.moe.top_k=2", "model.tie_embeddings=true"],
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward_all_parameters_get_gradients(variant):
    name, overrides = VARIANTS[variant]
    model = tiny_model(name, overrides).train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss_sum) and out.num_tokens.item() == 22
    loss = out.loss_sum / out.num_tokens + out.aux_loss
    loss.backward()
    moe_expert_params = {}
    for moe in model.modules():
        if isinstance(moe, MoE):
            assert out.aux_loss.item() > 0  # balance loss of a real routing is positive
            for p in moe.experts.parameters():
                moe_expert_params[id(p)] = moe.last_tokens_per_expert
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        if id(p) in moe_expert_params:
            used = moe_expert_params[id(p)] > 0  # an expert that got no token has no gradient
            per_expert = p.grad.flatten(1).abs().sum(1)
            assert used.any() and (per_expert[used] > 0).all() and (per_expert[~used] == 0).all(), pname
        else:
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def test_head_counts_are_configurable_7q_1kv():
    model = tiny_model("sb76b_tiny", ["model.num_attention_heads=7", "model.num_key_value_heads=1",
                                      "model.head_dim=32", "model.num_layers=4", "model.vocab_size=512"])
    ids = torch.randint(0, 512, (1, 9))
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.shape == (1, 9, 512) and torch.isfinite(out.loss_sum)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (7 * 32, 256)
    assert model.model.layers[0].self_attn.sink_k.shape == (16, 1, 32)
