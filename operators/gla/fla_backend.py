"""flash-linear-attention backends (CUDA only): ``fla`` for ``ops.gla`` (``chunk_gla``) and
``fla`` for ``ops.gla_step`` (``fused_recurrent_gla`` on one token).

fla is imported lazily, so this module imports without it. Layout is pinned to [B, T, H, D]:
fla >= 0.2 uses it by default; the versions that still have a ``head_first`` argument default
it to True (head-first), so we pass ``head_first=False`` whenever the signature has it.

What fla's GLA kernels cannot do, ``accepts`` declines (the chunked backend takes the call):
- GQA (Hq != Hkv): ``chunk_gla`` needs q, k, v, g with the same head count. Expanding k/v/g to
  Hq heads would also need the final state and its gradient reduced per KV head, and gives up
  the 7x smaller state the design keeps; declined instead.
- head dims over 256 (fla's block sizes are tuned up to 256).
- tensors off CUDA.
Scalar gates ``[B,T,Hkv]`` are expanded to per-dim (a view; autograd sums the gradient back).
"""

from __future__ import annotations

import functools
import inspect

import torch

from operators.gla.reference import check_gla_args, expand_gate
from operators.ops import gla, gla_step
from operators.registry import Backend

MAX_HEAD_DIM = 256


def _available() -> bool:
    if not torch.cuda.is_available():
        return False
    import fla  # noqa: F401  (raises ImportError when fla is missing -> unavailable)

    return True


@functools.cache
def _layout_kwargs(fn) -> tuple:
    """``(("head_first", False),)`` if this fla version still takes head_first, else ()."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    return (("head_first", False),) if "head_first" in params else ()


def _decline(q, k, v) -> str | None:
    if q.device.type != "cuda":
        return f"fla runs on CUDA tensors only, got {q.device.type}"
    if q.shape[-2] != k.shape[-2]:
        return f"fla GLA has no GQA: {q.shape[-2]} query heads vs {k.shape[-2]} key/value heads"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} exceed fla's {MAX_HEAD_DIM}"
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
    g = expand_gate(g, k)
    if initial_state is not None:
        initial_state = initial_state.float()
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
        **dict(_layout_kwargs(chunk_gla)),
    )
    return o.to(q.dtype), (final.float() if output_final_state and final is not None else None)


def _step_accepts(q, k, v, g, state, *args, **kwargs) -> str | None:
    return _decline(q, k, v)


def gla_step_fla(q, k, v, g, state, scale: float | None = None):
    """One decode step via ``fused_recurrent_gla`` on a length-1 sequence."""
    from fla.ops.gla import fused_recurrent_gla

    reason = _decline(q, k, v)
    if reason:
        raise ValueError(f"gla_step backend fla: {reason}")
    g = g.unsqueeze(-1).expand_as(k) if g.dim() == 2 else g
    o, new_state = fused_recurrent_gla(
        q.unsqueeze(1),
        k.unsqueeze(1),
        v.unsqueeze(1),
        gk=g.unsqueeze(1),
        scale=scale,
        initial_state=state.float(),
        output_final_state=True,
        **dict(_layout_kwargs(fused_recurrent_gla)),
    )
    return o[:, 0].to(q.dtype), new_state.float()


gla.register(
    Backend(name="fla", fn=gla_fla, priority=20, platforms=("cuda",), is_available=_available, accepts=_gla_accepts)
)
gla_step.register(
    Backend(
        name="fla", fn=gla_step_fla, priority=20, platforms=("cuda",), is_available=_available, accepts=_step_accepts
    )
)
