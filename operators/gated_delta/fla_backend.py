"""flash-linear-attention backends: ``fla`` for ``ops.gated_delta`` (``chunk_gated_delta_rule``)
and ``fla`` for ``ops.gated_delta_step`` (``fused_recurrent_gated_delta_rule`` on one token).

fla is imported lazily, so this module imports without it. Layout ``[B, T, H, D]`` (fla-core
0.6.0 has no ``head_first``; an older version that still has it gets ``head_first=False``).
``use_qk_l2norm_in_kernel`` stays False: the op takes q and k already normalised by the mixer.

GQA (Hq != Hkv): fla's GVA is the other way round (more value heads than q/k heads), so k, v,
g, beta and the initial state are expanded to Hq heads (``repeat_interleave``, query head h
reads KV head h // G) for the kernel only; the G copies of a KV head's state are identical and
the final state returned is one copy per KV head. Gradients are exact (the expansion's backward
sums over the group).

The step op: ``fused_recurrent_gated_delta_rule`` has no backward, so a step whose inputs need
gradients runs ``chunk_gated_delta_rule`` on the length-1 sequence instead (same result).

What fla's kernels cannot do, ``accepts`` declines (the chunked backend takes the call):
- Dk over 256 (fla asserts K <= 256), head dims under 16 (Triton's ``tl.dot`` needs K >= 16),
  odd head dims in fp16/bf16 (fla's ``chunk_bwd_dv`` asserts even K and V there).
- tensors off CUDA, except CPU tensors when Triton's interpreter is on (below).

CPU tensors under ``TRITON_INTERPRET=1`` (decided once, when this module is imported), exactly
as ``operators/gla/fla_backend.py``: the backends then also list the ``cpu`` platform and run
fla's kernels through Triton's interpreter (``operators/triton_interpreter.py`` installs the
shims), so tests check these wrappers on a CPU box. bf16 is declined there: the interpreter
computes bf16 ``tl.dot`` wrongly.
"""

from __future__ import annotations

import torch

from operators.fla_common import CPU_VIA_INTERPRETER, PLATFORMS, decline_device, fla_available, layout_kwargs
from operators.gated_delta.naive import check_gated_delta_args, check_gated_delta_step_args
from operators.gated_delta.op import gated_delta, gated_delta_step
from operators.registry import Backend
from operators.triton_interpreter import install_shims

MAX_KEY_DIM = 256
MIN_HEAD_DIM = 16


def _fla_available() -> bool:
    return fla_available("fla.ops.gated_delta_rule")  # raises ImportError when fla is missing -> unavailable


def _decline(q, k, v) -> str | None:
    reason = decline_device(q)
    if reason:
        return reason
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dk > MAX_KEY_DIM:
        return f"key head dim {Dk} exceeds fla's {MAX_KEY_DIM}"
    if min(Dk, Dv) < MIN_HEAD_DIM:
        return f"head dims {Dk}/{Dv} are below {MIN_HEAD_DIM} (Triton's tl.dot needs K >= 16)"
    if q.dtype in (torch.float16, torch.bfloat16) and (Dk % 2 or Dv % 2):
        return f"odd head dims {Dk}/{Dv} in {q.dtype} (fla's chunk_bwd_dv needs even K and V)"
    return None


def _accepts(q, k, v, *args, **kwargs) -> str | None:
    return _decline(q, k, v)


def _expand(group: int, dim: int, *tensors):
    if group == 1:
        return tensors
    return tuple(t.repeat_interleave(group, dim=dim) for t in tensors)


def _one_per_kv_head(state: torch.Tensor, group: int) -> torch.Tensor:
    state = state.float()
    if group > 1:  # the G copies are identical: keep one per KV head
        state = state.unflatten(1, (-1, group))[:, :, 0]
    return state


def _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """fla's chunk kernel on already expanded (Hq-headed) inputs."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=cu_seqlens,
        **dict(layout_kwargs(chunk_gated_delta_rule)),
    )


def gated_delta_fla(
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
    """``ops.gated_delta`` via fla's ``chunk_gated_delta_rule``."""
    check_gated_delta_args(q, k, v, g, beta, initial_state, cu_seqlens)
    reason = _decline(q, k, v)
    if reason:
        raise ValueError(
            f"gated_delta backend fla: {reason}; use the chunked backend (SBTRAIN_OPS=gated_delta:chunked)"
        )
    if CPU_VIA_INTERPRETER:
        install_shims()  # idempotent; direct calls (call_backend) skip _available()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    group = q.shape[2] // k.shape[2]
    k, v, g, beta = _expand(group, 2, k, v, g, beta)
    if initial_state is not None:
        (initial_state,) = _expand(group, 1, initial_state.float())
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.long()
    o, final = _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    if output_final_state and final is not None:
        return o.to(q.dtype), _one_per_kv_head(final, group)
    return o.to(q.dtype), None


def _step_needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gated_delta_step_fla(q, k, v, g, beta, state, scale: float | None = None):
    """One decode step via ``fused_recurrent_gated_delta_rule`` on a length-1 sequence (that
    kernel has no backward: when a gradient is wanted, fla's chunk kernel on one token)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    check_gated_delta_step_args(q, k, v, g, beta, state)
    reason = _decline(q, k, v)
    if reason:
        raise ValueError(f"gated_delta_step backend fla: {reason}")
    if CPU_VIA_INTERPRETER:
        install_shims()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    group = q.shape[1] // k.shape[1]
    needs_grad = _step_needs_grad(q, k, v, g, beta, state)
    k, v, g, beta, state = _expand(group, 1, k, v, g, beta, state.float())
    q, k, v, g, beta = (t.unsqueeze(1) for t in (q, k, v, g, beta))
    if needs_grad:
        o, new_state = _chunk(q, k, v, g, beta, scale, state, True, None)
    else:
        o, new_state = fused_recurrent_gated_delta_rule(
            q,
            k,
            v,
            g=g,
            beta=beta,
            scale=scale,
            initial_state=state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=False,
            **dict(layout_kwargs(fused_recurrent_gated_delta_rule)),
        )
    return o[:, 0].to(q.dtype), _one_per_kv_head(new_state, group)


gated_delta.register(
    Backend(name="fla", fn=gated_delta_fla, priority=20, platforms=PLATFORMS, is_available=_fla_available, accepts=_accepts)
)
gated_delta_step.register(
    Backend(
        name="fla", fn=gated_delta_step_fla, priority=20, platforms=PLATFORMS, is_available=_fla_available, accepts=_accepts
    )
)
