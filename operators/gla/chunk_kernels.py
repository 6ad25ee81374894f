"""Chunk-form math of gated linear attention (fp32), forward and explicit backward.

Tensors here are already packed by ``operators.gla.chunked``: every document starts on a chunk
edge and is zero-padded to whole chunks, so no chunk mixes two documents.

    q  [N, R, H, G, C, Dk]   query, G query heads per KV head (the scale is applied inside)
    k  [N, R, H, C, Dk]      v [N, R, H, C, Dv]
    g  [N, R, H, C, Dg]      log-decay, Dg = Dk (per key dim) or 1 (scalar per head)

N chunks of C tokens, R rows (batch rows, or 1 for packed documents), H KV heads. Chunk-major,
so the state of chunk n is one contiguous slab and the scan is one in-place op per chunk. Within a
chunk ``b = cumsum(g)``; output ``O = (Q*e^b) S_in + mask(A) V`` with
``A_ij = sum_d q_id k_jd e^(b_id - b_jd)`` and ``S_out = e^(b_C) S_in + (K*e^(b_C - b))^T V``.
The chunks are walked in cache-sized blocks (BLOCK_BYTES): within a block every intra and state
term is one batched matmul over heads and chunks, and only the state recurrence is a loop. Blocks
keep the ~15 elementwise passes in cache and bound the temporaries (no fresh >32 MB tensors).
"""

from __future__ import annotations

import torch

# Widest in-chunk spread of b (per dim) the factorised intra form handles in fp32: with the
# reference point in the middle of the range each factor lies in [e^-75, e^75], finite and
# normal. Chunks beyond it (gates of several nats per token) take the exact pairwise form.
RMAX = 150.0
# Bound on the [m, C, C, Dk] temporaries of the pairwise form (bytes).
PAIRWISE_BYTES = 16 << 20
# Bytes of one token-sized fp32 tensor per block of chunks (see _block_chunks).
BLOCK_BYTES = 8 << 20
# The training forward keeps every chunk's entry state (and the cumulative gate b) for the
# backward when the states take at most this many bytes: the backward then skips its state
# recompute pass (a third of its K^T V matmuls) and the cumsums. Above it, the backward
# recomputes the states from each block's entry state (memory O(blocks) instead of O(chunks)).
SAVE_STATES_BYTES = 1 << 30


class Plan:
    """Where documents start and end in chunk units: ``starts[n]`` / ``ends[n]`` list the
    (row, doc) pairs whose first / last chunk is ``n``; ``doc_end[n]`` is one past the last
    chunk of chunk n's document (for the per-document suffix sums of the gate gradient)."""

    def __init__(self, starts: dict, ends: dict, doc_end: torch.Tensor, n_docs: int):
        self.starts, self.ends, self.doc_end, self.n_docs = starts, ends, doc_end, n_docs


def _mul(a, b):
    """a * b into a fresh contiguous tensor (a may be a strided view of the caller's input)."""
    return torch.mul(a, b, out=a.new_empty(torch.broadcast_shapes(a.shape, b.shape)))


