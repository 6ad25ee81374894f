"""What every mixer shares: its inputs (RoPE, document bounds, decode cache, context-parallel
layout) and the Qwen2-shaped q/k/v/o projections most kinds reuse (so conversion is a copy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel.context_parallel import ContextParallel
from sbtrain.config.model import ModelConfig
from sbtrain.models.cache import LayerCache
from sbtrain.models.layers import Rotary
from sbtrain.models.mixers.hf.common import project_qkv  # one copy: the exported code uses it too


@dataclass
class MixerInputs:
    """What every mixer needs besides its input: RoPE tables, document bounds, decode cache."""

    rotary: Rotary
    cu_seqlens: torch.Tensor | None = None
    cache: LayerCache | None = None
    # Context parallelism: the input is this rank's shard of the sequence, and the cores run
    # their distributed forms (``parallel.context_parallel``); cu_seqlens then lives in it.
    context_parallel: ContextParallel | None = None


def make_qkvo(module: nn.Module, cfg: ModelConfig, prefix: str = "", device=None, dtype=None) -> None:
    """Attach ``{prefix}q_proj`` .. ``{prefix}o_proj`` with Qwen2's shapes (q/k/v bias, no o bias)."""
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    kw = {"device": device, "dtype": dtype}
    setattr(module, f"{prefix}q_proj", nn.Linear(d, hq * hd, bias=cfg.attention_bias, **kw))
    setattr(module, f"{prefix}k_proj", nn.Linear(d, hkv * hd, bias=cfg.attention_bias, **kw))
    setattr(module, f"{prefix}v_proj", nn.Linear(d, hkv * hd, bias=cfg.attention_bias, **kw))
    setattr(module, f"{prefix}o_proj", nn.Linear(hq * hd, d, bias=False, **kw))


__all__ = ["MixerInputs", "make_qkvo", "project_qkv"]
