"""flash-linear-attention backends (CUDA): ``fla`` for ``ops.gla`` (``chunk_gla``) and
``fla`` for ``ops.gla_step`` (``fused_recurrent_gla`` on one token).

fla is imported lazily, so this module imports without it. Layout is pinned to [B, T, H, D]:
fla >= 0.2 uses it by default; the versions that still have a ``head_first`` argument default
it to True (head-first), so we pass ``head_first=False`` whenever the signature has it.

GQA (Hq != Hkv): fla's ``chunk_gla`` needs q, k, v, g with one head count, so k, v, g and the
initial state are expanded to Hq heads (``repeat_interleave``, query head h reads KV head
h // G) for the kernel only; the G copies of a KV head's state are identical, and the final
state returned is one copy per KV head, so callers still see the GQA-sized state. The kernel
does G times the state work of a GQA-aware one (no fla GLA kernel is GQA-aware); gradients
are exact (the expansion's backward sums over the group).

What fla's GLA kernels cannot do, ``accepts`` declines (the chunked backend takes the call):
- head dims over 256 (fla's block sizes are tuned up to 256) or under 16 (Triton's dot).
- tensors off CUDA, except CPU tensors when Triton's interpreter is on (below).
Scalar gates ``[B,T,Hkv]`` are expanded to per-dim (a view; autograd sums the gradient back).

CPU tensors under ``TRITON_INTERPRET=1`` (decided once, when this module is imported): the
backends then also list the ``cpu`` platform and run fla's kernels through Triton's interpreter
(``operators/triton_interpreter.py`` installs the shims it needs), so CI checks these wrappers
(GQA expansion, per-KV-head state, scalar gates, varlen, initial state) on a CPU box
(``tests/operators/test_fla_interpreter.py``). bf16 is declined there: the interpreter computes
bf16 ``tl.dot`` wrongly. Without the variable nothing changes: CUDA only, as before.
"""

from __future__ import annotations

import torch

from operators.fla_common import CPU_VIA_INTERPRETER, PLATFORMS, decline_device, fla_available, layout_kwargs
from operators.gla.op import gla, gla_step
from operators.gla.reference import check_gla_args, expand_gate
from operators.registry import Backend
from operators.triton_interpreter import install_shims

MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 16


def _fla_available() -> bool:
    return fla_available("fla")  # raises ImportError when fla is missing -> unavailable


def _decline(q, k, v) -> str | None:
    reason = decline_device(q)
    if reason:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} exceed fla's {MAX_HEAD_DIM}"
    if min(q.shape[-1], v.shape[-1]) < MIN_HEAD_DIM:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} are below {MIN_HEAD_DIM} (Triton's tl.dot needs K >= 16)"
    return None


def _gla_accepts(q, k, v, g, *args, **kwargs) -> str | None:
    return _decline(q, k, v)


def gla_fla(
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
    """``ops.gla`` via fla's ``chunk_gla`` (fla picks its own chunk size; ``chunk_size`` is ignored)."""
    from fla.ops.gla import chunk_gla

    check_gla_args(q, k, v, g, initial_state, cu_seqlens)
    reason = _decline(q, k, v)
    if reason:
        raise ValueError(f"gla backend fla: {reason}; use the chunked backend (SBTRAIN_OPS=gla:chunked)")
    if CPU_VIA_INTERPRETER:
        install_shims()  # idempotent; direct calls (call_backend) skip _available()
    g = expand_gate(g, k)
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v, g = (t.repeat_interleave(group, dim=2) for t in (k, v, g))
    if initial_state is not None:
        initial_state = initial_state.float()
        if group > 1:
            initial_state = initial_state.repeat_interleave(group, dim=1)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.long()
    o, final = chunk_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **dict(layout_kwargs(chunk_gla)),
    )
    if output_final_state and final is not None:
        final = final.float()
        if group > 1:  # the G copies are identical: keep one per KV head
            final = final.unflatten(1, (-1, group))[:, :, 0]
        return o.to(q.dtype), final
    return o.to(q.dtype), None


def _step_accepts(q, k, v, g, state, *args, **kwargs) -> str | None:
    return _decline(q, k, v)


def gla_step_fla(q, k, v, g, state, scale: float | None = None):
    """One decode step via ``fused_recurrent_gla`` on a length-1 sequence."""
    from fla.ops.gla import fused_recurrent_gla

    reason = _decline(q, k, v)
    if reason:
        raise ValueError(f"gla_step backend fla: {reason}")
    if CPU_VIA_INTERPRETER:
        install_shims()
    g = g.unsqueeze(-1).expand_as(k) if g.dim() == 2 else g
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v, g = (t.repeat_interleave(group, dim=1) for t in (k, v, g))
        state = state.repeat_interleave(group, dim=1)
    o, new_state = fused_recurrent_gla(
        q.unsqueeze(1),
        k.unsqueeze(1),
        v.unsqueeze(1),
        gk=g.unsqueeze(1),
        scale=scale,
        initial_state=state.float(),
        output_final_state=True,
        **dict(layout_kwargs(fused_recurrent_gla)),
    )
    new_state = new_state.float()
    if group > 1:
        new_state = new_state.unflatten(1, (-1, group))[:, :, 0]
    return o[:, 0].to(q.dtype), new_state


gla.register(
    Backend(name="fla", fn=gla_fla, priority=20, platforms=PLATFORMS, is_available=_fla_available, accepts=_gla_accepts)
)
gla_step.register(
    Backend(
        name="fla", fn=gla_step_fla, priority=20, platforms=PLATFORMS, is_available=_fla_available, accepts=_step_accepts
    )
)
