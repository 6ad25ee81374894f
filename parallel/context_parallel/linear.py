"""Context parallelism for gated linear attention (GLA): LASP-2 all-gather or a pipelined P2P scan.

Each rank holds a contiguous shard of the sequence. The GLA recurrence per KV head,
``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t``, is linear in the state, so the state at the end of a
shard is ``S_end = decay ⊙ S_begin + S_local`` where, over the shard's last document segment,

    S_local = Σ_t (k_t ⊙ exp(B_end - B_t))^T v_t      (B: inclusive cumsum of g in the segment)
    decay   = exp(Σ_shard g)  per key dim             (zero when a document begins in the shard)

Both are one cumsum and one matmul, never a second GLA pass. Rank r needs only
``S_in(r) = S_end(r-1)``; it then runs one ``ops.gla`` over its shard with ``S_in`` as the initial
state of its first document (when that document began on an earlier rank). Two exchanges:

- ``allgather`` (LASP-2): one all-gather of ``[S_local, decay]``, then every rank combines the
  prefix locally. The backward is the gather's reduce-scatter. Traffic per rank: one state,
  independent of the sequence length.
- ``scan`` (ZeCO-style): rank r receives ``S_end(r-1)``, forms ``S_end(r)`` and sends it to r+1,
  piece by piece along the key dim (the decay is diagonal in it, so pieces are independent and
  r+1 works on piece i while r sends piece i+1). Its backward is the reverse scan (r+1 -> r).

States are carried in fp32 at least (fp64 for fp64 inputs). Traffic is counted under
``comm_stats`` kind ``cp_linear``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from operators import ops
from operators.gla.reference import expand_gate
from parallel import comm_stats

# Key-dim pieces of the pipelined scan: enough to overlap a send with the next piece's combine,
# few enough that per-message latency does not dominate a small state.
SCAN_PIECES = 4

# torch >= 2.13 names the flat-buffer collectives *_single (the *_tensor names warn as deprecated).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def check_shard(q: torch.Tensor, cp, what: str) -> None:
    """``q`` must be this rank's shard (``[B, seq_len/cp, ...]``), one packed row with documents."""
    B, t = q.shape[:2]
    if t != cp.local_len:
        raise ValueError(
            f"context-parallel {what} got a shard of {t} tokens, expected seq_len/cp = {cp.seq_len}/{cp.size} = "
            f"{cp.local_len}; pass this rank's shard (cp.shard(x)), not the full sequence"
        )
    if cp.docs is not None and B != 1:
        raise ValueError(f"context-parallel {what} with documents (cu_seqlens) needs one packed row, got B={B}")


def _last_segment_start(cp) -> int:
    """Local start of the shard's last document segment (0 without documents)."""
    return 0 if cp.docs is None else int(cp.docs.cu_seqlens[-2])


