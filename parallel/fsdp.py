"""FSDP2 (``fully_shard``) wrapping, TorchTitan's way: each unit (a block, or a block's experts)
is its own FSDP group so only one unit's full parameters live at a time, then the root.

The mixed-precision policy gathers parameters in ``param_dtype`` (bf16: the fp32 master copy
stays sharded) and reduces gradients in ``reduce_dtype`` (fp32 by default, as the report's
recipe wants for stability). Gradients are *averaged* over the FSDP mesh; the trainer scales its
objective by the number of ranks averaged over, so the result is the global-batch gradient.

Expert parameters that expert parallelism already split over the ``ep`` ranks are wrapped on
their own mesh (``dp_shard / ep x cp``): each expert's gradient gathers tokens from every ep
rank, so it is the sum over ``ep`` times as many ranks as that mesh averages over. The missing
factor is applied after backward by :func:`scale_expert_grads` (FSDP's
``set_gradient_divide_factor`` would fuse it into the reduce-scatter, but needs PREMUL_SUM,
which gloo lacks). When that mesh is a single rank the experts stay out of FSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_fsdp(
    model: nn.Module,
    units: list[nn.Module],
    mesh: DeviceMesh | None,
    *,
    expert_units: list[nn.Module] = (),
    expert_mesh: DeviceMesh | None = None,
    param_dtype: str = "fp32",
    reduce_dtype: str = "fp32",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` over ``mesh`` (1-D FSDP or 2-D HSDP), one FSDP unit per entry of ``units``.

    ``expert_units`` (modules whose parameters are already EP-sharded DTensors) get their own
    units on ``expert_mesh``; when ``expert_mesh`` is None they are left out of FSDP. Either
    way the caller divides their gradients by what FSDP does not (:func:`scale_expert_grads`).
    """
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    ignored: set[nn.Parameter] = set()
    for unit in expert_units:
        if expert_mesh is None:
            ignored.update(unit.parameters())
            continue
        fully_shard(unit, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for i, unit in enumerate(units):
        # The last unit's parameters are needed again at once by backward: keep them gathered.
        reshard = reshard_after_forward and i < len(units) - 1
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard,
                    ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
    return model


@torch.no_grad()
def scale_expert_grads(expert_units: list[nn.Module], factor: float) -> None:
    """Divide the gradients of EP-sharded expert parameters by the part of the dp x cp average
    that FSDP did not apply."""
    for unit in expert_units:
        for p in unit.parameters():
            if p.grad is not None:
                p.grad.div_(factor)


__all__ = ["apply_fsdp", "scale_expert_grads"]
