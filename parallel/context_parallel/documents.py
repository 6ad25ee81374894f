"""Where packed documents fall on one context-parallel shard.

A packed row of ``T`` tokens with global document bounds ``cu_seqlens`` (B = 1) is cut into
contiguous shards ``[start, start + length)``. Each mixer's context-parallel form needs the same
few facts about its shard, computed here once per forward (on the host; bounds are small).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LocalDocuments:
    cu_seqlens: torch.Tensor  # int32 bounds of the documents inside the shard, 0 .. length
    first_doc_start: int  # global position where the shard's first document begins (<= start)
    continues_previous: bool  # the shard's first token belongs to a document begun on an earlier shard
    has_boundary: bool  # a document begins inside the shard (at start or later): earlier state must not cross it

    @property
    def first_doc_end(self) -> int:
        """Local position where the shard's first document ends (``length`` if it runs past the shard)."""
        return int(self.cu_seqlens[1])


def local_documents(cu_seqlens: torch.Tensor, start: int, length: int) -> LocalDocuments:
    """Document bounds of the shard ``[start, start + length)`` of a row with global ``cu_seqlens``."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if length <= 0 or start < 0 or start + length > bounds[-1]:
        raise ValueError(f"shard [{start}, {start + length}) does not lie inside the packed row of {bounds[-1]} tokens")
    end = start + length
    inner = [b - start for b in bounds if start < b < end]
    local = torch.tensor([0, *inner, length], dtype=torch.int32, device=cu_seqlens.device)
    first_doc_start = max(b for b in bounds if b <= start)
    return LocalDocuments(
        cu_seqlens=local,
        first_doc_start=first_doc_start,
        continues_previous=first_doc_start < start,
        has_boundary=first_doc_start == start or bool(inner),
    )
