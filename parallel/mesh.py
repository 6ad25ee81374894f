"""One DeviceMesh for every kind of parallelism, with the flattened views each job needs.

The mesh dims, outer to inner: ``dp_replicate, dp_shard_mod_ep, ep, cp, tp`` — expert
parallelism borrows its ranks from ``dp_shard`` (``dp_shard = dp_shard_mod_ep * ep``), so the
ep ranks are data-parallel ranks that hold different experts. Tensor parallelism is innermost
(the chattiest collectives on the fastest links), as in TorchTitan. Views:

- ``dp``: the ranks that read different samples (``dp_replicate x dp_shard``);
- ``fsdp``: where dense parameters are sharded and gradients averaged — ``dp_shard x cp``
  (the cp ranks hold the same parameters and see different tokens), 2-D with ``dp_replicate``
  first when replicas exist (HSDP);
- ``expert_fsdp``: the same for expert parameters, which are already split over ``ep``:
  ``dp_shard_mod_ep x cp`` (with ``dp_replicate`` first when present);
- ``loss``: the ranks whose target tokens make up the global batch (``dp x cp``);
- ``cp``, ``tp``, ``ep``: 1-D meshes of the groups their collectives run on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIM_NAMES = ("dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees (``dp_shard`` filled in; ``sbtrain.config.parallel.resolve_dims`` validates a
    recipe into one): the one place that knows how the degrees combine, and what builds the mesh."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each reads different samples)."""
        return self.dp_replicate * self.dp_shard

    @property
    def grad_reduce_size(self) -> int:
        """Ranks whose gradients the data-parallel wrapper averages (dp x cp)."""
        return self.dp * self.cp

    def build_mesh(self, device_type: str = "cpu") -> ParallelMesh:
        return build_mesh(self, device_type)


@dataclass
class ParallelMesh:
    world: DeviceMesh
    dims: ParallelDims
    dp_mesh: DeviceMesh  # ranks reading different samples
    loss_mesh: DeviceMesh  # ranks whose target tokens make up the global batch (dp x cp)
    fsdp_mesh: DeviceMesh | None  # dense parameters: shard (and replicate) dims; None if dp x cp == 1
    expert_fsdp_mesh: DeviceMesh | None  # expert parameters (already split over ep)
    cp_mesh: DeviceMesh
    tp_mesh: DeviceMesh
    ep_mesh: DeviceMesh

    # The degrees are the dims' (one definition of dp and grad_reduce_size: ParallelDims).
    dp_replicate = property(lambda self: self.dims.dp_replicate)
    dp_shard = property(lambda self: self.dims.dp_shard)
    cp = property(lambda self: self.dims.cp)
    tp = property(lambda self: self.dims.tp)
    ep = property(lambda self: self.dims.ep)
    dp = property(lambda self: self.dims.dp)
    grad_reduce_size = property(lambda self: self.dims.grad_reduce_size)

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    def describe(self) -> str:
        return (f"mesh {dict(zip(DIM_NAMES, self.world.mesh.shape))} (dp_shard={self.dp_shard} = "
                f"{self.dp_shard // self.ep} x ep {self.ep})")


def _flat(world: DeviceMesh, dims: tuple[str, ...], name: str) -> DeviceMesh:
    return world[dims[0]] if len(dims) == 1 else world[dims]._flatten(name)


def _data_parallel(world: DeviceMesh, replicate: int, shard_dims: tuple[str, ...], name: str, size: int):
    """1-D shard mesh, or 2-D (replicate, shard) for HSDP; None when there is a single rank."""
    if size == 1:
        return None
    shard = _flat(world, shard_dims, name)
    if replicate == 1:
        return shard
    return world["dp_replicate", name] if len(shard_dims) > 1 else world["dp_replicate", shard_dims[0]]


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> ParallelMesh:
    """The mesh of an already-initialised process group; the degrees must multiply to its size
    (validate them first: ``sbtrain.config.parallel.validate_parallel`` names the fix)."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group (torchrun, or the tests' gloo harness)")
    world_size = dist.get_world_size()
    if dims.world_size != world_size or dims.dp_shard % dims.ep:
        raise ValueError(f"degrees {dims} do not fit world size {world_size} (product must equal it, ep must "
                         "divide dp_shard)")
    rep, shard, cp, tp, ep = dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.ep
    world = init_device_mesh(device_type, (rep, shard // ep, ep, cp, tp), mesh_dim_names=DIM_NAMES)
    return ParallelMesh(
        world, dims,
        dp_mesh=_flat(world, ("dp_replicate", "dp_shard_mod_ep", "ep"), "dp"),
        loss_mesh=_flat(world, ("dp_replicate", "dp_shard_mod_ep", "ep", "cp"), "dp_cp"),
        fsdp_mesh=_data_parallel(world, rep, ("dp_shard_mod_ep", "ep", "cp"), "dp_shard_cp", rep * shard * cp),
        expert_fsdp_mesh=_data_parallel(world, rep, ("dp_shard_mod_ep", "cp"), "dp_shard_mod_ep_cp",
                                        rep * (shard // ep) * cp),
        cp_mesh=world["cp"], tp_mesh=world["tp"], ep_mesh=world["ep"],
    )


__all__ = ["DIM_NAMES", "ParallelDims", "ParallelMesh", "build_mesh"]
