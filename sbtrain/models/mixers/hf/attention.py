"""HF side of ``full`` / ``swa``: softmax attention with RoPE by explicit scores (fp32 math)."""

from __future__ import annotations

import torch
from torch import nn

from sbtrain.models.mixers.hf.common import apply_rotary, export_mixer, hf_window, make_qkvo, project_qkv

# --- exported code below ---


def softmax_attention(q, k, v, window: int | None, sink_k=None, sink_v=None) -> torch.Tensor:
    """Causal attention by explicit scores: q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]``; ``window`` = W past
    keys + the current one; sinks ``[S,Hkv,D]`` are visible to every query. fp32 math."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    pos = torch.arange(T, device=q.device)
    mask = pos.unsqueeze(0) <= pos.unsqueeze(1)  # [query, key]
    if window is not None:
        mask &= pos.unsqueeze(1) - pos.unsqueeze(0) <= window
    if sink_k is not None:
        S = sink_k.shape[0]
        k = torch.cat([sink_k.unsqueeze(0).expand(B, S, Hkv, D).to(k.dtype), k], dim=1)
        v = torch.cat([sink_v.unsqueeze(0).expand(B, S, Hkv, D).to(v.dtype), v], dim=1)
        mask = torch.cat([mask.new_ones(T, S), mask], dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    rep = Hq // Hkv
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * D**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ vf).transpose(1, 2).to(q.dtype)


@export_mixer("full", "swa")
class SbtrainSoftmaxAttention(nn.Module):
    def __init__(self, config, kind: str):
        super().__init__()
        self.head_dim, self.window = config.head_dim, hf_window(config, kind == "swa")
        make_qkvo(self, config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        o = softmax_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, self.window)
        return self.o_proj(o.flatten(2))
