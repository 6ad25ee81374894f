"""``fla_maca``: GLA (``ops.gla``, ``ops.gla_step``) through fla's kernels with the MetaX autotune
limits in force (the tables and machinery: :mod:`operators.maca`)."""

from __future__ import annotations

from operators.gla.op import gla, gla_step
from operators.maca import (
    PLATFORMS,
    _apply_tuning,
    _available,
    _decline_cpu,
    _decline_dtype,
    register_tuning,
)
from operators.registry import Backend

register_tuning("gla", {"block_k": 64, "block_v": 64, "num_warps": 4, "num_stages": 2},
                ("fla.ops.gla.chunk", "fla.ops.common.chunk_h", "fla.ops.common.chunk_o", "fla.ops.utils.cumsum"))
register_tuning("gla_step", {"block_k": 64, "block_v": 64, "num_warps": 2, "num_stages": 1},
                ("fla.ops.gla.fused_recurrent", "fla.ops.common.fused_recurrent"))


def _gla_accepts(q, k, v, g, *args, **kwargs) -> str | None:
    from operators.gla import fla_backend

    return _decline_dtype(q) or _decline_cpu(q) or fla_backend._gla_accepts(q, k, v, g, *args, **kwargs)


def _step_accepts(q, k, v, g, state, *args, **kwargs) -> str | None:
    from operators.gla import fla_backend

    return _decline_dtype(q) or _decline_cpu(q) or fla_backend._step_accepts(q, k, v, g, state, *args, **kwargs)


def gla_fla_maca(q, k, v, g, **kwargs):
    """``ops.gla`` through fla's ``chunk_gla`` with the MetaX autotune limits in force."""
    from operators.gla.fla_backend import gla_fla

    _apply_tuning("gla")
    return gla_fla(q, k, v, g, **kwargs)


def gla_step_fla_maca(q, k, v, g, state, scale: float | None = None):
    """``ops.gla_step`` through fla's ``fused_recurrent_gla`` with the MetaX limits in force."""
    from operators.gla.fla_backend import gla_step_fla

    _apply_tuning("gla_step")
    return gla_step_fla(q, k, v, g, state, scale=scale)


# Priority above fla (20): on a maca process both accept, and the MetaX-tuned one must win.
gla.register(Backend(name="fla_maca", fn=gla_fla_maca, priority=21, platforms=PLATFORMS,
                     is_available=_available, accepts=_gla_accepts))
gla_step.register(Backend(name="fla_maca", fn=gla_step_fla_maca, priority=21, platforms=PLATFORMS,
                          is_available=_available, accepts=_step_accepts))
