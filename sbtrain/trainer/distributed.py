"""From a validated ``parallel.*`` config to a parallelized model, TorchTitan's order:

    tensor parallel -> expert parallel -> (context parallel: per forward, in the trainer)
    -> activation checkpointing -> compile -> FSDP

Each step is one call into ``parallel/`` (model-agnostic) or the model's own plan
(``sbtrain.models.parallelize``); this module only knows the order and which modules are
blocks and experts.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn

from operators.platform import process_group_backend
from parallel.activation_checkpoint import apply_activation_checkpointing, compile_blocks
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelMesh
from sbtrain.config.model import ConfigError

log = logging.getLogger("sbtrain.train")


def init_process_group(device: torch.device, timeout_s: float = 1800.0) -> int:
    """Join the job's process group when launched by torchrun / srun (WORLD_SIZE > 1); returns
    the world size (1 for a plain single-process run, which needs no group).

    ``timeout_s`` (``parallel.collective_timeout_s``) bounds every collective of the job: the
    world group's and, through c10d's module default, every sub-group the device mesh creates
    later (``new_group`` without a timeout takes that default, 30 min otherwise)."""
    if not timeout_s > 0:
        raise ConfigError(f"parallel.collective_timeout_s={timeout_s} must be a positive number of seconds "
                          "(how long a collective may wait for a hung or lost rank)")
    rank_layout_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = process_group_backend(device_type=device.type)
        timeout = datetime.timedelta(seconds=timeout_s)
        c10d.default_pg_timeout = timeout
        if hasattr(c10d, "default_pg_nccl_timeout"):
            c10d.default_pg_nccl_timeout = timeout
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            # torchrun --max-restarts: the restarted ranks reuse the agent's store, where the dead
            # ranks' gloo addresses still sit under the same keys; connecting to those hangs
            # (seen with torch 2.13). Each restart gets its own key space.
            store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"sbtrain_restart_{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_layout_from_slurm(environ=os.environ) -> None:
    """Ranks started by srun itself, one Slurm task each (the submitit launcher, ``srun -n 8 python
    -m sbtrain.train``), carry no torchrun variables: derive RANK / WORLD_SIZE / LOCAL_RANK and the
    rendezvous from Slurm's. A no-op under torchrun (WORLD_SIZE set) or in a one-task step."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))
    if "WORLD_SIZE" in environ or tasks <= 1 or "SLURM_PROCID" not in environ:
        return
    environ["RANK"], environ["WORLD_SIZE"] = environ["SLURM_PROCID"], str(tasks)
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    # srun starts the tasks from the batch host, the first node of the allocation.
    environ.setdefault("MASTER_ADDR", environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within ``parallel.collective_timeout_s``: some rank of its
    group hung, died or skipped it. The message names this rank, the op and where it was."""


# The torch.distributed calls whose name a timeout report gives (sbtrain, FSDP2 and DeepSpeed all
# go through these module attributes; DTensor's functional collectives are reported by position).
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
    "reduce", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)
# What the backends say when a peer never answers: gloo "Timed out waiting 3000ms for recv
# operation", NCCL's watchdog "collective operation timeout"; a peer that died: "Connection closed".
_FAILURE_MARKERS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")
_last_collective = threading.local()


def _is_collective_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _FAILURE_MARKERS)


def _describe_failure(exc: BaseException, op: str, where: str, timeout_s: float) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    lost = "timed out" if "time" in str(exc).lower() else "lost its peer"
    return (f"rank {rank} of {world}: collective {op} {lost} at {where} (parallel.collective_timeout_s="
            f"{timeout_s:g}): another rank hung, died or skipped this collective; the other ranks' logs say "
            f"which, and the newest checkpoint resumes the run. Backend said: {exc}")


def _named(op: str, fn: Callable, where: Callable[[], str], timeout_s: float) -> Callable:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        _last_collective.op = op
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if _is_collective_failure(exc) and not isinstance(exc, CollectiveTimeoutError):
                raise CollectiveTimeoutError(_describe_failure(exc, op, where(), timeout_s)) from exc
            raise

    call.__sbtrain_named__ = True
    return call


@contextlib.contextmanager
def report_collective_timeouts(timeout_s: float, where: Callable[[], str] = lambda: "an unknown step") -> Iterator[None]:
    """Within this block a collective that times out (or loses a peer) raises
    :class:`CollectiveTimeoutError` naming this rank, the op (``all_reduce``, ...) and ``where()``
    (e.g. "step 12") instead of the backend's bare "Timed out waiting 3000ms for recv operation".
    An asynchronous op that fails later, in ``Work.wait()``, is named by the last op issued."""
    patched = {}
    for op in _COLLECTIVES:
        fn = getattr(dist, op, None)
        if fn is not None and not getattr(fn, "__sbtrain_named__", False):
            patched[op] = fn
            setattr(dist, op, _named(op, fn, where, timeout_s))
    try:
        yield
    except RuntimeError as exc:
        if _is_collective_failure(exc) and not isinstance(exc, CollectiveTimeoutError):
            op = getattr(_last_collective, "op", "an unnamed collective")
            raise CollectiveTimeoutError(_describe_failure(exc, f"{op} (last issued)", where(), timeout_s)) from exc
        raise
    finally:
        for op, fn in patched.items():
            setattr(dist, op, fn)


def make_mesh(dims, device: torch.device) -> ParallelMesh | None:
    """The device mesh for resolved degrees (``ParallelDims``); None for a single process."""
    if not dist.is_initialized() or dims.world_size == 1:
        return None
    with warnings.catch_warnings():
        # HSDP slices a flattened dim from the root mesh; torch warns about the API's future.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return dims.build_mesh(device.type)


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


def build_parallel_model(model_cfg, mesh: ParallelMesh | None, pcfg, tcfg, device: torch.device,
                         init_from: str | None = None) -> tuple[nn.Module, dict, dict]:
    """Build, shard, materialise and initialise (or load) the model; returns (model, the layout
    info of :func:`parallelize`, the parameter counts of the whole model).

    With a mesh and the FSDP engine, TorchTitan's order: build on ``meta`` -> TP -> EP -> (CP)
    -> activation checkpointing -> compile -> FSDP -> ``to_empty(device)`` -> per-parameter seeded
    init of the local shards (equal to a full build, :func:`sbtrain.models.build.init_weights`) ->
    ``init_from`` read shard by shard (:func:`sbtrain.trainer.init_from.load_weights`). No rank ever
    holds more than its shards plus one init block / one tensor being read.

    Single process, and the DeepSpeed engine (ZeRO partitions a whole, plain model after the
    fact; deepspeed.zero.Init would need its own construction path), build on the device in
    full as before; the per-parameter seeding makes those weights equal to the meta path's."""
    from sbtrain.models.build import build_model, count_parameters, init_weights
    from sbtrain.trainer.init_from import load_weights

    if mesh is None or pcfg.engine != "fsdp":
        model = build_model(model_cfg, device=device)
        if init_from:
            load_weights(model, init_from)
        counts = count_parameters(model)
        return model, parallelize(model, mesh, pcfg, tcfg), counts
    model = build_model(model_cfg, device="meta")  # draws model.init_seed: same RNG use as a full build
    counts = count_parameters(model)
    info = parallelize(model, mesh, pcfg, tcfg)
    model.to_empty(device=device)
    if model_cfg.tie_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("tied embeddings came apart in to_empty: re-tie them before sharding")
    if init_from:
        load_weights(model, init_from)  # every tensor is overwritten: no init needed
        # (the expert-bias buffer is in the state dict too, so nothing is left uninitialised)
    else:
        init_weights(model)
    return model, info, counts


__all__ = ["CollectiveTimeoutError", "build_parallel_model", "init_process_group", "make_mesh", "parallelize", "rank_layout_from_slurm",
           "report_collective_timeouts"]
