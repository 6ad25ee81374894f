"""ZeRO-3 partitions as DCP-sharded tensors: each rank saves and loads only its own partition.

ZeRO-3 flattens every parameter and gives rank ``r`` the elements ``[r*P, (r+1)*P)`` of it
(``P = ceil(numel / world)``, the last partitions padded). The fp32 master copy and each Adam
moment are laid out the same way inside the optimizer's flat groups. A contiguous range of a
row-major tensor is a union of at most ``2*ndim - 1`` boxes (a partial first row, whole rows, a
partial last row, recursively), and each box is itself contiguous in memory, so it is a *view*
of the partition. :func:`partition_as_sharded` describes those boxes as a ``ShardedTensor``
of the parameter's real shape (every rank's boxes computed locally, no collective), whose local
shards are views into DeepSpeed's own buffers:

* saving copies nothing up front (DCP's writer clones one view at a time to write it);
* loading with DCP writes straight into the optimizer's partitions, from any saved layout:
  this engine's own checkpoints, FSDP2's row shards, full tensors, another world size;
* the checkpoint has the model's names and shapes, so FSDP or a plain model loads it too.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

# torch steers users to DTensor, but a DTensor holds one block per rank; a ZeRO-3 partition is up
# to 2*ndim - 1 blocks, which only ShardedTensor (which DCP still reads and writes) can describe.
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)


def boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple, tuple, int]]:
    """The flat range ``[start, stop)`` of a row-major ``shape`` as ``(offsets, sizes, flat_start)``
    boxes, in memory order; each box is fixed in the leading dims, a range in one dim and whole
    in the rest, hence contiguous."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,), start)]
    row = math.prod(shape[1:])
    out = []

    def partial(index: int, lo: int, hi: int) -> None:  # part of row ``index``, recursively
        for off, size, flat in boxes(shape[1:], lo, hi):
            out.append(((index, *off), (1, *size), flat + index * row))

    if start % row:
        end = min(stop, (start // row + 1) * row)
        partial(start // row, start % row, end - (start // row) * row)
        start = end
    if stop // row > start // row and start < stop:
        first, last = start // row, stop // row
        out.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:]), first * row))
        start = last * row
    if start < stop:
        partial(start // row, 0, stop - (start // row) * row)
    return out


def partition_as_sharded(local: torch.Tensor, shape: tuple[int, ...], numel: int, rank: int,
                         world: int) -> ShardedTensor:
    """``local``: this rank's flat partition (``P`` elements, the tail possibly padding) of a
    tensor of ``shape``; every rank holds ``P`` elements at offset ``rank * P``."""
    per_rank = local.numel()
    device = local.device
    metas, shards = [], []
    for r in range(world):
        lo, hi = r * per_rank, min((r + 1) * per_rank, numel)
        for off, size, flat in boxes(shape, lo, hi):
            meta = ShardMetadata(list(off), list(size), f"rank:{r}/{device}")
            metas.append(meta)
            if r == rank:
                view = local.narrow(0, flat - lo, math.prod(size)).view(size)
                shards.append(Shard(view, meta))
    props = TensorProperties(dtype=local.dtype, requires_grad=False)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(metas, torch.Size(shape), props))


def copy_into(target: ShardedTensor, source: ShardedTensor) -> None:
    """Make ``target``'s local shards hold ``source``'s (a no-op when they are the same views:
    DCP loaded into the template in place)."""
    got = {tuple(s.metadata.shard_offsets): s.tensor for s in source.local_shards()}
    for shard in target.local_shards():
        value = got[tuple(shard.metadata.shard_offsets)]
        if value.data_ptr() != shard.tensor.data_ptr():
            shard.tensor.copy_(value)


