"""qwen2_tiny-shaped model vs HF transformers' Qwen2ForCausalLM with the same weights (copied by
name: the state dicts must match key for key). The sliding-window case is the check of our
window convention: W past + current here equals HF's ``sliding_window = W + 1``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tests.models.helpers import tiny_model

OVERRIDES = ["model.num_layers=3", "model.vocab_size=1024"]


def hf_qwen2(cfg, window=None, rope=None):
    kwargs = {}
    if window is not None:
        kwargs = {"use_sliding_window": True, "sliding_window": window + 1, "max_window_layers": 0,
                  "layer_types": ["sliding_attention"] * cfg.num_layers}
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": cfg.rope_base}, tie_word_embeddings=False,
        max_position_embeddings=4096, attention_dropout=0.0, **kwargs,
    )
    hf_cfg._attn_implementation = "eager"
    return transformers.Qwen2ForCausalLM(hf_cfg).float().eval()


def copy_weights(ours, theirs):
    ours_sd = ours.state_dict()
    theirs_sd = theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd), set(ours_sd) ^ set(theirs_sd)
    theirs.load_state_dict(ours_sd, strict=True)


@pytest.mark.parametrize("window", [None, 5])
def test_logits_and_loss_match_hf_qwen2(window):
    pattern = "[swa]" if window is not None else "[full]"
    model = tiny_model("qwen2_tiny", OVERRIDES + [f"model.layer_pattern={pattern}", f"model.sliding_window={window or 512}",
                                                  "model.init_std=0.1"])
    hf = hf_qwen2(model.config, window)
    copy_weights(model, hf)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100  # HF shifts inside; our labels come shifted
        out = model(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, ref.logits.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss_sum / out.num_tokens, ref.loss.float(), atol=1e-5, rtol=1e-5)
    if window is not None:
        # The window matters at this length: full attention gives other logits.
        full = tiny_model("qwen2_tiny", OVERRIDES + ["model.layer_pattern=[full]", "model.init_std=0.1"])
        full.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (full(ids, return_logits=True).logits - out.logits).abs().max() > 1e-3


def test_yarn_logits_match_hf_qwen2_rope_type_yarn():
    """model.rope_yarn against HF's rope_type yarn (NTK-by-parts frequencies + attention temperature)
    on a context 8x the original: same logits; and the scaling changes them (it is really applied)."""
    yarn = ["model.rope_yarn.factor=8", "model.rope_yarn.original_max_position=8", "model.rope_base=100"]
    model = tiny_model("qwen2_tiny", OVERRIDES + yarn + ["model.init_std=0.1"])
    hf = hf_qwen2(model.config, rope={"rope_type": "yarn", "rope_theta": 100.0, "factor": 8.0,
                                      "original_max_position_embeddings": 8})
    copy_weights(model, hf)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        out = model(ids, return_logits=True).logits
        plain = tiny_model("qwen2_tiny", OVERRIDES + ["model.rope_base=100", "model.init_std=0.1"])
        plain.load_state_dict(model.state_dict())
        unscaled = plain(ids, return_logits=True).logits
    # HF builds its rotary tables in fp32 whatever the model's dtype: even with both models in
    # float64 the logits differ by 4.7e-6 (|logit| <= 6.8), so 1e-5 absolute was too tight
    # (transformers 5.25: 1.45e-5 on 4 of 131072 logits near zero).
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)
    assert (unscaled - out).abs().max() > 1e-3


def test_loss_sum_is_mean_cross_entropy_times_count():
    model = tiny_model("sb76b_tiny", ["model.num_layers=2", "model.layer_pattern=[hybrid_swa,hybrid_full]",
                                      "model.moe.dense_layers=[0]", "model.vocab_size=512"])
    ids = torch.randint(0, 512, (2, 11))
    labels = torch.randint(0, 512, (2, 11))
    labels[0, :4] = -100
    labels[1, -1] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=True)
    mean = F.cross_entropy(out.logits.double().reshape(-1, 512), labels.reshape(-1), ignore_index=-100)
    assert out.num_tokens.item() == 17
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum.double(), mean * 17, atol=1e-4, rtol=1e-5)
