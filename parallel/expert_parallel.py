"""Expert parallelism: all-to-all token dispatch/combine and Shard(0) expert parameters.

Model-agnostic pieces an MoE layer composes (it never calls ``torch.distributed`` itself):

* :func:`shard_experts` turns every ``[E, ...]`` parameter of an experts module into a DTensor
  sharded along the expert dim over a 1-D EP mesh (rank r owns experts ``r*E/P .. (r+1)*E/P-1``),
  so DCP saves and reloads them across EP layouts; it tags the module with ``ep_mesh``. Forward
  code reads the local shard through :func:`local_shard` (``to_local()`` is differentiable, so
  gradients land on the DTensor parameters as Shard(0) DTensors).
* :func:`dispatch` takes one rank's assignments already sorted by *global* expert id plus the
  per-expert counts, exchanges the counts (an equal-split all-to-all of the count vector), sends
  the rows with an uneven all-to-all (zero splits allowed) and regroups what arrives
  (source-rank-major) into local-expert-major order with int32 cumulative offsets, ready for a
  grouped GEMM over the local experts. :func:`combine` is its exact inverse. Both directions are
  ``all_to_all_single_autograd``, so the backward runs the mirrored all-to-alls.
* :func:`all_reduce_sum_no_grad` sums a small statistics tensor over a group (used for routing
  counts when one sequence is split over ranks, e.g. context parallelism).

Bytes sent are counted in ``parallel.comm_stats`` under ``ep_dispatch`` (count vector + token
rows) and ``ep_combine`` (expert outputs): the whole send buffer, own slice included, the same
"own contribution" convention as an all-gather; the backward all-to-alls are not counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from parallel import comm_stats

Group = dist.ProcessGroup | DeviceMesh


def as_process_group(group: Group) -> dist.ProcessGroup:
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"expert parallel: got a {group.ndim}-D mesh {group.mesh_dim_names}; pass the 1-D ep mesh")
        return group.get_group()
    return group


def check_divisible(num_experts: int, ep_size: int) -> int:
    """Experts per rank; every EP rank must own the same number of experts."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(
            f"expert parallel: num_experts={num_experts} is not divisible by the EP size {ep_size}; "
            f"choose an EP degree that divides num_experts"
        )
    return num_experts // ep_size


def shard_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every direct parameter of ``experts`` (each ``[E, ...]``) along dim 0 over ``ep_mesh``.

    The full values come from ep rank 0 (``distribute_tensor`` scatters from it), so ranks need
    not agree beforehand. Sets ``experts.ep_mesh``; an MoE that sees it dispatches over EP.
    Returns ``experts`` (modified in place)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor  # ~2 s import: only when sharding

    if ep_mesh.ndim != 1:
        raise ValueError(f"shard_experts: ep_mesh must be 1-D, got {ep_mesh.ndim}-D {ep_mesh.mesh_dim_names}")
    params = list(experts.named_parameters(recurse=False))
    if not params:
        raise ValueError(f"shard_experts: {type(experts).__name__} has no direct parameters to shard")
    for name, p in params:  # validate everything before changing anything
        if isinstance(p, DTensor):
            raise TypeError(f"shard_experts: {name} is already a DTensor ({p.placements}); shard once")
        check_divisible(p.shape[0], ep_mesh.size())
    for name, p in params:
        sharded = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=p.requires_grad))
    experts.ep_mesh = ep_mesh
    return experts


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an EP-sharded parameter (differentiable); a plain tensor unchanged."""
    # A DTensor can only exist once torch.distributed.tensor is imported; not importing it here
    # keeps `import sbtrain.models` (which reaches this module) fast.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return param.to_local() if dtensor is not None and isinstance(param, dtensor.DTensor) else param


@dataclass
class DispatchPlan:
    """What :func:`combine` needs to send expert outputs back where their tokens came from."""

    group: dist.ProcessGroup
    send_splits: list[int]  # rows this rank sent to each EP rank
    recv_splits: list[int]  # rows this rank received from each EP rank
    restore: torch.Tensor  # local-expert-major row -> source-rank-major row (inverse of the regroup)


def _wait(t: torch.Tensor) -> torch.Tensor:
    # Functional collectives may return a lazily waited AsyncCollectiveTensor; resolve it here so
    # callers get a plain tensor (and a DTensor-free autograd graph).
    return t.wait() if hasattr(t, "wait") else t


def dispatch(
    x_sorted: torch.Tensor, counts: torch.Tensor, group: Group
) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
    """Send rows sorted by global expert id to the ranks owning those experts.

    ``x_sorted`` ``[n, d]``: this rank's rows, sorted by global expert id; ``counts`` ``[E]``:
    rows per global expert (sum n). Returns ``(x_local, offs, plan)``: ``x_local`` ``[m, d]``
    the rows for this rank's ``E/P`` experts grouped by local expert (source ranks in rank order
    within each expert), ``offs`` ``[E/P]`` int32 cumulative ends for a grouped GEMM."""
    pg = as_process_group(group)
    ep = dist.get_world_size(pg)
    num_local = check_divisible(counts.numel(), ep)
    if int(counts.sum()) != x_sorted.shape[0]:
        raise ValueError(f"dispatch: counts sum to {int(counts.sum())} but x_sorted has {x_sorted.shape[0]} rows")
    # recv_counts[s, j]: rows source rank s sends to my local expert j.
    send_counts = counts.detach().to(torch.int64).contiguous()
    recv_counts = torch.empty_like(send_counts)
    comm_stats.record("ep_dispatch", send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=pg)
    recv_counts = recv_counts.view(ep, num_local)
    send_splits = send_counts.view(ep, num_local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    comm_stats.record("ep_dispatch", x_sorted)
    received = _wait(all_to_all_single_autograd(x_sorted.contiguous(), recv_splits, send_splits, pg))
    # Arrival order is (source rank, local expert); a stable sort by local expert id gives
    # (local expert, source rank), which is what the grouped GEMM needs.
    local_ids = torch.arange(num_local, device=x_sorted.device).repeat(ep)
    row_expert = torch.repeat_interleave(local_ids, recv_counts.flatten().to(x_sorted.device))
    regroup = torch.argsort(row_expert, stable=True)
    restore = torch.argsort(regroup)
    offs = torch.cumsum(recv_counts.sum(0), 0).to(device=x_sorted.device, dtype=torch.int32)
    return received[regroup], offs, DispatchPlan(pg, send_splits, recv_splits, restore)


def combine(y_local: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Inverse of :func:`dispatch`: expert outputs (local-expert-major) back to their source
    ranks, in the sender's original expert-sorted order."""
    back = y_local[plan.restore].contiguous()
    comm_stats.record("ep_combine", back)
    return _wait(all_to_all_single_autograd(back, plan.send_splits, plan.recv_splits, plan.group))


@torch.no_grad()
def all_reduce_sum_no_grad(t: torch.Tensor, group: Group, kind: str = "moe_aux_counts") -> torch.Tensor:
    """Sum of ``t`` over ``group`` (a copy; no gradient). For small statistics such as routing
    counts; recorded in comm_stats under ``kind``."""
    out = t.detach().clone()
    comm_stats.record(kind, out)
    dist.all_reduce(out, group=as_process_group(group))
    return out


__all__ = [
    "DispatchPlan",
    "all_reduce_sum_no_grad",
    "as_process_group",
    "check_divisible",
    "combine",
    "dispatch",
    "local_shard",
    "shard_experts",
]