def partition(engine, p: torch.nn.Parameter, optim_key: str | None = None) -> torch.Tensor:
    """This rank's fp32 partition of ``p`` (or of its optimizer state ``optim_key``) as a
    ShardedTensor of views; a 0-d parameter (no boxes) as its one element, in full."""
    opt = engine.optimizer
    if not tuple(p.ds_shape):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        full = safe_get_full_fp32_param(p) if optim_key is None else safe_get_full_optimizer_state(p, optim_key)
        return full.detach().clone()
    local, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=optim_key)
    local = local.detach()  # the flat fp32 group is a Parameter; detach() shares its memory
    return partition_as_sharded(local, tuple(p.ds_shape), p.ds_numel, opt._get_param_partition_rank(p),
                                opt._get_param_partition_world_size(p))


def _model_entry(engine, key: str, buffers: dict) -> torch.Tensor:
    p = engine._key_params.get(key)
    if p is not None and p.requires_grad:
        return partition(engine, p)
    return p if p is not None else buffers[key]  # buffers (replicated) and frozen parameters (gathered)


@torch.no_grad()
def zero3_state_dict(engine) -> dict:
    """:meth:`DeepSpeedEngine.checkpoint_state_dict` for ZeRO-3: the keys of ``state_dict()``
    (model by ``model.state_dict()`` name, optimizer state by parameter name, JSON groups)."""
    with engine._gathered_frozen(modifier_rank=None):
        buffers = dict(engine.module.named_buffers())
        model_sd = {}
        for key in engine._state_keys:
            value = _model_entry(engine, key, buffers)
            model_sd[key] = value if isinstance(value, ShardedTensor) else value.detach().clone()
    adam = not isinstance(engine.optimizer.optimizer, torch.optim.SGD)
    state = {}
    for name, p in engine._named_params():
        state[name] = {k: partition(engine, p, k) for k in engine._optim_keys()}
        if adam:
            state[name]["step"] = torch.tensor(engine._optim_step_count())
    return {"model": model_sd, "optim": {"state": state, "param_groups": engine.state_dict_groups()}}


def _assign(target: torch.Tensor, value: torch.Tensor, set_full=None) -> None:
    """``value`` (sharded or full) into ``target``: partition views, or ``set_full`` where
    :func:`partition` had to return a copy (a 0-d parameter), or a plain tensor."""
    if isinstance(target, ShardedTensor):
        if isinstance(value, ShardedTensor):
            copy_into(target, value)
            return
        for shard in target.local_shards():  # a full tensor: take this rank's boxes of it
            box = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.copy_(value[box])
    elif set_full is not None:
        set_full(value.to(torch.float32))
    else:
        target.copy_(value)


@torch.no_grad()
def load_zero3(engine, state_dict: dict) -> None:
    """Load :func:`zero3_state_dict`'s layout (normally that very template, which DCP already
    filled in place), then refresh the model's partitions from the fp32 masters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model_sd = state_dict["model"]
    if set(model_sd) != set(engine._state_keys):
        raise KeyError(f"ZeRO-3 load: missing {sorted(set(engine._state_keys) - set(model_sd))[:5]}, "
                       f"unexpected {sorted(set(model_sd) - set(engine._state_keys))[:5]}")
    with engine._gathered_frozen(modifier_rank=0):
        buffers = dict(engine.module.named_buffers())
        for key, value in model_sd.items():
            p = engine._key_params.get(key)
            trainable = p is not None and p.requires_grad
            _assign(_model_entry(engine, key, buffers), value,
                    (lambda v, p=p: safe_set_full_fp32_param(p, v)) if trainable else None)
    optim = state_dict.get("optim")
    if optim:
        for name, p in engine._named_params():
            if name not in optim["state"]:
                raise KeyError(f"optimizer state for parameter {name} is missing from the checkpoint; "
                               "load weights only (drop 'optim') or resume from a checkpoint of this model")
            for key in engine._optim_keys():
                _assign(partition(engine, p, key), optim["state"][name][key],
                        lambda v, p=p, key=key: safe_set_full_optimizer_state(p, v, key))
        engine._load_step_and_groups(optim)
    opt = engine.optimizer  # fp32 masters -> the partitions the forward gathers (bf16 or fp32)
    for i in range(len(opt.fp16_partitioned_groups_flat)):
        opt._reassign_or_swap_out_partitioned_parameters(i)