def _tril(C: int, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril_()


def _pairwise_idx(bad: torch.Tensor, C: int, Dk: int, G: int):
    """Bad chunks as index tuples, in groups small enough for the pairwise temporaries."""
    idx = bad.nonzero(as_tuple=True)
    m = max(1, PAIRWISE_BYTES // (4 * C * C * Dk * max(G, 2)))
    total = idx[0].numel()
    return [tuple(i[s : s + m] for i in idx) for s in range(0, total, m)]


def _pairwise_E(b: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    """Exact e^(b_i - b_j) for j <= i, 0 above the diagonal: [m, Ci, Cj, Dk]."""
    diff = b.unsqueeze(2) - b.unsqueeze(1)
    return diff.masked_fill_(~tril.unsqueeze(-1), float("-inf")).exp_()


class Intra:
    """Intra-chunk scores and the inter-chunk factors of all chunks at once (kept for the backward).

    ``A`` is kept unscaled: the callers apply the scale as the matmul's alpha (A V, A^T dO,
    dA = dO V^T), which saves a pass over A; ``qb`` carries the scale.
    Per-dim gates: ``A = (Q*e^(b-r)) (K/e^(b-r))^T`` with r the middle of b's range in the chunk
    (per dim): exact for valid pairs (each term's factors multiply back to e^(b_i - b_j) <= 1);
    one exp serves both sides. The inter factors reuse them: ``Q*s*e^b = qt*s*e^r``,
    ``K*e^(b_C-b) = kt*e^(b_C-r)``. Chunks whose range exceeds RMAX are clamped to stay finite,
    then recomputed exactly (pairwise).
    Scalar gates: ``A = (Q K^T) * D`` with ``D_ij = e^(b_i - b_j)`` built directly, always safe.
    """

    def __init__(self, q, k, b, scale, monotone, A_out=None, A_saved=None):
        """A_out: where to write A ([N,R,H,G*C,C], contiguous); A_saved: A from an earlier
        Intra of the same chunks (the forward's), taken as is instead of recomputed."""
        N, R, H, G, C, Dk = q.shape
        self.shape, self.scale = (N, R, H, G, C), scale
        self.tril = _tril(C, q.device)
        self.scalar = b.shape[-1] == 1
        self.groups = []
        q3 = q.reshape(N, R, H, G * C, Dk)
        blast = b[..., -1:, :]
        if self.scalar:
            diff = b - b.transpose(-1, -2)  # [N,R,H,C,C]
            self.D = diff.masked_fill_(~self.tril, float("-inf")).exp_()
            if A_saved is not None:
                A = A_saved
            else:
                A = torch.matmul(q3, k.transpose(-1, -2), out=A_out)
                A.view(N, R, H, G, C, C).mul_(self.D.unsqueeze(3))
            self.A, self.qt, self.kt = A, q3, k
            self.fq = b.exp().mul_(scale)  # dq_inter = dqb * fq
            self.fk = (blast - b).exp_()
            self.qb = _mul(q, self.fq.unsqueeze(3)).view(N, R, H, G * C, Dk)
            self.kh = _mul(k, self.fk)
            return
        if monotone:  # g <= 0: b falls along the chunk, its range ends are the first and last rows
            hi, lo = b[..., :1, :], blast
        else:
            hi, lo = b.amax(-2, keepdim=True), b.amin(-2, keepdim=True)
        r = (hi + lo).mul_(0.5)
        bad = (hi - lo).squeeze(-2).amax(-1) > RMAX  # [N,R,H]
        e = torch.sub(b, r)
        if bad.any():
            half = RMAX / 2
            e.clamp_(-half, half)
            self.groups = _pairwise_idx(bad, C, Dk, G)
        self.e = e.exp_()  # e^(b-r); kt divides by it
        self.er, self.ekr = r.exp().mul_(scale), (blast - r).exp_()
        qt = _mul(q, e.unsqueeze(3))
        self.qt = qt.view(N, R, H, G * C, Dk)
        self.kt = torch.div(k, e, out=k.new_empty(e.shape))
        self.qb = torch.mul(qt, self.er.unsqueeze(3), out=qt.new_empty(qt.shape)).view(N, R, H, G * C, Dk)
        self.kh = torch.mul(self.kt, self.ekr, out=e.new_empty(e.shape))
        if A_saved is not None:
            A = A_saved
        else:
            A = torch.matmul(self.qt, self.kt.transpose(-1, -2), out=A_out)
            # masked_fill, not a multiply: masked entries may be inf (their factors are e^+-75).
            A.view(N, R, H, G, C, C).masked_fill_(~self.tril, 0.0)
        A6, qb6 = A.view(N, R, H, G, C, C), self.qb.view(N, R, H, G, C, Dk)
        for idx in self.groups:
            bi, qi, ki = b[idx], q[idx], k[idx]
            E = _pairwise_E(bi, self.tril)
            a = torch.matmul(qi.transpose(1, 2), (E * ki.unsqueeze(1)).transpose(-1, -2))  # [m,Ci,G,Cj]
            if A_saved is None:
                A6[idx] = a.transpose(1, 2)
            qb6[idx] = qi * bi.exp().mul_(scale).unsqueeze(1)
            self.kh[idx] = ki * (bi[:, -1:] - bi).exp_()
        self.A = A

    def backward(self, q, k, b, dA, dqb, dkh, dq_out, dk_out):
        """dA [N,R,H,G*C,C] (upper triangle zero; the gradient of the unscaled A, so it carries
        the scale), dqb / dkh the gradients of qb / kh
        -> (dq [N,R,H,G,C,Dk], dk [N,R,H,C,Dk]), written into dq_out / dk_out by their last
        elementwise op (so they may be strided views of the caller's unpacked gradients)."""
        N, R, H, G, C = self.shape
        Dk = q.shape[-1]
        if self.scalar:
            dA.view(N, R, H, G, C, C).mul_(self.D.unsqueeze(3))
            t = torch.matmul(dA, k).view(N, R, H, G, C, Dk)
            dq = torch.add(t, dqb.view(N, R, H, G, C, Dk).mul_(self.fq.unsqueeze(3)), out=dq_out)
            t = torch.matmul(dA.transpose(-1, -2), self.qt)
            dk = torch.add(t, dkh.mul_(self.fk), out=dk_out)
            return dq, dk
        # d(qt) + d(qb) * e^r, then times d(qt)/dq; likewise for k.
        t = torch.matmul(dA, self.kt).view(N, R, H, G, C, Dk)
        t.addcmul_(dqb.view(N, R, H, G, C, Dk), self.er.unsqueeze(3))
        dq = torch.mul(t, self.e.unsqueeze(3), out=dq_out)
        t = torch.matmul(dA.transpose(-1, -2), self.qt).addcmul_(dkh, self.ekr)
        dk = torch.div(t, self.e, out=dk_out)
        dA6, dqb6 = dA.view(N, R, H, G, C, C), dqb.view(N, R, H, G, C, Dk)
        for idx in self.groups:
            bi, qi, ki = b[idx], q[idx], k[idx]
            E = _pairwise_E(bi, self.tril)
            dAi = dA6[idx].transpose(1, 2)  # [m,Ci,G,Cj]
            dqi = torch.matmul(dAi, E * ki.unsqueeze(1)).transpose(1, 2)
            dq[idx] = dqi.add_(dqb6[idx] * bi.exp().mul_(self.scale).unsqueeze(1))
            P = torch.matmul(dAi.transpose(-1, -2), qi.transpose(1, 2))  # [m,Ci,Cj,Dk]
            dk[idx] = P.mul_(E).sum(1).add_(dkh[idx] * (bi[:, -1:] - bi).exp_())
        return dq, dk


def _block_chunks(q) -> int:
    """Chunks per block: all per-block temporaries (~10 token-sized tensors plus states) stay in
    cache, so the many elementwise passes do not stream from DRAM."""
    N, R, H, G, C, Dk = q.shape
    return max(1, min(N, BLOCK_BYTES // (4 * R * H * max(G * C * Dk, Dk * Dk))))


def _scan_states(sl, decay, init, plan, finals, n0):
    """In place over one block. sl[0] holds S_in of chunk n0, sl[i+1] chunk n0+i's K^T V on entry
    and its S_out on exit. Document starts reset the state; ends fill ``finals``."""
    for i in range(len(sl) - 1):
        n = n0 + i
        for row, doc in plan.starts.get(n, ()):
            sl[i][row].zero_() if init is None else sl[i][row].copy_(init[doc])
        sl[i + 1].addcmul_(sl[i], decay[i])
        if finals is not None:
            for row, doc in plan.ends.get(n, ()):
                finals[doc].copy_(sl[i + 1][row])


def _scan_dstates(sl, decay, dfinal, plan, dinit, n0):
    """In place over one block, in reverse. sl[i] holds chunk n0+i's (Q e^b)^T dO on entry and its
    dS_in on exit; sl[-1] holds dS_in of the next chunk on entry (dS_out of the block's last)."""
    for i in range(len(sl) - 2, -1, -1):
        n = n0 + i
        for row, doc in plan.ends.get(n, ()):
            sl[i + 1][row].zero_() if dfinal is None else sl[i + 1][row].copy_(dfinal[doc])
        sl[i].addcmul_(sl[i + 1], decay[i])
        if dinit is not None:
            for row, doc in plan.starts.get(n, ()):
                dinit[doc].copy_(sl[i][row])


def _decay(b):
    return b[..., -1:, :].transpose(-1, -2).exp()  # [n,R,H,Dg,1], broadcasts over the state


def forward(q, k, v, g, init, plan, scale, monotone, save: bool = False):
    """q unscaled [N,R,H,G,C,Dk]. Returns (o [N,R,H,G*C,Dv], finals [n_docs,H,Dk,Dv], saved):
    with ``save``, saved = (b [N,R,H,C,Dg], states [N+1,R,H,Dk,Dv]: chunk n's S_in at n,
    A [N,R,H,G*C,C]: the unscaled masked intra scores) for ``backward``; else None."""
    N, R, H, G, C, Dk = q.shape
    Dv = v.shape[-1]
    o = q.new_empty(N, R, H, G * C, Dv)
    finals = q.new_empty(plan.n_docs, H, Dk, Dv)
    blk = _block_chunks(q)
    if save:
        states, bfull = q.new_empty(N + 1, R, H, Dk, Dv), g.new_empty(g.shape)
        Afull = q.new_empty(N, R, H, G * C, C)
        states[0].zero_()
    else:
        S = q.new_zeros(R, H, Dk, Dv)
    for n0 in range(0, N, blk):
        n1 = min(N, n0 + blk)
        qi, ki, vi = q[n0:n1], k[n0:n1], v[n0:n1]
        b = torch.cumsum(g[n0:n1], -2, out=bfull[n0:n1]) if save else g[n0:n1].cumsum(-2)
        intra = Intra(qi, ki, b, scale, monotone, A_out=Afull[n0:n1] if save else None)
        o3 = o[n0:n1].view(-1, G * C, Dv)
        torch.baddbmm(o3, intra.A.view(-1, G * C, C), vi.reshape(-1, C, Dv), beta=0, alpha=scale, out=o3)
        if save:
            sl = states[n0 : n1 + 1]
        else:
            sl = q.new_empty(n1 - n0 + 1, R, H, Dk, Dv)
            sl[0].copy_(S)
        torch.matmul(intra.kh.transpose(-1, -2), vi, out=sl[1:])
        _scan_states(sl.unbind(0), _decay(b).unbind(0), init, plan, finals, n0)
        if not save:
            S.copy_(sl[-1])
        o3.baddbmm_(intra.qb.view(-1, G * C, Dk), sl[:-1].view(-1, Dk, Dv))
    return o, finals, ((bfull, states, Afull) if save else None)


def backward(q, k, v, g, init, plan, scale, monotone, do, dfinal, need_dinit: bool, saved=None, outs=None):
    """do [N,R,H,G,C,Dv], dfinal [n_docs,H,Dk,Dv] or None. Returns (dq, dk, dv, dg, dinit).

    With ``saved`` = (b, states, A, finals) from ``forward(save=True)``, one pass walks the blocks
    in reverse, recomputing only the intra factors (no matmul), and carries dS back (``g`` is not
    read). ``outs`` = (dq, dk, dg) destinations of the shapes of q, k, g (strided views allowed),
    else they are allocated here. Without it,
    pass 1 scans the states forward and keeps only each block's entry state; pass 2 then also
    recomputes the block's states."""
    N, R, H, G, C, Dk = q.shape
    Dv, Dg = v.shape[-1], g.shape[-1]
    blk = _block_chunks(q)
    starts = list(range(0, N, blk))
    if saved is not None:
        bfull, states, Afull, finals = saved
    else:
        entry = q.new_empty(len(starts), R, H, Dk, Dv)
        finals = q.new_empty(plan.n_docs, H, Dk, Dv)
        S = q.new_zeros(R, H, Dk, Dv)
        for j, n0 in enumerate(starts):
            n1 = min(N, n0 + blk)
            b = g[n0:n1].cumsum(-2)
            kh = k[n0:n1] * (b[..., -1:, :] - b).exp_()
            entry[j].copy_(S)
            sl = q.new_empty(n1 - n0 + 1, R, H, Dk, Dv)
            sl[0].copy_(S)
            torch.matmul(kh.transpose(-1, -2), v[n0:n1], out=sl[1:])
            _scan_states(sl.unbind(0), _decay(b).unbind(0), init, plan, finals, n0)
            S.copy_(sl[-1])
    dsl_buf = None
    fin = None
    if dfinal is not None:
        fin = (dfinal * finals).sum(-1)  # [n_docs,H,Dk]: d/dB_T of the final state e^(B_T)(...)
        if Dg == 1:
            fin = fin.sum(-1, keepdim=True)
    if outs is not None:
        dq, dk, dg = outs
    else:
        dq, dk, dg = q.new_empty(q.shape), k.new_empty(k.shape), g.new_empty(g.shape)
    dv = v.new_empty(v.shape)
    dinit = q.new_empty(plan.n_docs, H, Dk, Dv) if need_dinit else None
    dS = q.new_zeros(R, H, Dk, Dv)
    rc = q.new_zeros(N + 1, R, H, Dg)  # reverse cumsum over chunks of the per-chunk dB totals
    for j in range(len(starts) - 1, -1, -1):
        n0 = starts[j]
        n1 = min(N, n0 + blk)
        qi, ki, vi = q[n0:n1], k[n0:n1], v[n0:n1]
        do3 = do[n0:n1].reshape(n1 - n0, R, H, G * C, Dv)
        b = bfull[n0:n1] if saved is not None else g[n0:n1].cumsum(-2)
        decay = _decay(b).unbind(0)
        intra = Intra(qi, ki, b, scale, monotone, A_saved=Afull[n0:n1] if saved is not None else None)
        if saved is not None:
            dqb = torch.matmul(do3, states[n0:n1].transpose(-1, -2))
            if dsl_buf is None:
                dsl_buf = q.new_empty(min(N, blk) + 1, R, H, Dk, Dv)
            sl = dsl_buf[: n1 - n0 + 1]
        else:
            sl = q.new_empty(n1 - n0 + 1, R, H, Dk, Dv)
            sl[0].copy_(entry[j])
            torch.matmul(intra.kh.transpose(-1, -2), vi, out=sl[1:])
            _scan_states(sl.unbind(0), decay, init, plan, None, n0)
            dqb = torch.matmul(do3, sl[:-1].transpose(-1, -2))
        sl[-1].copy_(dS)
        torch.matmul(intra.qb.transpose(-1, -2), do3, out=sl[:-1])  # reuse the buffer for dS
        _scan_dstates(sl.unbind(0), decay, dfinal, plan, dinit, n0)
        dS.copy_(sl[0])
        dS_out = sl[1:]
        dkh = torch.matmul(vi, dS_out.transpose(-1, -2))
        dvi = torch.matmul(intra.kh, dS_out, out=dv[n0:n1])
        v3, do33 = vi.reshape(-1, C, Dv), do3.view(-1, G * C, Dv)
        dvi.view(-1, C, Dv).baddbmm_(intra.A.view(-1, G * C, C).transpose(-1, -2), do33, alpha=scale)
        dA = q.new_empty(intra.A.shape)
        dA3 = dA.view(-1, G * C, C)
        torch.baddbmm(dA3, do33, v3.transpose(-1, -2), beta=0, alpha=scale, out=dA3)
        dA.view(n1 - n0, R, H, G, C, C).masked_fill_(~intra.tril, 0.0)
        dqi, dki = intra.backward(qi, ki, b, dA, dqb, dkh, dq[n0:n1], dk[n0:n1])
        # Gate gradient without pairwise terms: o and S depend on b only through q*e^B and
        # k*e^-B (B the document's cumulative gate), so dL/dB_t = sum(q_t dq_t) - k_t dk_t, plus
        # the final state's sum(dS_T * S_T) at the document's last position (the chunk's last,
        # possibly padding, position is equivalent); dg is its reverse cumsum per document.
        dB = torch.mul(qi[:, :, :, 0], dqi[:, :, :, 0]) if G == 1 else (qi * dqi).sum(3)
        dB.addcmul_(ki, dki, value=-1.0)
        if Dg == 1:
            dB = dB.sum(-1, keepdim=True)
        if fin is not None:
            for n in range(n0, n1):
                for row, doc in plan.ends.get(n, ()):
                    dB[n - n0, row, :, -1] += fin[doc]
        tot = dB.sum(-2)  # [n,R,H,Dg]
        rc[n0:n1] = tot.flip(0).cumsum(0).flip(0).add_(rc[n1])
        suffix = rc[n0 + 1 : n1 + 1] - rc.index_select(0, plan.doc_end[n0:n1])  # later chunks, same document
        cs = torch.cumsum(dB, -2)
        torch.add(torch.sub(dB, cs, out=cs), suffix.add_(tot).unsqueeze(-2), out=dg[n0:n1])
    return dq, dk, dv, dg, dinit
