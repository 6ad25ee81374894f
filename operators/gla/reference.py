"""Plain PyTorch reference of gated linear attention: the token-by-token recurrence.

Layout follows fla >= 0.2: ``[B, T, H, D]``. GQA-aware: q has ``Hq`` heads, k/v/g have
``Hkv`` heads (``Hq % Hkv == 0``); the state is per KV head and read by all query heads of
its group. Recurrence per KV head: ``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t`` and
``o_t = scale * q_t S_t``. Document boundaries come as ``cu_seqlens`` (B must be 1), as in
fla and flash-attn varlen: the state restarts from ``initial_state[n]`` (or zero) at each.
"""

from __future__ import annotations

import torch


def expand_gate(g: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scalar-per-head decay ``[B,T,Hkv]`` -> per-key-dim ``[B,T,Hkv,Dk]``."""
    if g.dim() == k.dim() - 1:
        return g.unsqueeze(-1).expand_as(k)
    return g


def check_gla_args(q, k, v, g, initial_state=None, cu_seqlens=None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gla expects q, k, v as [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, Hq, Dk = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[-1] != Dk:
        raise ValueError(f"gla: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv or Hq % Hkv:
        raise ValueError(f"gla: {Hq} query heads must be a multiple of {Hkv} key/value heads (v has {v.shape[2]})")
    if g.shape[:3] != k.shape[:3] or (g.dim() == 4 and g.shape[-1] != Dk):
        raise ValueError(f"gla: gate {tuple(g.shape)} must be [B,T,Hkv] or [B,T,Hkv,Dk] for k {tuple(k.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"gla: cu_seqlens needs batch size 1 (packed), got B={B}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(f"gla: cu_seqlens must rise from 0 to T={T} (document boundaries of the packed row); got {bounds}")
    n = (cu_seqlens.numel() - 1) if cu_seqlens is not None else B
    if initial_state is not None and tuple(initial_state.shape) != (n, Hkv, Dk, v.shape[-1]):
        raise ValueError(
            f"gla: initial_state {tuple(initial_state.shape)} must be [{n}, {Hkv}, {Dk}, {v.shape[-1]}]"
        )


def segments(T: int, B: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int, int]]:
    """``(sequence index n, batch row b, start, end)`` of every sequence the state runs over."""
    if cu_seqlens is None:
        return [(b, b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(n, 0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def gla_step_reference(q, k, v, g, state, scale: float | None = None):
    """One decode step. q ``[B,Hq,Dk]``, k/g ``[B,Hkv,Dk]`` (g may be ``[B,Hkv]``), v ``[B,Hkv,Dv]``,
    state ``[B,Hkv,Dk,Dv]`` (fp32). Returns (o ``[B,Hq,Dv]`` in q's dtype, new state in fp32, or fp64
    for fp64 inputs)."""
    B, Hq, Dk = q.shape
    Hkv = k.shape[1]
    scale = Dk**-0.5 if scale is None else scale
    if g.dim() == 2:
        g = g.unsqueeze(-1).expand_as(k)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math; fp64 when run as the fp64 oracle
    state = state.to(acc) * g.to(acc).exp().unsqueeze(-1) + k.to(acc).unsqueeze(-1) * v.to(acc).unsqueeze(-2)
    qg = q.to(acc).view(B, Hkv, Hq // Hkv, Dk) * scale
    o = torch.einsum("bhgk,bhkv->bhgv", qg, state).reshape(B, Hq, -1)
    return o.to(q.dtype), state


def gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
):
    """Gated linear attention, token by token (the reference for every backend).

    ``g`` is the log-decay: ``[B,T,Hkv,Dk]`` (GLA, per key dim) or ``[B,T,Hkv]`` (scalar);
    the key-tied decay of the 76B's linear branch is ``g = log(1 - k)`` computed by the caller.
    Returns ``(o [B,T,Hq,Dv] in q's dtype, final_state [N,Hkv,Dk,Dv] fp32 or None)``.
    ``chunk_size`` is accepted for signature compatibility and ignored.
    """
    check_gla_args(q, k, v, g, initial_state, cu_seqlens)
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    g = expand_gate(g, k)
    acc = torch.promote_types(q.dtype, torch.float32)
    o = q.new_zeros(B, T, Hq, Dv, dtype=acc)
    finals = []
    for n, b, s, e in segments(T, B, cu_seqlens):
        if initial_state is not None:
            state = initial_state[n].to(acc).unsqueeze(0)
        else:
            state = q.new_zeros(1, Hkv, Dk, Dv, dtype=acc)
        for t in range(s, e):
            out, state = gla_step_reference(q[b : b + 1, t], k[b : b + 1, t], v[b : b + 1, t], g[b : b + 1, t], state, scale)
            o[b, t] = out[0].to(acc)
        finals.append(state[0])
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final
