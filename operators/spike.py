"""The spiking neuron of SpikingBrain (docs/DESIGN_NOTES.md §5) as a registered op: ``spike(x, k=3.0)``.

Integrate-and-fire with soft reset and an adaptive threshold, collapsed to one step: per token
(over the last dim) ``V_th = mean(|x|) / k``, integer spike count ``s = round(x / V_th)``,
output ``V_th * s``, so a following linear layer computes ``V_th * (W s)``: the activation is
replaced by an integer count times one scale per token.

Backward is the straight-through estimator: the identity with respect to x (V_th detached, the
rounding and the optional clamp of the count to ``[-max_count, max_count]`` are both passed
through). An all-zero token has ``V_th = 0``: its counts are 0, its output 0 and its gradient
still passes (the division uses a safe denominator, never 0).

Counts and V_th are computed in at least fp32 (a bf16 ``x / V_th`` would round counts above
256); the output is cast back to ``x.dtype``. ``return_counts=True`` also returns the counts as
int32 (for statistics and the spike codings in :mod:`sbtrain.spike.codings`).

The op is defined here with :func:`operators.registry.define_op`, so ``operators.ops`` lists it
once it imports this module; faster backends can register on ``spike`` like on any other op.
"""

from __future__ import annotations

import torch

from operators.registry import define_op


def spike_threshold(x: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """``V_th = mean(|x|) / k`` per token, keepdim, in at least fp32 (no gradient)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return x.detach().to(compute).abs().mean(-1, keepdim=True) / k


def spike_counts(x: torch.Tensor, k: float = 3.0, max_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer counts as a float tensor in the compute dtype, V_th); no gradient."""
    v_th = spike_threshold(x, k)
    # mean(|x|) = 0 only for an all-zero token: divide by 1 there, which yields counts of 0.
    safe = torch.where(v_th > 0, v_th, torch.ones_like(v_th))
    counts = torch.round(x.detach().to(v_th.dtype) / safe)
    if max_count is not None:
        counts = counts.clamp(-max_count, max_count)
    return counts, v_th


class _SpikeSTE(torch.autograd.Function):
    """Forward: ``V_th * round(x / V_th)``; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float, max_count: int | None):
        counts, v_th = spike_counts(x, k, max_count)
        out = (v_th * counts).to(x.dtype)
        counts = counts.to(torch.int32)
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_counts: torch.Tensor | None):
        return grad_out, None, None


def _check(k: float, max_count: int | None) -> None:
    if not k > 0:
        raise ValueError(f"spike k={k} must be positive (V_th = mean(|x|) / k); the default is 3")
    if max_count is not None and max_count < 1:
        raise ValueError(f"spike max_count={max_count} must be >= 1, or None for no clamp")


def spike_reference(
    x: torch.Tensor, k: float = 3.0, max_count: int | None = None, return_counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Spiking quantization of ``x [..., d]`` per token; see the module docstring.

    Returns ``V_th * s`` in ``x.dtype`` (and the int32 counts ``s`` with ``return_counts``)."""
    _check(k, max_count)
    out, counts = _SpikeSTE.apply(x, float(k), max_count)
    return (out, counts) if return_counts else out


spike = define_op("spike", spike_reference)

__all__ = ["spike", "spike_counts", "spike_reference", "spike_threshold"]
