"""Context parallelism: each rank holds a contiguous shard of the sequence, and each mixer kind
has its own distributed form (docs/DESIGN_NOTES.md §3, §7):

- linear attention (GLA, the hybrid's linear branch): LASP-2 state all-gather
  (``method="allgather"``) or a pipelined P2P scan of the state split along the key dim
  (``method="scan"``) — traffic independent of the sequence length;
- any recurrence whose state is affine in its initial state (Gated DeltaNet): one pass of the op
  itself for the shard's state and transition, an all-gather, a second pass (``recurrent.py``);
- sliding-window attention: a halo exchange of the last W keys/values of the previous rank(s);
- full attention: Ulysses all-to-all (sequence <-> heads).

A model never calls ``torch.distributed``: the trainer builds one :class:`ContextParallel` per
forward (the group, the global length, the global document bounds) and the mixers call its
``gla`` / ``attention`` in place of ``ops.gla`` / ``ops.attention``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.context_parallel.documents import LocalDocuments, local_documents

CP_LINEAR_METHODS = ("allgather", "scan")


class ContextParallel:
    """One forward's context-parallel layout. A plain class, not a dataclass: FSDP's input
    casting rebuilds dataclasses found in forward kwargs, and this one must pass through as is."""

    def __init__(self, group: dist.ProcessGroup, seq_len: int, cu_seqlens: torch.Tensor | None = None,
                 linear_method: str = "allgather"):
        if linear_method not in CP_LINEAR_METHODS:
            raise ValueError(f"parallel.cp_linear={linear_method!r} is unknown; use one of {CP_LINEAR_METHODS}")
        self.group, self.seq_len, self.cu_seqlens, self.linear_method = group, seq_len, cu_seqlens, linear_method
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if seq_len % self.size:
            raise ValueError(
                f"sequence length {seq_len} is not divisible by the context-parallel degree {self.size}; "
                f"choose trainer.seq_len as a multiple of parallel.cp"
            )
        self.docs: LocalDocuments | None = (
            None if cu_seqlens is None else local_documents(cu_seqlens, self.start, self.local_len)
        )

    @property
    def local_len(self) -> int:
        return self.seq_len // self.size

    @property
    def start(self) -> int:
        return self.rank * self.local_len

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous slice of a full-length tensor (e.g. input ids, labels, positions)."""
        return x.narrow(dim, self.start, self.local_len)

    def gla(self, q, k, v, g) -> torch.Tensor:
        """``ops.gla`` over the whole sequence (q ``[B,t,Hq,D]``, k/v/g ``[B,t,Hkv,D]`` local shards)."""
        from parallel.context_parallel.linear import gla_context_parallel

        return gla_context_parallel(q, k, v, g, self)

    def recurrent(self, op, q, k, v, *gates, **op_kwargs) -> torch.Tensor:
        """``op(q, k, v, *gates)[0]`` over the whole sequence for any op whose state is affine in its
        initial state (``ops.gated_delta``, ...): the generic form of ``recurrent.py``."""
        from parallel.context_parallel.recurrent import recurrent_context_parallel

        return recurrent_context_parallel(op, q, k, v, *gates, cp=self, **op_kwargs)

    def attention(self, q, k, v, *, window: int | None, sink_k=None, sink_v=None) -> torch.Tensor:
        """Causal ``ops.attention`` over the whole sequence: Ulysses for full attention, a halo
        exchange for a sliding window."""
        if window is None:
            from parallel.context_parallel.ulysses import ulysses_attention

            return ulysses_attention(q, k, v, self, sink_k=sink_k, sink_v=sink_v)
        from parallel.context_parallel.halo import halo_attention

        return halo_attention(q, k, v, self, window=window, sink_k=sink_k, sink_v=sink_v)


__all__ = ["CP_LINEAR_METHODS", "ContextParallel", "LocalDocuments", "local_documents"]
