"""Plain PyTorch reference of softmax attention with every option sbtrain uses.

q ``[B,Tq,Hq,D]``, k/v ``[B,Tk,Hkv,D]`` (GQA: ``Hq % Hkv == 0``). Queries are aligned to the
end of the keys (query i sits at key position ``Tk - Tq + i``), as in flash-attn, so decode
and chunked prefill use the same call. ``window=W`` keeps W past keys plus the current one
(flash-attn's ``window_size=(W, 0)``; HF's ``sliding_window`` is W + 1). ``sink_k``/``sink_v``
``[S,Hkv,D]`` are learned key/value pairs visible to every query. ``cu_seqlens`` (B = 1,
Tq = Tk) keeps attention inside documents.
"""

from __future__ import annotations

import torch


def check_attention_args(q, k, v, causal, window, sink_k, sink_v, cu_seqlens) -> None:
    if q.dim() != 4 or k.shape != v.shape[:-1] + (k.shape[-1],) or k.dim() != 4:
        raise ValueError(f"attention expects [B,T,H,D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Tq, Hq, D = q.shape
    _, Tk, Hkv, _ = k.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[-1] != D or Hq % Hkv:
        raise ValueError(f"attention: q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)}")
    if Tq > Tk:
        raise ValueError(f"attention: {Tq} queries but only {Tk} keys (queries align to the end of the keys)")
    if window is not None and (window < 0 or not causal):
        raise ValueError(f"attention: window={window} needs causal=True and window >= 0")
    if (sink_k is None) != (sink_v is None):
        raise ValueError("attention: give both sink_k and sink_v, or neither")
    if sink_k is not None and (sink_k.dim() != 3 or sink_k.shape[1:] != (Hkv, D) or sink_v.shape[:2] != sink_k.shape[:2]):
        raise ValueError(f"attention: sinks must be [S,{Hkv},{D}]; got {tuple(sink_k.shape)}")
    if cu_seqlens is not None:
        if B != 1 or Tq != Tk:
            raise ValueError(f"attention: cu_seqlens needs B=1 and Tq=Tk; got B={B}, Tq={Tq}, Tk={Tk}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != Tk or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(f"attention: cu_seqlens must rise from 0 to T={Tk}; got {bounds}")


def attention_mask(Tq, Tk, causal, window, cu_seqlens, device) -> torch.Tensor | None:
    """Boolean ``[Tq, Tk]`` mask, True where a query may attend; None when all may."""
    if not causal and cu_seqlens is None:
        return None
    qpos = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(1)
    kpos = torch.arange(Tk, device=device).unsqueeze(0)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        mask &= kpos <= qpos
        if window is not None:
            mask &= qpos - kpos <= window
    if cu_seqlens is not None:
        doc = torch.zeros(Tk, dtype=torch.long, device=device)
        doc[cu_seqlens[1:-1].to(device)] = 1
        doc = doc.cumsum(0)
        mask &= doc[Tk - Tq :].unsqueeze(1) == doc.unsqueeze(0)
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention by explicit scores (O(Tq*Tk) memory): the oracle, not a fast path."""
    check_attention_args(q, k, v, causal, window, sink_k, sink_v, cu_seqlens)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    mask = attention_mask(Tq, Tk, causal, window, cu_seqlens, q.device)
    if sink_k is not None:
        S = sink_k.shape[0]
        k = torch.cat([sink_k.unsqueeze(0).expand(B, S, Hkv, D).to(k.dtype), k], dim=1)
        v = torch.cat([sink_v.unsqueeze(0).expand(B, S, Hkv, D).to(v.dtype), v], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(Tq, S), mask], dim=1)
    rep = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math, fp64 when the oracle runs in fp64
    qf = q.to(acc).transpose(1, 2)  # B,Hq,Tq,D
    kf = k.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a fully masked row (never in causal use) gives 0
    return (probs @ vf).transpose(1, 2).to(q.dtype)
