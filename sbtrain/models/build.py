"""Build a model from its config (on the meta device for full sizes), initialise it, count it."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sbtrain.config.model import ModelConfig
from sbtrain.models.layers import RMSNorm
from sbtrain.models.model import CausalLM
from sbtrain.models.moe import MoE
from sbtrain.models.spiking import apply_spiking


def to_model_config(cfg: ModelConfig | DictConfig | dict) -> ModelConfig:
    """A validated :class:`ModelConfig` from a dataclass, a Hydra node or a plain dict."""
    if isinstance(cfg, ModelConfig):
        return cfg.validate()
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is ModelConfig:
        return OmegaConf.to_object(cfg).validate()
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, cfg)  # unknown keys raise here, naming the key
    return OmegaConf.to_object(merged).validate()


def build_model(cfg: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> CausalLM:
    """The model on ``device``; real devices get :func:`init_weights`, ``meta`` allocates nothing."""
    model_cfg = to_model_config(cfg)
    model = CausalLM(model_cfg, device=device, dtype=dtype)
    apply_spiking(model)  # model.spike: hooks on the chosen linear inputs (none when mode=off)
    if torch.device(device).type != "meta":
        init_weights(model)
    return model


@torch.no_grad()
def init_weights(model: CausalLM, std: float | None = None) -> CausalLM:
    """Normal(0, init_std) weights, zero biases, unit norms, betas at beta_init, zero expert bias."""
    std = model.config.init_std if std is None else std
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        if hasattr(module, "init_extra"):
            module.init_extra(std)
    model.tie_weights()
    return model


def materialize(model: CausalLM, device: str | torch.device = "cpu") -> CausalLM:
    """Allocate a meta-built model on ``device`` and initialise it (ties are restored)."""
    model.to_empty(device=device)
    model.tie_weights()
    return init_weights(model)


def count_parameters(model: CausalLM) -> dict:
    """Total, active-per-token and embedding parameter counts (tied weights counted once).

    Active = everything except the routed experts a token does not use: each MoE layer
    contributes ``top_k / num_experts`` of its routed-expert parameters (router and shared
    expert count fully).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.modules():
        if isinstance(moe, MoE):
            routed = sum(p.numel() for p in moe.experts.parameters())
            inactive += routed - routed * moe.cfg.top_k // moe.cfg.num_experts
    embedding = model.model.embed_tokens.weight.numel()
    lm_head = 0 if model.config.tie_embeddings else model.lm_head.weight.numel()
    return {
        "params_total": total,
        "params_active": total - inactive,
        "params_embedding": embedding,
        "params_lm_head": lm_head,
    }
