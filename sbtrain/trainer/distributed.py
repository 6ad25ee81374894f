"""From a validated ``parallel.*`` config to a parallelized model, TorchTitan's order:

    tensor parallel -> expert parallel -> (context parallel: per forward, in the trainer)
    -> activation checkpointing -> compile -> FSDP

Each step is one call into ``parallel/`` (model-agnostic) or the model's own plan
(``sbtrain.models.parallelize``); this module only knows the order and which modules are
blocks and experts.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from operators.platform import communication_backend
from parallel.activation_checkpoint import apply_activation_checkpointing, compile_blocks
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelMesh, build_mesh

log = logging.getLogger("sbtrain.train")


def init_process_group(device: torch.device, timeout_s: float = 1800.0) -> int:
    """Join the job's process group when launched by torchrun / srun (WORLD_SIZE > 1); returns
    the world size (1 for a plain single-process run, which needs no group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = communication_backend() if device.type != "cpu" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_world_size() if dist.is_initialized() else 1


def make_mesh(dims, device: torch.device) -> ParallelMesh | None:
    """The device mesh for resolved degrees (``ParallelDims``); None for a single process."""
    if not dist.is_initialized() or dims.world_size == 1:
        return None
    with warnings.catch_warnings():
        # HSDP slices a flattened dim from the root mesh; torch warns about the API's future.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return build_mesh(dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.ep, device.type)


def parallelize(model: nn.Module, mesh: ParallelMesh | None, pcfg, tcfg) -> dict:
    """Apply every parallelism of ``pcfg`` (ParallelConfig) and the trainer's activation
    checkpointing / compile to ``model`` in place. Returns what the trainer must know:
    ``expert_grad_divisor`` (experts outside FSDP whose gradients it divides)."""
    moes = model.moe_layers() if hasattr(model, "moe_layers") else []
    info: dict = {"expert_grad_divisor": None}
    if mesh is not None and mesh.tp > 1:
        from sbtrain.models.parallelize import apply_tensor_parallel

        apply_tensor_parallel(model, mesh.tp_mesh)
    experts = []
    if mesh is not None and mesh.ep > 1:
        from parallel.expert_parallel import shard_experts

        for moe in moes:
            shard_experts(moe.experts, mesh.ep_mesh)
            experts.append(moe.experts)
    if mesh is not None and mesh.cp > 1:
        for moe in moes:
            moe.token_group = mesh.cp_mesh.get_group()  # balance statistics over the whole sequence
    apply_activation_checkpointing(model.model.layers, tcfg.activation_checkpointing)
    if tcfg.compile:
        compile_blocks(model.model.layers)
    if mesh is not None and pcfg.engine == "fsdp":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            apply_fsdp(
                model, list(model.model.layers), mesh.fsdp_mesh,
                expert_units=experts, expert_mesh=mesh.expert_fsdp_mesh,
                param_dtype=pcfg.param_dtype, reduce_dtype=pcfg.reduce_dtype,
                reshard_after_forward=pcfg.reshard_after_forward,
            )
        if experts:
            # Expert gradients sum tokens from all ep ranks; FSDP (if any) averages over the
            # expert mesh only, so the rest of the dp x cp average is applied after backward.
            # (set_gradient_divide_factor would fuse it, but gloo lacks PREMUL_SUM.)
            averaged = mesh.expert_fsdp_mesh.size() if mesh.expert_fsdp_mesh is not None else 1
            info["expert_grad_divisor"] = (experts, float(mesh.grad_reduce_size // averaged))
    if mesh is not None:
        log.info("parallel layout: %s, engine %s", mesh.describe(), pcfg.engine)
    return info


__all__ = ["init_process_group", "make_mesh", "parallelize"]
