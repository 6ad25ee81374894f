"""Linear-attention mixers: the 7B's gated linear attention (GLA) and the 76B's key-tied branch.

Both are GQA-aware: k, v and the log-decay g have ``num_key_value_heads`` heads and the state
is per KV head, read by all query heads of its group (k/v are never repeated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from operators import ops
from sbtrain.config.model import ModelConfig
from sbtrain.models.attention import MixerInputs, make_qkvo, project_qkv
from sbtrain.models.layers import RMSNorm, feature_map


def linear_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, inputs: MixerInputs):
    """``ops.gla`` over a sequence (training, prefill) or ``ops.gla_step`` for one decode token.

    q ``[B,T,Hq,D]``, k/v/g ``[B,T,Hkv,D]``; scale 1/sqrt(D). With a cache, the final state is
    kept: the chunked op fills it at prefill, the recurrent op advances it token by token.
    """
    cache = inputs.cache
    if inputs.context_parallel is not None:
        return inputs.context_parallel.gla(q, k, v, g)
    if cache is not None and cache.state is not None:
        if q.shape[1] != 1:
            raise ValueError(f"decode takes one token at a time after prefill, got {q.shape[1]}")
        o, cache.state = ops.gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], cache.state)
        return o.unsqueeze(1)
    o, final = ops.gla(q, k, v, g, output_final_state=cache is not None, cu_seqlens=inputs.cu_seqlens)
    if cache is not None:
        cache.state = final
    return o


def key_tied_log_decay(k_pre: torch.Tensor) -> torch.Tensor:
    """``log(1 - sigmoid(k_pre)) = -softplus(k_pre)``: the 76B's decay alpha = 1 - k, computed
    stably (never ``log1p(-k)`` of a rounded sigmoid, never ``1 - k`` as a log-decay)."""
    return -F.softplus(k_pre.float())


class GatedLinearAttention(nn.Module):
    """q/k/v/o as in the Transformer, ReLU feature map, no RoPE, low-rank per-key-dim decay
    ``g = logsigmoid(gk_proj(x)) / gate_normalizer``, per-head RMSNorm before o_proj."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.num_kv_heads = cfg.num_key_value_heads
        self.feature_map = cfg.gla.feature_map
        self.gate_normalizer = cfg.gla.gate_normalizer
        kw = {"device": device, "dtype": dtype}
        make_qkvo(self, cfg, **kw)
        self.gk_proj = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.gla.gate_rank, bias=False, **kw),
            nn.Linear(cfg.gla.gate_rank, self.num_kv_heads * self.head_dim, bias=True, **kw),
        )
        self.g_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, **kw)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, self.head_dim)  # under tensor parallelism: this rank's heads
        q, k = feature_map(q, self.feature_map), feature_map(k, self.feature_map)
        g = F.logsigmoid(self.gk_proj(x).float()).view(B, T, -1, self.head_dim) / self.gate_normalizer
        o = linear_core(q, k, v, g, inputs)
        return self.o_proj(self.g_norm(o).flatten(2))