def local_state_and_decay(k, v, g, cp) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's contribution to the state at its end from a zero start, ``[R,Hkv,Dk,Dv]``, and
    its total decay ``[R,Hkv,Dk]`` (R = batch rows; zero where a document begins in the shard)."""
    acc = _state_dtype(k.dtype)
    g = expand_gate(g, k)
    s = _last_segment_start(cp)
    k_seg, v_seg, g_seg = (x[:, s:].to(acc) for x in (k, v, g))
    cum = g_seg.cumsum(1)  # B_t, inclusive: token t's update is decayed by the gates after it
    weights = (cum[:, -1:] - cum).exp()  # <= 1 for log-decays g <= 0
    state = torch.einsum("rthk,rthv->rhkv", k_seg * weights, v_seg)
    has_boundary = cp.docs is not None and cp.docs.has_boundary
    # A boundary anywhere in the shard cuts the earlier state off; then S_local covers only the
    # last document, which is exactly the segment above.
    decay = cum[:, -1].exp() * (0.0 if has_boundary else 1.0)
    return state, decay


class _AllGather(torch.autograd.Function):
    """All-gather of a 1-D buffer into ``[ranks, n]``; the backward is the reduce-scatter."""

    @staticmethod
    def forward(ctx, buf, group):
        ctx.group = group
        size = dist.get_world_size(group)
        out = buf.new_empty(size * buf.numel())  # gloo wants flat buffers on both sides
        comm_stats.record("cp_linear", buf)
        _all_gather(out, buf.contiguous(), group=group)
        return out.view(size, -1)

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.new_empty(grad_out.shape[1:])
        # Counted as the reduce-scatter's input: every rank contributes a gradient for all slots.
        comm_stats.record("cp_linear", grad_out)
        _reduce_scatter(grad, grad_out.reshape(-1).contiguous(), group=ctx.group)
        return grad, None


def _incoming_state_allgather(state, decay, cp) -> torch.Tensor:
    """LASP-2: S_in(r) = Σ_{j<r} (Π_{j<i<r} decay_i) ⊙ S_local_j from one all-gather."""
    n_state = state.numel()
    buf = torch.cat([state.reshape(-1), decay.reshape(-1)])
    gathered = _AllGather.apply(buf, cp.group)
    states = gathered[:, :n_state].view(cp.size, *state.shape)
    decays = gathered[:, n_state:].view(cp.size, *decay.shape)
    # Weights w_j for every rank j, zero for j >= r: the sum then reads the whole gathered tensor,
    # so every rank (rank 0 included) joins the gather's backward collective.
    weights = [torch.zeros_like(decay)] * cp.size
    w = torch.ones_like(decay)
    for j in range(cp.rank - 1, -1, -1):
        weights[j] = w
        w = w * decays[j]
    weights = torch.stack(weights)
    return (weights.unsqueeze(-1) * states).sum(0)


class _StateScan(torch.autograd.Function):
    """Pipelined P2P scan of ``S_end(r) = decay_r ⊙ S_end(r-1) + S_local_r``; returns
    ``S_in(r) = S_end(r-1)`` (zero on rank 0). The backward is the reverse scan."""

    @staticmethod
    def forward(ctx, state, decay, group):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        # Key-major layout so that each key-dim piece is one contiguous message.
        s_local = state.movedim(-2, 0).contiguous()  # [Dk, R, H, Dv]
        dec = decay.movedim(-1, 0).unsqueeze(-1).contiguous()  # [Dk, R, H, 1]
        s_in = torch.zeros_like(s_local)
        s_end = torch.empty_like(s_local)
        pieces = max(1, min(SCAN_PIECES, s_local.shape[0]))
        in_p, end_p = s_in.tensor_split(pieces), s_end.tensor_split(pieces)
        loc_p, dec_p = s_local.tensor_split(pieces), dec.tensor_split(pieces)
        recvs = [dist.irecv(p, group=group, group_src=rank - 1, tag=i) for i, p in enumerate(in_p)] if rank else []
        sends = []
        for i in range(pieces):
            if recvs:
                recvs[i].wait()
            torch.addcmul(loc_p[i], dec_p[i], in_p[i], out=end_p[i])
            if rank + 1 < size:
                comm_stats.record("cp_linear", end_p[i])
                sends.append(dist.isend(end_p[i], group=group, group_dst=rank + 1, tag=i))
        for work in sends:
            work.wait()
        ctx.group, ctx.pieces = group, pieces
        ctx.save_for_backward(s_in, dec)
        return s_in.movedim(0, -2)

    @staticmethod
    def backward(ctx, grad_in):
        group, pieces = ctx.group, ctx.pieces
        s_in, dec = ctx.saved_tensors
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        d_in = grad_in.movedim(-2, 0).contiguous()  # dL/dS_in(r) from this rank's own GLA
        d_end = torch.zeros_like(s_in)  # dL/dS_end(r), arriving from rank r+1
        d_out = torch.empty_like(s_in)  # dL/dS_in(r) in total = dL/dS_end(r-1), sent to rank r-1
        end_p, out_p = d_end.tensor_split(pieces), d_out.tensor_split(pieces)
        dec_p, d_in_p = dec.tensor_split(pieces), d_in.tensor_split(pieces)
        recvs = []
        if rank + 1 < size:
            recvs = [dist.irecv(p, group=group, group_src=rank + 1, tag=i) for i, p in enumerate(end_p)]
        sends = []
        for i in range(pieces):
            if recvs:
                recvs[i].wait()
            if rank:
                torch.addcmul(d_in_p[i], dec_p[i], end_p[i], out=out_p[i])
                comm_stats.record("cp_linear", out_p[i])
                sends.append(dist.isend(out_p[i], group=group, group_dst=rank - 1, tag=i))
        d_decay = (d_end * s_in).sum(-1)  # decay broadcasts over Dv
        for work in sends:
            work.wait()
        return d_end.movedim(0, -2), d_decay.movedim(0, -1), None


def gla_context_parallel(q, k, v, g, cp) -> torch.Tensor:
    """``ops.gla(...)[0]`` of the whole sequence, sliced to this rank's shard.

    q ``[B,t,Hq,Dk]``, k/g ``[B,t,Hkv,Dk]`` (g may be ``[B,t,Hkv]``), v ``[B,t,Hkv,Dv]``: this rank's
    contiguous shard of ``cp.seq_len`` tokens per row. With documents (``cp.cu_seqlens``) B is 1.
    """
    check_shard(q, cp, "gla")
    state, decay = local_state_and_decay(k, v, g, cp)
    if cp.size == 1:
        s_in = torch.zeros_like(state)
    elif cp.linear_method == "allgather":
        s_in = _incoming_state_allgather(state, decay, cp)
    else:
        s_in = _StateScan.apply(state, decay, cp.group)
    if cp.docs is None:
        return ops.gla(q, k, v, g, initial_state=s_in)[0]
    # The incoming state feeds the first local document only if that document began earlier.
    # Otherwise it is multiplied by zero rather than dropped: the exchange must stay in the graph
    # so that this rank joins the collective (or relays the scan) in the backward.
    first = s_in * (1.0 if cp.docs.continues_previous else 0.0)
    n_docs = cp.docs.cu_seqlens.numel() - 1
    initial = torch.cat([first, first.new_zeros(n_docs - 1, *first.shape[1:])])
    return ops.gla(q, k, v, g, initial_state=initial, cu_seqlens=cp.docs.cu_seqlens)[0]


__all__ = ["SCAN_PIECES", "gla_context_parallel", "local_state_and_decay"]
