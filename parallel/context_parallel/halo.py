"""Sliding-window softmax attention under context parallelism: a halo exchange (docs/DESIGN_NOTES.md §3, §7).

A query at global position p with window W sees keys ``[p - W, p]`` only, so a shard
``[start, start + t)`` needs, besides its own keys, the last W keys/values before ``start``: the
*halo*. It is received by P2P from the previous rank(s) (several hops when W exceeds the shard
length; rank 0 receives nothing), the shard then runs ordinary local attention on
``[halo; local]`` keys with the queries aligned to the end, and backward sends the halo's
key/value gradients back to their owners. Traffic is O(W) per rank, independent of T.

Packed documents: keys of a document that ends before the shard's first document begins are never
visible to local queries, so the halo is cut at ``cp.docs.first_doc_start`` and those keys are
never sent. The queries of the shard's first document attend ``[halo; first document part]``
(one call, no document bounds needed); the later local documents attend only local keys (a
second call with the shifted local ``cu_seqlens``).

Sinks (``sink_k``/``sink_v``, replicated parameters) are used as-is on every rank; their gradients
are this rank's share (its queries only) and are summed over the context-parallel ranks by the
gradient reduction, like every other parameter gradient under context parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from operators import ops
from parallel import comm_stats

# (peer rank in the CP group, first position inside the owner's shard, number of tokens)
Segment = tuple[int, int, int]


def _visible_from(rank: int, local_len: int, window: int, doc_bounds: list[int] | None) -> int:
    """Global position of the earliest key any query of shard ``rank`` may see: W back from the
    shard start, but never before 0 nor before the beginning of the shard's first document."""
    start = rank * local_len
    first = max(0, start - window)
    if doc_bounds is not None:
        first = max(first, max(b for b in doc_bounds if b <= start))
    return first


def halo_plan(rank: int, size: int, local_len: int, window: int, doc_bounds: list[int] | None):
    """What this rank receives (from earlier ranks, in position order) and sends (to later ranks),
    as lists of :data:`Segment` in the owner's local coordinates. Every rank computes the same plan
    for every pair, so sends and receives always match."""
    t = local_len
    first = _visible_from(rank, t, window, doc_bounds)
    receive = [(j, max(first, j * t) - j * t, (j + 1) * t - max(first, j * t)) for j in range(first // t, rank)]
    send = []
    for dst in range(rank + 1, size):
        begin = max(_visible_from(dst, t, window, doc_bounds), rank * t)
        if begin < (rank + 1) * t:
            send.append((dst, begin - rank * t, (rank + 1) * t - begin))
    return receive, send


def _exchange(outgoing: list[tuple[int, torch.Tensor]], incoming: list[tuple[int, torch.Tensor]], group) -> None:
    """Post every send and receive at once, then wait: no ordering between peers can deadlock."""
    works = []
    for peer, buf in outgoing:
        comm_stats.record("cp_swa_halo", buf)
        works.append(dist.isend(buf, group=group, group_dst=peer))
    works += [dist.irecv(buf, group=group, group_src=peer) for peer, buf in incoming]
    for work in works:
        work.wait()


class _HaloExchange(torch.autograd.Function):
    """(k, v) of the local shard -> (halo_k, halo_v) from earlier ranks; backward returns the halo
    gradients to their owners and adds the gradients of the local keys sent to later ranks."""

    @staticmethod
    def forward(ctx, k, v, receive, send, group):
        ctx.receive, ctx.send, ctx.group, ctx.dk, ctx.local_len = receive, send, group, k.shape[-1], k.shape[1]
        kv = torch.cat([k, v], dim=-1)  # one message per peer; cat (not stack) allows v's head dim to differ
        B, _, H, F = kv.shape
        outgoing = [(dst, kv[:, begin : begin + n].contiguous()) for dst, begin, n in send]
        incoming = [(src, kv.new_empty(B, n, H, F)) for src, _, n in receive]
        _exchange(outgoing, incoming, group)
        halo = torch.cat([buf for _, buf in incoming], dim=1) if incoming else kv.new_empty(B, 0, H, F)
        return halo[..., : ctx.dk].contiguous(), halo[..., ctx.dk :].contiguous()

    @staticmethod
    def backward(ctx, grad_halo_k, grad_halo_v):
        grad_halo = torch.cat([grad_halo_k, grad_halo_v], dim=-1)
        B, _, H, F = grad_halo.shape
        outgoing, offset = [], 0
        for src, _, n in ctx.receive:  # the halo is the concatenation of the received segments
            outgoing.append((src, grad_halo[:, offset : offset + n].contiguous()))
            offset += n
        incoming = [(dst, grad_halo.new_empty(B, n, H, F)) for dst, _, n in ctx.send]
        _exchange(outgoing, incoming, ctx.group)
        # Later ranks' halos overlap (each needs the last keys of this shard): accumulate.
        grad_kv = grad_halo.new_zeros(B, ctx.local_len, H, F)
        for (_, begin, n), (_, buf) in zip(ctx.send, incoming):
            grad_kv[:, begin : begin + n] += buf
        return grad_kv[..., : ctx.dk], grad_kv[..., ctx.dk :], None, None, None


def halo_attention(q, k, v, cp, *, window: int, sink_k=None, sink_v=None) -> torch.Tensor:
    """Causal sliding-window ``ops.attention`` over the whole sequence from local shards
    (q ``[B,t,Hq,D]``, k/v ``[B,t,Hkv,D]``, t = ``cp.local_len``); returns the local output."""
    t = cp.local_len
    if window is None or window < 0:
        raise ValueError(f"halo_attention needs a window >= 0; got {window!r} (full attention goes through Ulysses)")
    if q.shape[1] != t or k.shape[1] != t:
        raise ValueError(f"halo_attention: local length {q.shape[1]} (k {k.shape[1]}) != cp.local_len={t}")
    if cp.cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"halo_attention: documents (cu_seqlens) need one packed row; got B={q.shape[0]}")
    bounds = None if cp.cu_seqlens is None else [int(b) for b in cp.cu_seqlens.tolist()]
    receive, send = halo_plan(cp.rank, cp.size, t, window, bounds)
    if receive or send:
        halo_k, halo_v = _HaloExchange.apply(k, v, receive, send, cp.group)
    else:  # this rank neither needs nor owes a halo (e.g. window 0, documents starting at the bounds)
        halo_k, halo_v = k[:, :0], v[:, :0]
    sinks = {"sink_k": sink_k, "sink_v": sink_v}
    first_end = t if cp.docs is None else cp.docs.first_doc_end
    # The halo belongs to the shard's first document (it was cut at its start): those queries see
    # [halo; their local keys], all in one document, so no bounds are needed.
    first = ops.attention(
        q[:, :first_end],
        torch.cat([halo_k, k[:, :first_end]], dim=1),
        torch.cat([halo_v, v[:, :first_end]], dim=1),
        causal=True,
        window=window,
        **sinks,
    )
    if first_end == t:
        return first
    later = ops.attention(
        q[:, first_end:],
        k[:, first_end:],
        v[:, first_end:],
        causal=True,
        window=window,
        cu_seqlens=cp.docs.cu_seqlens[1:] - first_end,
        **sinks,
    )
    return torch.cat([first, later], dim=1)


__all__ = ["halo_attention", "halo_plan"]
