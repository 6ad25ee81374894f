"""Tiny HF Transformers (Qwen2, Llama, Mistral) saved to local folders, random weights large
enough (std 0.1, perturbed norms, nonzero biases) that a wrong mapping shows in the logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


def hf_model(model_type: str, num_layers: int = 2, sliding_window: int | None = None, tie: bool = False,
             rope: dict | None = None):
    """``rope``: extra rope_parameters (e.g. rope_type yarn and its fields) on top of theta 10000."""
    import transformers

    kwargs = dict(SHAPES, num_hidden_layers=num_layers, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})})
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kwargs)
    elif model_type == "llama":
        cfg = transformers.LlamaConfig(**kwargs, attention_bias=False)
    else:
        cfg = transformers.MistralConfig(**kwargs, sliding_window=sliding_window)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, folder: Path, shard: str | None = None, tokenizer: bool = True) -> Path:
    """``save_pretrained`` (safetensors; sharded with an index when ``shard`` is e.g. "20KB")."""
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return folder


def load_converted(out: Path, dtype=torch.float32):
    from sbtrain.models.build import build_model
    from sbtrain.models.weights import load_config, load_into

    model = build_model(load_config(out)).to(dtype)
    load_into(model, out)
    return model.eval()
