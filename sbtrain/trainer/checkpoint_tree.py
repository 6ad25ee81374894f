"""What goes into a checkpoint: nested state <-> flat DCP keys, JSON-only non-tensor values, and
the CPU snapshot an asynchronous save writes (see :mod:`sbtrain.trainer.checkpoint`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.remote_device import _remote_device

SEP = "/"


class CheckpointError(RuntimeError):
    pass


def snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy that training cannot change. A DTensor stays a DTensor with the same mesh and
    placements (a CPU local shard; DCP writes ``to_local()`` and plans from the mesh coordinates)."""
    if isinstance(tensor, ShardedTensor):  # DeepSpeed ZeRO-3 partitions (parallel/deepspeed_engine.py)
        meta = copy.deepcopy(tensor.metadata())
        for shard in meta.shards_metadata:
            shard.placement = _remote_device(f"rank:{shard.placement.rank()}/cpu")
        by_offsets = {tuple(md.shard_offsets): md for md in meta.shards_metadata}
        shards = [Shard(s.tensor.detach().to("cpu", copy=True), by_offsets[tuple(s.metadata.shard_offsets)])
                  for s in tensor.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)
    return tensor.detach().to("cpu", copy=True)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> one level with ``/``-joined keys (lists and scalars are leaves)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + SEP))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    raise CheckpointError(f"cannot store {type(value).__name__} in a checkpoint: only tensors and JSON values")
