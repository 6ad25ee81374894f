"""Softmax attention: layer kinds ``full`` (causal over the whole past) and ``swa`` (a sliding
window of ``model.sliding_window`` past tokens), optional learned sink tokens (the hybrid's), RoPE.

Context parallelism: Ulysses all-to-all (full) or a halo exchange of the previous rank's last W
keys/values (swa), in ``parallel/context_parallel``. Decode cache: the KV tensors (full) or a ring
of W slots (swa). HF import: Qwen2's q/k/v/o copied as they are.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from operators import ops
from sbtrain.config.model import ModelConfig
from sbtrain.models.cache import KVCache
from sbtrain.models.mixers.base import MixerInputs, make_qkvo, project_qkv
from sbtrain.models.mixers.registry import MixerKind, register
from sbtrain.models.mixers.saved_bytes import Shapes, lin_in, rotary_per_layer, sdpa_core
from sbtrain.models.tp_styles import qkvo_plan, shard_mixer

EXPORT_CODE = Path(__file__).parent / "hf" / "attention.py"


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
        self.mixer_kind = "full" if window is None else "swa"
        self.head_dim = cfg.resolved_head_dim
        self.window = window
        make_qkvo(self, cfg, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        q, k = inputs.rotary(q), inputs.rotary(k)
        o = softmax_core(q, k, v, window=self.window, inputs=inputs)
        return self.o_proj(o.flatten(2))


# -- what the rest of the framework needs to know about softmax attention -----------------------
def window_of(cfg: ModelConfig, windowed: bool) -> int | None:
    return cfg.sliding_window if windowed else None


def softmax_flops(cfg: ModelConfig, seq_len: int, window: int | None) -> float:
    """Training FLOPs per token of QK^T and PV: 6·T·d causal, 12·min(W, T/2)·d windowed (d = Hq·D)."""
    d = cfg.num_attention_heads * cfg.resolved_head_dim
    return 6.0 * seq_len * d if window is None else 12.0 * min(window, seq_len / 2) * d


def mean_context(seq_len: int, window: int | None, sinks: int = 0) -> float:
    """Mean keys a causal query sees over positions 0..seq_len-1 (``window`` past tokens + itself)."""
    visible = [min(t + 1, window + 1) if window is not None else t + 1 for t in range(seq_len)]
    return sum(visible) / seq_len + sinks


def softmax_macs(cfg: ModelConfig, seq_len: int, window: int | None, sinks: int = 0) -> float:
    """Forward MACs per token of QK^T and PV."""
    return 2 * cfg.num_attention_heads * cfg.resolved_head_dim * mean_context(seq_len, window, sinks)


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, kv_bytes: int, window: int | None) -> int:
    """K and V for every past token (full) or a ring of W slots (windowed)."""
    d_kv = cfg.num_key_value_heads * cfg.resolved_head_dim
    return 2 * (seq_len if window is None else window) * d_kv * kv_bytes


def halo_of(s: Shapes, window: int | None) -> int:
    """Keys of the previous rank a windowed layer attends to under context parallelism."""
    return s.window if (s.cp > 1 and window is not None) else 0


def _activations(windowed: bool):
    def saved(s: Shapes, cfg: ModelConfig) -> tuple[int, int]:
        window = s.window if windowed else None
        attn, out_copy, work = sdpa_core(replace(s, sinks=0), window, halo_of(s, window))
        total = lin_in(s, 3, s.d) + rotary_per_layer(s) + attn
        # o_proj reads the output transposed back to [B,T,H,D]: the kernel's own (saved) output laid
        # out that way already on the full path (a view), a fresh copy on the windowed one.
        return total + (lin_in(s, 1, s.hq * s.D) if out_copy else 0), work
    return saved


def _tensor_parallel(mixer: nn.Module, tp_mesh, residual) -> None:
    shard_mixer(mixer, tp_mesh, residual, qkvo_plan(residual))


for _name, _windowed in (("full", False), ("swa", True)):
    register(MixerKind(
        name=_name,
        summary="softmax attention over the whole past (RoPE)" if not _windowed
        else "softmax attention over a sliding window of model.sliding_window tokens (RoPE)",
        build=lambda cfg, device=None, dtype=None, _w=_windowed: SoftmaxAttention(
            cfg, window_of(cfg, _w), device=device, dtype=dtype),
        flops_per_token=lambda cfg, T, _w=_windowed: softmax_flops(cfg, T, window_of(cfg, _w)),
        core_macs_per_token=lambda cfg, T, _w=_windowed: softmax_macs(cfg, T, window_of(cfg, _w)),
        decode_cache_bytes=lambda cfg, T, b, _w=_windowed: kv_cache_bytes(cfg, T, b, window_of(cfg, _w)),
        tensor_parallel=_tensor_parallel,
        export_code=EXPORT_CODE,
        uses_rope=True,
        attends_all=not _windowed,
        activations=_activations(_windowed),
    ))

__all__ = ["SoftmaxAttention", "kv_cache_bytes", "mean_context", "softmax_core", "softmax_flops",
           "softmax_macs"]
