"""Full causal softmax attention under context parallelism: Ulysses (docs/DESIGN_NOTES.md §3, §7).

Each rank holds a sequence shard of all heads. One all-to-all turns that into the *whole*
sequence of a subset of heads, each rank runs ordinary attention over the full sequence (with the
global document bounds) on its heads, and a second all-to-all turns the output back into sequence
shards. Both all-to-alls are their own adjoint, so backward is the same exchange of the gradients.

Head layout (:func:`ulysses_layout`): heads must split evenly over the P ranks and each rank's
query heads must form ordinary GQA groups over its KV heads. Each KV head is split into ``c``
*replicas*, each carrying at most ``ceil(group / c)`` of the group's query heads (the remainder
are all-zero padding heads whose output is dropped), with ``Hkv * c`` divisible by P. The smallest
traffic wins: for 28 query / 4 KV heads at P = 8 that is c = 2, i.e. 28 query heads padded to 32
and 4 KV heads replicated to 8 (one per rank), instead of repeating k/v to every query head.

Sinks are sliced to the KV heads each rank uses; their gradients are this rank's share and are
summed over the context-parallel ranks by the gradient reduction, like every parameter gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from operators import ops
from parallel import comm_stats


@dataclass(frozen=True)
class UlyssesLayout:
    replicas: int  # c: ranks-worth of copies of each KV head
    q_slots_per_kv: int  # query heads per KV replica (padded)
    q_index: tuple[int, ...]  # source query head of every query slot; Hq marks an all-zero padding slot
    kv_index: tuple[int, ...]  # source KV head of every KV slot
    out_index: tuple[int, ...]  # query slot holding the output of each query head

    @property
    def q_slots(self) -> int:
        return len(self.q_index)

    @property
    def kv_slots(self) -> int:
        return len(self.kv_index)


def ulysses_layout(num_q_heads: int, num_kv_heads: int, cp_size: int) -> UlyssesLayout:
    """The head layout with the least all-to-all traffic (see the module docstring)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"Ulysses: {num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads

    def traffic(c: int) -> int:  # head-rows sent per token: q in + o out + k + v
        return 2 * num_kv_heads * c * math.ceil(group / c) + 2 * num_kv_heads * c

    # c = cp_size always divides; larger c only adds replicas.
    c = min((c for c in range(1, cp_size + 1) if (num_kv_heads * c) % cp_size == 0), key=lambda c: (traffic(c), c))
    per = math.ceil(group / c)
    q_index, kv_index = [], []
    for slot in range(num_kv_heads * c):
        kv_head, replica = divmod(slot, c)
        kv_index.append(kv_head)
        for i in range(per):
            member = replica * per + i
            q_index.append(kv_head * group + member if member < group else num_q_heads)
    out_index = tuple(q_index.index(h) for h in range(num_q_heads))
    return UlyssesLayout(c, per, tuple(q_index), tuple(kv_index), out_index)


class _AllToAll(torch.autograd.Function):
    """``[P, ...]`` chunk j goes to rank j; the result's chunk j came from rank j. With equal chunks
    this permutation is its own transpose, so backward sends the gradients the same way."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    comm_stats.record("cp_ulysses", x.numel() * x.element_size() * (size - 1) // size)  # own chunk stays
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def ulysses_attention(q, k, v, cp, *, sink_k=None, sink_v=None) -> torch.Tensor:
    """Causal ``ops.attention`` over the whole sequence from local shards (q ``[B,t,Hq,D]``,
    k/v ``[B,t,Hkv,D]``, t = ``cp.local_len``, documents from ``cp.cu_seqlens``)."""
    B, t, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    P = cp.size
    if t != cp.local_len or k.shape[1] != t:
        raise ValueError(f"ulysses_attention: local length {t} (k {k.shape[1]}) != cp.local_len={cp.local_len}")
    layout = ulysses_layout(Hq, Hkv, P)
    qs, ks = layout.q_slots // P, layout.kv_slots // P  # slots per rank
    q_index = torch.tensor(layout.q_index, device=q.device)
    kv_index = torch.tensor(layout.kv_index, device=q.device)

    # Gather the slots (padding = an appended zero head; replicas = repeated KV heads; autograd sums
    # the replicas' gradients) and pack q, k, v per destination rank into one message.
    q_slots = F.pad(q, (0, 0, 0, 1)).index_select(2, q_index)
    packed = torch.cat(
        [
            q_slots.reshape(B, t, P, qs * D),
            k.index_select(2, kv_index).reshape(B, t, P, ks * D),
            v.index_select(2, kv_index).reshape(B, t, P, ks * Dv),
        ],
        dim=3,
    )
    received = _AllToAll.apply(packed.permute(2, 0, 1, 3).contiguous(), cp.group)  # [src rank, B, t, ...]
    full = received.permute(1, 0, 2, 3).reshape(B, P * t, -1)  # source ranks hold consecutive shards
    q_full, k_full, v_full = full.split([qs * D, ks * D, ks * Dv], dim=-1)
    T = P * t
    mine = kv_index[cp.rank * ks : (cp.rank + 1) * ks]
    out = ops.attention(
        q_full.reshape(B, T, qs, D),
        k_full.reshape(B, T, ks, D),
        v_full.reshape(B, T, ks, Dv),
        causal=True,
        sink_k=None if sink_k is None else sink_k.index_select(1, mine),
        sink_v=None if sink_v is None else sink_v.index_select(1, mine),
        cu_seqlens=cp.cu_seqlens,
    )
    # Back to sequence shards: chunk j of the sequence returns to rank j.
    back = _AllToAll.apply(out.reshape(B, P, t, qs * Dv).permute(1, 0, 2, 3).contiguous(), cp.group)
    o_slots = back.permute(1, 2, 0, 3).reshape(B, t, layout.q_slots, Dv)  # [B, t, slot-owner rank x slot, Dv]
    return o_slots.index_select(2, torch.tensor(layout.out_index, device=q.device))


__all__ = ["UlyssesLayout", "ulysses_attention", "ulysses_layout"]
