"""HF side of ``gla``: gated linear attention in a chunked form whose exponents are all <= 0, from the
layer's cached state when there is one (one token: the recurrent step, as sbtrain's ``ops.gla_step``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.models.mixers.hf.common import (
    SbtrainRMSNorm,
    export_mixer,
    feature_map,
    make_qkvo,
    padding_neutral,
    project_qkv,
)

# --- exported code below ---
GLA_CHUNK = 64


def gated_linear_attention(q, k, v, g, chunk: int = GLA_CHUNK, initial_state=None):
    """``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t / sqrt(D)`` per KV head (GQA:
    query head h reads KV head ``h // (Hq / Hkv)``) from ``initial_state`` ``[B,Hkv,Dk,Dv]`` (None:
    zeros); returns ``(o, final state)`` (fp32, or fp64 for fp64 inputs). Evaluated chunk by chunk:
    every decay factor is exp of a difference of cumulative log-decays with the later one first, so
    it is <= 1; a single token takes the recurrent step."""
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(B, T, Hkv, Hq // Hkv, Dk) * Dk**-0.5
    k, v, g = k.to(acc), v.to(acc), g.to(acc)
    state = q.new_zeros(B, Hkv, Dk, Dv, dtype=acc) if initial_state is None else initial_state.to(acc)
    if T == 1:
        state = state * g[:, 0].exp().unsqueeze(-1) + k[:, 0].unsqueeze(-1) * v[:, 0].unsqueeze(-2)
        o = torch.einsum("bhgk,bhkv->bhgv", qg[:, 0], state)
        return o.reshape(B, 1, Hq, Dv).to(q.dtype), state
    outputs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        qc, kc, vc = qg[:, start:end], k[:, start:end], v[:, start:end]
        cum = g[:, start:end].cumsum(1)  # [B,C,Hkv,Dk]: decay from the chunk start through token t
        inter = torch.einsum("bthgk,bhkv->bthgv", qc * cum.exp().unsqueeze(3), state)
        C = end - start
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # [t, s]: s <= t
        diff = (cum.unsqueeze(2) - cum.unsqueeze(1)).masked_fill(~causal[None, :, :, None, None], float("-inf"))
        scores = torch.einsum("bthgk,btshk->btshg", qc, diff.exp() * kc.unsqueeze(1))
        intra = torch.einsum("btshg,bshv->bthgv", scores, vc)
        outputs.append(inter + intra)
        last = cum[:, -1]  # [B,Hkv,Dk]
        carried = kc * (last.unsqueeze(1) - cum).exp()
        state = state * last.exp().unsqueeze(-1) + torch.einsum("bshk,bshv->bhkv", carried, vc)
    return torch.cat(outputs, dim=1).reshape(B, T, Hq, Dv).to(q.dtype), state


def cached_linear_attention(q, k, v, g, real, layer_cache):
    """GLA of the new tokens from the layer cache's state (zeros without one), which then keeps the final
    state (sbtrain's ``linear_core``); padding tokens write nothing and decay nothing."""
    k, g = padding_neutral(real, k, g)
    o, state = gated_linear_attention(q, k, v, g, initial_state=None if layer_cache is None else layer_cache.state)
    if layer_cache is not None:
        layer_cache.state = state
    return o


@export_mixer("gla")
class SbtrainGatedLinearAttention(nn.Module):
    def __init__(self, config, kind: str = "gla"):
        super().__init__()
        self.head_dim = config.head_dim
        self.feature_map = config.gla.get("feature_map", "relu")
        self.gate_normalizer = float(config.gla.get("gate_normalizer", 16.0))
        make_qkvo(self, config)
        rank = int(config.gla.get("gate_rank", 16))
        self.gk_proj = nn.Sequential(
            nn.Linear(config.hidden_size, rank, bias=False),
            nn.Linear(rank, config.num_key_value_heads * config.head_dim, bias=True),
        )
        self.g_norm = SbtrainRMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, real=None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, self.head_dim)
        q, k = feature_map(q, self.feature_map), feature_map(k, self.feature_map)
        g = F.logsigmoid(self.gk_proj(x).float()).view(B, T, -1, self.head_dim) / self.gate_normalizer
        o = cached_linear_attention(q, k, v, g, real, cache)
        return self.o_proj(self.g_norm(o).flatten(2))
