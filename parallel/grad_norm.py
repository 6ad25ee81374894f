"""Global gradient norm and clipping across every mesh a model's parameters live on.

``torch.nn.utils.clip_grad_norm_`` cannot mix DTensors of different meshes (dense parameters
on the FSDP x TP mesh, experts on the EP mesh, plain tensors in single-process runs), so the
norm is taken per mesh — each a reduction over the ranks that hold that mesh's shards — and
the per-mesh norms are combined: ``sqrt(sum of squares)``. Every rank gets the same number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def global_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else "local"
        groups.setdefault(key, []).append(p.grad)
    total = torch.zeros((), dtype=torch.float64)
    for key, grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total += norm.double().cpu() ** 2
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip to ``max_norm`` (None or 0: measure only); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = float(global_grad_norm(params))
    if max_norm and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(coef)
    return norm


__all__ = ["clip_grad_norm_", "global_grad_norm"]
