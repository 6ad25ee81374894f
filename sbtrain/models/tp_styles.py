"""Tensor-parallel building blocks the per-kind plans share (``sbtrain.models.parallelize`` applies
them; each mixer kind's ``tensor_parallel`` in ``sbtrain/models/mixers/`` picks its own)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


class ReplicatedCompute(ParallelStyle):
    """Parameters become ``Replicate`` DTensors, but the module runs on plain local tensors (its
    parameters swapped for differentiable local views during the forward): for modules whose ops
    have no DTensor sharding rules (MoE dispatch, grouped GEMM) and whose inputs are identical on
    every rank, so every rank computes the same full gradient (a ``Replicate`` gradient)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        slots = []
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is None:
                    continue
                dist_param = nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()]), param.requires_grad)
                owner.register_parameter(name, dist_param)
                slots.append((owner, name))
        compute = module.forward

        def forward_on_local_parameters(*args, **kwargs):
            saved = [owner._parameters[name] for owner, name in slots]
            try:
                for (owner, name), param in zip(slots, saved):
                    owner._parameters[name] = param.to_local()  # autograd carries the grad back to the DTensor
                return compute(*args, **kwargs)
            finally:
                for (owner, name), param in zip(slots, saved):
                    owner._parameters[name] = param

        module.forward = forward_on_local_parameters
        return module


class ShardParameters(ParallelStyle):
    """Shard named parameters of a module (no input / output handling): the module reads them with
    :func:`sbtrain.models.layers.local_tensor` (hybrid sinks by KV head, betas by channel)."""

    def __init__(self, placements: dict[str, int]):
        self.placements = placements

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, dim in self.placements.items():
            param = getattr(module, name)
            if param is not None:
                module.register_parameter(name, nn.Parameter(distribute_tensor(param, device_mesh, [Shard(dim)])))
        return module


def _as_replicate_dtensor(module, inputs, device_mesh):
    """Input hook: a plain (replicated) input becomes a ``Replicate`` DTensor for DTensor compute."""
    x = inputs[0]
    return x if isinstance(x, DTensor) else DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)


def replicate_on_input(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Replicated parameters, computed as DTensors on a replicated input (e.g. GLA's rank-16 gate)."""
    distribute_module(module, tp_mesh, input_fn=_as_replicate_dtensor)


def head_norm_style() -> ParallelStyle:
    """Per-head norms on this rank's heads (``[B,T,H_local,D]`` = "Shard(2)"): replicated weight, its
    grad a partial sum over the ranks' heads (all-reduced by the plan's grad hook)."""
    return SequenceParallel(sequence_dim=2, use_local_output=True)


def qkvo_plan(residual, prefix: str = "") -> dict[str, ParallelStyle]:
    """Whole heads per rank: q/k/v column-parallel, o_proj row-parallel back to the residual layout."""
    plan: dict[str, ParallelStyle] = {f"{prefix}{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
    plan[f"{prefix}o_proj"] = RowwiseParallel(output_layouts=residual)
    return plan


def shard_mixer(mixer: nn.Module, tp_mesh: DeviceMesh, residual, plan: dict[str, ParallelStyle]) -> None:
    """Gather the sequence at the mixer's input (sequence parallelism), then apply ``plan``."""
    parallelize_module(mixer, tp_mesh, PrepareModuleInput(input_layouts=(residual, None),
                                                          desired_input_layouts=(Replicate(), None)))
    parallelize_module(mixer, tp_mesh, plan)


__all__ = ["ReplicatedCompute", "ShardParameters", "head_norm_style", "qkvo_plan", "replicate_on_input",
           "shard_mixer"]
