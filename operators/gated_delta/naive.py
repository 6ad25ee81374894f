"""Plain PyTorch reference of the gated delta rule: the token-by-token recurrence.

Layout ``[B, T, H, D]`` (fla >= 0.2). GQA-aware: q has ``Hq`` heads, k/v/g/beta have ``Hkv``
heads (``Hq % Hkv == 0``); query head h reads KV head ``h // (Hq // Hkv)``. Per KV head the
state ``S`` is ``[Dk, Dv]`` and each token does (fla's form of the GDN recurrence)::

    S = exp(g_t) * S                   # scalar decay per head, g_t <= 0
    u = beta_t * (v_t - S^T k_t)       # the delta: what the state would read at k_t, corrected
    S = S + k_t u^T                    # i.e. S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S^T q_t

The op does not normalise q or k (the mixer applies the L2 norm). Document boundaries come as
``cu_seqlens`` (B must be 1): the state restarts from ``initial_state[n]`` (or zero) at each,
as in ``operators/gla/reference.py``. The math runs in fp32 at least (fp64 for fp64 inputs,
which makes this the float64 oracle of the tests).
"""

from __future__ import annotations

import torch

from operators.gla.reference import segments

__all__ = [
    "check_gated_delta_args",
    "check_gated_delta_step_args",
    "gated_delta_reference",
    "gated_delta_step_reference",
    "segments",
]


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_gated_delta_args(q, k, v, g, beta, initial_state=None, cu_seqlens=None) -> None:
    """Raise ValueError naming the shapes when the arguments do not fit the op's contract."""
    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}, g {_shape(g)}, beta {_shape(beta)}"
    if any(not isinstance(t, torch.Tensor) for t in (q, k, v, g, beta)):
        raise ValueError(f"gated_delta expects tensors q, k, v, g, beta; got {shapes}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gated_delta expects q, k, v as [B, T, H, D]; got {shapes}")
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[-1] != Dk or v.shape[2] != Hkv:
        raise ValueError(
            f"gated_delta: k must be [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] for q [B, T, Hq, Dk]; got {shapes}"
        )
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"gated_delta: {Hq} query heads must be a multiple of {Hkv} key/value heads; got {shapes}")
    if tuple(g.shape) != (B, T, Hkv) or tuple(beta.shape) != (B, T, Hkv):
        raise ValueError(f"gated_delta: g and beta must be [B, T, Hkv] = [{B}, {T}, {Hkv}]; got {shapes}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"gated_delta: cu_seqlens needs batch size 1 (packed), got B={B} ({shapes})")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"gated_delta: cu_seqlens must be 1-D with at least 2 entries, got {_shape(cu_seqlens)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise ValueError(
                f"gated_delta: cu_seqlens must rise from 0 to T={T} (document boundaries of the packed row); got {bounds}"
            )
    n = (cu_seqlens.numel() - 1) if cu_seqlens is not None else B
    if initial_state is not None and tuple(initial_state.shape) != (n, Hkv, Dk, Dv):
        raise ValueError(
            f"gated_delta: initial_state {_shape(initial_state)} must be [{n}, {Hkv}, {Dk}, {Dv}] "
            f"(N={n} {'documents' if cu_seqlens is not None else 'rows'}, Hkv, Dk, Dv) for {shapes}"
        )


def check_gated_delta_step_args(q, k, v, g, beta, state) -> None:
    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}, g {_shape(g)}, beta {_shape(beta)}, state {_shape(state)}"
    if any(not isinstance(t, torch.Tensor) for t in (q, k, v, g, beta, state)):
        raise ValueError(f"gated_delta_step expects tensors q, k, v, g, beta, state; got {shapes}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"gated_delta_step expects q, k, v as [B, H, D]; got {shapes}")
    B, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if k.shape[0] != B or v.shape[0] != B or k.shape[-1] != Dk or v.shape[1] != Hkv:
        raise ValueError(f"gated_delta_step: k must be [B, Hkv, Dk] and v [B, Hkv, Dv] for q [B, Hq, Dk]; got {shapes}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"gated_delta_step: {Hq} query heads must be a multiple of {Hkv} key/value heads; got {shapes}"
        )
    if tuple(g.shape) != (B, Hkv) or tuple(beta.shape) != (B, Hkv):
        raise ValueError(f"gated_delta_step: g and beta must be [B, Hkv] = [{B}, {Hkv}]; got {shapes}")
    if tuple(state.shape) != (B, Hkv, Dk, Dv):
        raise ValueError(f"gated_delta_step: state must be [B, Hkv, Dk, Dv] = [{B}, {Hkv}, {Dk}, {Dv}]; got {shapes}")


def _step(q, k, v, g, beta, state, scale, acc):
    """One token, no argument checks. q [B,Hq,Dk]; k [B,Hkv,Dk]; v [B,Hkv,Dv]; g, beta [B,Hkv];
    state [B,Hkv,Dk,Dv]. Returns (o [B,Hq,Dv] in acc, new state in acc)."""
    B, Hq, Dk = q.shape
    Hkv = k.shape[1]
    k, v = k.to(acc), v.to(acc)
    state = state.to(acc) * g.to(acc).exp()[..., None, None]
    u = beta.to(acc).unsqueeze(-1) * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k.unsqueeze(-1) * u.unsqueeze(-2)
    qg = q.to(acc).view(B, Hkv, Hq // Hkv, Dk) * scale
    o = torch.einsum("bhgk,bhkv->bhgv", qg, state).reshape(B, Hq, -1)
    return o, state


def gated_delta_step_reference(q, k, v, g, beta, state, scale: float | None = None):
    """One decode step. q ``[B,Hq,Dk]``, k ``[B,Hkv,Dk]``, v ``[B,Hkv,Dv]``, g/beta ``[B,Hkv]``,
    state ``[B,Hkv,Dk,Dv]``. Returns (o ``[B,Hq,Dv]`` in q's dtype, new state in fp32, or fp64 for
    fp64 inputs)."""
    check_gated_delta_step_args(q, k, v, g, beta, state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    o, state = _step(q, k, v, g, beta, state, scale, acc)
    return o.to(q.dtype), state


def gated_delta_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Gated delta rule, token by token (the reference for every backend).

    q ``[B,T,Hq,Dk]``, k ``[B,T,Hkv,Dk]``, v ``[B,T,Hkv,Dv]``, g (log-decay, <= 0) and beta (in
    (0, 1)) ``[B,T,Hkv]``; ``scale`` defaults to ``Dk**-0.5``. ``initial_state`` ``[N,Hkv,Dk,Dv]``
    (N = B, or the number of documents with ``cu_seqlens``). Returns ``(o [B,T,Hq,Dv] in q's
    dtype, final_state [N,Hkv,Dk,Dv] in fp32 (fp64 for fp64 inputs) or None)``.
    """
    check_gated_delta_args(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    rows: list[list] = [[None] * T for _ in range(B)]
    finals = []
    for n, b, s, e in segments(T, B, cu_seqlens):
        if initial_state is not None:
            state = initial_state[n].to(acc).unsqueeze(0)
        else:
            state = q.new_zeros(1, Hkv, Dk, Dv, dtype=acc)
        sl = slice(b, b + 1)
        for t in range(s, e):
            out, state = _step(q[sl, t], k[sl, t], v[sl, t], g[sl, t], beta[sl, t], state, scale, acc)
            rows[b][t] = out[0]
        finals.append(state[0])
    if T:
        o = torch.stack([torch.stack(r) for r in rows])
    else:
        o = q.new_zeros(B, 0, Hq, Dv, dtype=acc)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final
