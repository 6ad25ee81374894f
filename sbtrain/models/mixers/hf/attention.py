"""HF side of ``full`` / ``swa``: softmax attention with RoPE by explicit scores (fp32 math), in blocks
of queries, through the layer's decode cache when there is one (all past keys, or a ring of W)."""

from __future__ import annotations

import torch
from torch import nn

from sbtrain.models.mixers.hf.common import apply_rotary, export_mixer, hf_window, make_qkvo, project_qkv

# --- exported code below ---
ATTENTION_BLOCK = 256  # queries per block: the scores are [B, Hq, block, keys], never [T, T]


def softmax_attention(q, k, v, window: int | None, sink_k=None, sink_v=None, key_real=None,
                      q_start: int = 0, k_start: int = 0) -> torch.Tensor:
    """Causal attention by explicit scores (fp32 math). q ``[B,T,Hq,D]`` holds columns ``q_start..``,
    k/v ``[B,Tk,Hkv,D]`` consecutive columns ``k_start..`` ending with the queries' own. A query sees
    the keys at its column or before (at most ``window`` columns back when windowed) that are real
    tokens (``key_real`` ``[B,Tk]`` bool, None: all); it always sees its own key, so a padding query
    stays finite. Sinks ``[S,Hkv,D]`` are visible to every query. GQA without repeating k/v."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [B,Hkv,G,T,D]
    kf, vf = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)  # [B,Hkv,Tk,D]
    if sink_k is not None:
        sink_kf = sink_k.to(acc).transpose(0, 1).unsqueeze(0)  # [1,Hkv,S,D]
        sink_vf = sink_v.to(acc).transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1)
    outputs = []
    for s in range(0, T, ATTENTION_BLOCK):
        e = min(s + ATTENTION_BLOCK, T)
        lo = 0 if window is None else max(0, q_start + s - window - k_start)  # older keys are out of reach
        hi = q_start + e - k_start
        q_cols = torch.arange(q_start + s, q_start + e, device=q.device)[:, None]
        k_cols = torch.arange(k_start + lo, k_start + hi, device=q.device)[None, :]
        visible = k_cols <= q_cols  # [t, keys]
        if window is not None:
            visible = visible & (q_cols - k_cols <= window)
        if key_real is not None:
            visible = (visible & (key_real[:, None, lo:hi] | (k_cols == q_cols)))[:, None, None]  # [B,1,1,t,keys]
        qb = qf[:, :, :, s:e].reshape(B, Hkv, G * (e - s), D)
        scores = (qb @ kf[:, :, lo:hi].transpose(-1, -2)) * D**-0.5
        scores = scores.view(B, Hkv, G, e - s, hi - lo).masked_fill(~visible, float("-inf"))
        values = vf[:, :, lo:hi]
        if sink_k is not None:
            sink_scores = ((qb @ sink_kf.transpose(-1, -2)) * D**-0.5).view(B, Hkv, G, e - s, -1)
            scores = torch.cat([sink_scores, scores], dim=-1)
            values = torch.cat([sink_vf, values], dim=2)
        probs = scores.softmax(-1).view(B, Hkv, G * (e - s), -1)
        outputs.append((probs @ values).view(B, Hkv, G, e - s, D))
    o = torch.cat(outputs, dim=3) if len(outputs) > 1 else outputs[0]
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)


def cached_softmax_attention(q, k, v, window: int | None, real, layer_cache, sink_k=None, sink_v=None):
    """Attention of the new columns (``real`` ``[B,T]`` bool or None: no padding), with a layer cache over
    its stored columns too, which then keeps the new ones (sbtrain's ``softmax_core`` + ``KVCache``)."""
    if layer_cache is None:
        return softmax_attention(q, k, v, window, sink_k, sink_v, key_real=real)
    kv = layer_cache.softmax_cache(window)
    start = kv.length
    keys, values, key_real, first = kv.extend(k, v, real)
    return softmax_attention(q, keys, values, window, sink_k, sink_v, key_real, q_start=start, k_start=first)


@export_mixer("full", "swa")
class SbtrainSoftmaxAttention(nn.Module):
    def __init__(self, config, kind: str):
        super().__init__()
        self.head_dim, self.window = config.head_dim, hf_window(config, kind == "swa")
        make_qkvo(self, config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, real=None, cache=None) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        o = cached_softmax_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, self.window, real, cache)
        return self.o_proj(o.flatten(2))
