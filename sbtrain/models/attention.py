"""Softmax attention mixer (full or sliding-window, optional sink tokens) and its core."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from operators import ops
from parallel.context_parallel import ContextParallel
from sbtrain.config.model import ModelConfig
from sbtrain.models.cache import KVCache, LayerCache
from sbtrain.models.layers import Rotary


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


def project_qkv(module: nn.Module, x: torch.Tensor, head_dim: int, prefix: str = ""):
    """q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]`` before any feature map or RoPE."""
    B, T, _ = x.shape
    q = getattr(module, f"{prefix}q_proj")(x).view(B, T, -1, head_dim)
    k = getattr(module, f"{prefix}k_proj")(x).view(B, T, -1, head_dim)
    v = getattr(module, f"{prefix}v_proj")(x).view(B, T, -1, head_dim)
    return q, k, v


def softmax_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None,
    inputs: MixerInputs,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention of already-rotated q/k, through the decode cache when given."""
    cache = inputs.cache
    if inputs.context_parallel is not None:
        return inputs.context_parallel.attention(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v)
    if cache is not None:
        if cache.kv is None:
            cache.kv = KVCache(window)
        if cache.kv.length == 0:
            cache.kv.prefill(k, v)
        else:
            k, v = cache.kv.step(k, v)
    return ops.attention(
        q, k, v, causal=True, window=window, sink_k=sink_k, sink_v=sink_v, cu_seqlens=inputs.cu_seqlens
    )


class SoftmaxAttention(nn.Module):
    """The Transformer's attention with RoPE: ``window=None`` full, ``window=W`` W past + current."""

    def __init__(self, cfg: ModelConfig, window: int | None, device=None, dtype=None):
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.window = window
        make_qkvo(self, cfg, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        q, k = inputs.rotary(q), inputs.rotary(k)
        o = softmax_core(q, k, v, window=self.window, inputs=inputs)
        return self.o_proj(o.flatten(2))
