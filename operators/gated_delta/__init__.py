"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks"; the linear mixer of
Qwen3-Next): ops ``gated_delta`` (a sequence) and ``gated_delta_step`` (one decode token).

Per KV head the state ``S`` ``[Dk, Dv]`` follows the gated delta rule::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

with a scalar log-decay ``g_t <= 0`` and a write strength ``beta_t`` in (0, 1) per head and
token: the state forgets (gate), then overwrites what it stored under key ``k_t`` with ``v_t``
(delta rule) instead of adding to it as linear attention does. q and k are expected
L2-normalised by the caller (the op does not normalise), ``scale`` defaults to ``Dk**-0.5``.

Contract (shapes ``[B, T, H, D]``; GQA: Hq query heads read Hkv KV heads, h -> h // (Hq/Hkv))::

    gated_delta(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None) -> (o [B,T,Hq,Dv], final_state [N,Hkv,Dk,Dv] or None)
    gated_delta_step(q, k, v, g, beta, state, scale=None) -> (o [B,Hq,Dv], new_state [B,Hkv,Dk,Dv])

``cu_seqlens`` packs documents in one row (B = 1); the state restarts at each document from
``initial_state[n]`` or zero. States are fp32 (fp64 for fp64 inputs), o is in q's dtype. Dv may
differ from Dk.

Backends: ``reference`` (``naive.py``, the token loop and float64 oracle), ``chunked``
(``chunked.py``, the WY/UT chunk form in plain torch, any device) and ``fla`` (``fla_backend.py``,
fla's Triton kernels on CUDA; on CPU tensors under ``TRITON_INTERPRET=1``).
"""

# The backends import the op objects from ``op`` themselves, so the order here does not matter.
from operators.gated_delta import chunked as _chunked  # noqa: F401  backend "chunked" (any device)
from operators.gated_delta import fla_backend as _fla  # noqa: F401  backend "fla" (CUDA; CPU under the interpreter)
from operators.gated_delta.op import gated_delta, gated_delta_step

__all__ = ["gated_delta", "gated_delta_step"]
