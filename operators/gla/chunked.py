"""Chunked gated linear attention: backend ``chunked`` of ``ops.gla`` (cpu, cuda, maca).

Same signature and semantics as ``operators.gla.reference.gla_reference``. The training path is
a custom ``autograd.Function`` with an explicit backward (a reverse scan for dS; autograd
through a chunk loop costs 3-15x the forward on CPU, docs/DESIGN_NOTES.md §7). The training forward keeps
the packed inputs, the cumulative gate and every chunk's entry state (up to
``chunk_kernels.SAVE_STATES_BYTES``), so the backward neither repacks nor recomputes states;
beyond that it keeps only the inputs and recomputes the states from per-block entry states. The
math lives in ``chunk_kernels``; this module packs tokens into chunks and back.

Every tensor the backward reads goes through ``ctx.save_for_backward``; the ctx keeps only Python
metadata (chunk layout, document plan). That is what lets activation checkpointing
(``torch.utils.checkpoint``, non-reentrant) and other saved-tensor hooks (CPU offload) drop or
move them: a tensor held as a plain ctx attribute stays alive from the forward to the backward
whatever the hooks do (for sb7b_tiny ~5 KB per token and GLA layer: A, chunk states, b, packed v,
every GLA layer's at once, 20 KB per token in all).

Documents (``cu_seqlens``) are handled per segment: each document is copied to start on a chunk
edge and zero-padded to whole chunks, so no chunk mixes documents and the state simply
restarts at each document's first chunk. Zero keys and zero log-decay on padding leave the
state unchanged. The cost is up to C-1 padding tokens per document.

Under ``torch.compile`` the same math runs as the opaque custom op ``sbtrain::gla_chunked``
(docs/COMPILE.md), whose backward recomputes the chunk states.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import torch

from operators.gla import chunk_kernels as K
from operators.gla.op import gla
from operators.gla.reference import check_gla_args
from operators.registry import Backend

DEFAULT_CHUNK = 64


def _segments(B: int, T: int, C: int, cu_seqlens):
    """[(row in input, start, end, packed row, first chunk)], packed rows, chunks per row, Plan."""
    if cu_seqlens is None:
        N = max(1, -(-T // C))
        segs = [(b, 0, T, b, 0) for b in range(B)]
        starts = {0: [(b, b) for b in range(B)]}
        ends = {N - 1: [(b, b) for b in range(B)]}
        doc_end = [N] * N
        return segs, B, N, K.Plan(starts, ends, torch.tensor(doc_end), B)
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != T or any(e < s for s, e in pairwise(bounds)):
        raise ValueError(
            f"gla: cu_seqlens must rise from 0 to T={T} (document boundaries of the packed row); got {bounds}"
        )
    segs, starts, ends, doc_end, c0 = [], {}, {}, [], 0
    for doc, (s, e) in enumerate(pairwise(bounds)):
        n = max(1, -(-(e - s) // C))  # an empty document still gets its (initial) final state
        segs.append((0, s, e, 0, c0))
        starts.setdefault(c0, []).append((0, doc))
        ends.setdefault(c0 + n - 1, []).append((0, doc))
        doc_end += [c0 + n] * n
        c0 += n
    return segs, 1, c0, K.Plan(starts, ends, torch.tensor(doc_end), len(bounds) - 1)


def _pack(x, segs, R, N, C, H, G, D):
    """x [B,T,H*G,D] -> fp32 [N,R,H,G,C,D] (one copy; padding zeroed). A strided view instead of
    the copy (fp32, no documents, whole chunks) measured no faster on this CPU, so we always copy."""
    buf = torch.empty(N, R, H, G, C, D, dtype=torch.float32, device=x.device)
    w = buf.permute(1, 0, 4, 2, 3, 5)  # [R,N,C,H,G,D] view of the buffer
    for b, s, e, r, c0 in segs:
        L = e - s
        f, rem = divmod(L, C)
        if f:
            w[r, c0 : c0 + f].copy_(x[b, s : s + f * C].reshape(f, C, H, G, D))
        if rem or not L:
            w[r, c0 + f, :rem].copy_(x[b, s + f * C : e].reshape(rem, H, G, D))
            w[r, c0 + f, rem:].zero_()
    return buf


def _view(x, C, H, G, D):
    """x [B,T,H*G,D] as a strided [N,B,H,G,C,D] view when that needs no copy, else None."""
    B, T = x.shape[:2]
    if x.dtype != torch.float32 or T % C or T == 0 or x.stride(-1) != 1:
        return None
    try:
        return x.view(B, T // C, C, H, G, D).permute(1, 0, 3, 4, 2, 5)
    except RuntimeError:
        return None


def _or(x, make):
    return make() if x is None else x


def _unpack(buf, segs, B, T, C, dtype):
    """fp32 [N,R,H,G,C,D] -> [B,T,H*G,D] in ``dtype``."""
    _, _, H, G, _, D = buf.shape
    out = torch.empty(B, T, H * G, D, dtype=dtype, device=buf.device)
    w = buf.permute(1, 0, 4, 2, 3, 5)
    for b, s, e, r, c0 in segs:
        f, rem = divmod(e - s, C)
        if f:
            out[b, s : s + f * C].view(f, C, H, G, D).copy_(w[r, c0 : c0 + f])
        if rem:
            out[b, s + f * C : e].view(rem, H, G, D).copy_(w[r, c0 + f, :rem])
    return out


class _Packed:
    def __init__(self, q, k, v, g, scale, C, cu_seqlens):
        B, T, Hq, Dk = q.shape
        H, Dv = k.shape[2], v.shape[-1]
        self.B, self.T, self.C, self.G, self.H = B, T, C, Hq // H, H
        self.segs, self.R, self.N, self.plan = _segments(B, T, C, cu_seqlens)
        self.plan.doc_end = self.plan.doc_end.to(q.device)
        pk = lambda x, G, D: _pack(x, self.segs, self.R, self.N, C, H, G, D)
        # q, k and g are only read by elementwise ops and cumsum, which take strided views
        # (whole chunks, no documents, fp32): no copy. v feeds matmuls directly, so it is packed.
        vw = lambda x, G, D: _view(x, C, H, G, D) if cu_seqlens is None else None
        self.q = _or(vw(q, self.G, Dk), lambda: pk(q, self.G, Dk))
        self.k = _or(vw(k, 1, Dk), lambda: pk(k, 1, Dk)).squeeze(3)
        self.v = pk(v, 1, Dv).squeeze(3)
        g4 = g if g.dim() == 4 else g.unsqueeze(-1)
        self.g = _or(vw(g4, 1, g4.shape[-1]), lambda: pk(g4, 1, g4.shape[-1])).squeeze(3)
        # Decays (g <= 0) let the kernel read b's range off the chunk ends instead of reducing.
        self.monotone = bool(g.max() <= 0) if g.numel() else True

    def unpack(self, x6, dtype):
        return _unpack(x6, self.segs, self.B, self.T, self.C, dtype)

    def detach_tensors(self) -> _Packed:
        """Drop the tensors, keep the layout: what the ctx may hold as a plain attribute."""
        self.q = self.k = self.v = self.g = None
        return self

    def attach(self, q, k, v, g) -> _Packed:
        self.q, self.k, self.v, self.g = q, k, v, g
        return self


def _meta(q, k, v, g) -> tuple:
    return (q.dtype, k.dtype, v.dtype, g.dtype, g.dim(), q.shape[2], v.shape[-1])


class ChunkedGLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, cu_seqlens, training=True):
        p = _Packed(q, k, v, g, scale, chunk_size, cu_seqlens)
        init = None if initial_state is None else initial_state.float()
        # Training: keep the packed inputs, b and the chunk states when they fit in
        # K.SAVE_STATES_BYTES, so the backward neither repacks nor recomputes the states.
        state_bytes = 4 * (p.N + 1) * p.R * p.H * (q.shape[-1] * v.shape[-1] + p.G * p.C * p.C)
        save = training and state_bytes <= K.SAVE_STATES_BYTES
        o, finals, saved = K.forward(p.q, p.k, p.v, p.g, init, p.plan, scale, p.monotone, save=save)
        ctx.cfg = (scale, chunk_size, cu_seqlens)
        ctx.meta = _meta(q, k, v, g)
        if save:
            # p.q / p.k may be views of q / k: saved as such, autograd's version check still
            # catches in-place changes to the inputs. b replaces g, which the backward never reads.
            # finals is cloned: the caller may update the returned state in place (decode cache).
            bfull, states, A = saved
            ctx.save_for_backward(initial_state, p.q, p.k, p.v, bfull, states, A, finals.clone())
            ctx.packed = p.detach_tensors()
        else:
            ctx.save_for_backward(q, k, v, g, initial_state)
            ctx.packed = None
        ctx.set_materialize_grads(False)  # an unused final state needs no zero tensor
        return p.unpack(o.view(p.N, p.R, p.H, p.G, p.C, -1), q.dtype), finals

    @staticmethod
    def backward(ctx, do, dfinal):
        scale, C, cu_seqlens = ctx.cfg
        if ctx.packed is not None:
            initial_state, pq, pk, pv, bfull, states, A, finals = ctx.saved_tensors
            # A copy: the ctx keeps its tensor-free layout (a retained graph may run backward again).
            p, saved = copy.copy(ctx.packed).attach(pq, pk, pv, None), (bfull, states, A, finals)
            g6 = bfull
        else:
            q, k, v, g, initial_state = ctx.saved_tensors
            p = _Packed(q, k, v, g, scale, C, cu_seqlens)
            saved, g6 = None, p.g
        need_dinit = initial_state is not None and ctx.needs_input_grad[4]
        grads = _backward(p, saved, g6, initial_state, do, dfinal, scale, cu_seqlens, ctx.meta, need_dinit)
        return *grads, None, None, None, None


def _backward(p: _Packed, saved, g6, initial_state, do, dfinal, scale, cu_seqlens, meta, need_dinit):
    """(dq, dk, dv, dg, dinit or None) of the packed inputs ``p`` (with the forward's ``saved``
    tensors, or None to recompute the states)."""
    C = p.C
    q_dtype, k_dtype, v_dtype, g_dtype, g_dim, Hq, Dv = meta
    init = None if initial_state is None else initial_state.float()
    if do is None:
        do = torch.zeros(p.B, p.T, Hq, Dv, dtype=q_dtype, device=p.q.device)
    do6 = _pack(do, p.segs, p.R, p.N, C, p.H, p.G, do.shape[-1])
    dfinal = None if dfinal is None else dfinal.float()
    # Whole chunks, no documents, fp32: dq, dk, dg are written straight into the returned
    # tensors through strided views (no unpack copy).
    outs = None
    if cu_seqlens is None and p.T % C == 0 and p.T and {q_dtype, k_dtype, g_dtype} == {torch.float32}:
        Dk, Dg = p.q.shape[-1], g6.shape[-1]
        full = [p.q.new_empty(p.B, p.T, h, d) for h, d in ((Hq, Dk), (p.H, Dk), (p.H, Dg))]
        outs = (_view(full[0], C, p.H, p.G, Dk), _view(full[1], C, p.H, 1, Dk).squeeze(3))
        outs += (_view(full[2], C, p.H, 1, Dg).squeeze(3),)
    dq, dk, dv, dg, dinit = K.backward(
        p.q, p.k, p.v, g6, init, p.plan, scale, p.monotone, do6, dfinal, need_dinit, saved=saved, outs=outs
    )
    if outs is not None:
        dq, dk, dg = full
    else:
        dq = p.unpack(dq, q_dtype)
        dk = p.unpack(dk.unsqueeze(3), k_dtype)
        dg = p.unpack(dg.unsqueeze(3), g_dtype)
    dv = p.unpack(dv.view(p.N, p.R, p.H, 1, C, -1), v_dtype)
    if g_dim == 3:
        dg = dg.squeeze(-1)
    if dinit is not None:
        dinit = dinit.to(initial_state.dtype)
    return dq, dk, dv, dg, dinit


# Under torch.compile the chunked GLA is one opaque op (``sbtrain::gla_chunked``): dynamo would
# otherwise trace into the autograd.Function and break the graph at its host-side decisions (the
# monotone-gate check, the chunks that need the exact pairwise form, the per-document loops), and
# inductor would unroll the chunk scan. The compiled forward keeps only its inputs, so the
# compiled backward recomputes the chunk states (the eager forward keeps them when they fit).
@torch.library.custom_op("sbtrain::gla_chunked", mutates_args=())
def _gla_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float,
    chunk_size: int,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _Packed(q, k, v, g, scale, chunk_size, cu_seqlens)
    init = None if initial_state is None else initial_state.float()
    o, finals, _ = K.forward(p.q, p.k, p.v, p.g, init, p.plan, scale, p.monotone)
    return p.unpack(o.view(p.N, p.R, p.H, p.G, p.C, -1), q.dtype), finals


@_gla_op.register_fake
def _(q, k, v, g, initial_state, scale, chunk_size, cu_seqlens):
    B, T, Hq, Dk = q.shape
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    finals = q.new_empty(n, k.shape[2], Dk, v.shape[-1], dtype=torch.float32)
    return q.new_empty(B, T, Hq, v.shape[-1]), finals


@torch.library.custom_op("sbtrain::gla_chunked_backward", mutates_args=())
def _gla_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dfinal: torch.Tensor | None,
    scale: float,
    chunk_size: int,
    cu_seqlens: torch.Tensor | None,
    need_dinit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _Packed(q, k, v, g, scale, chunk_size, cu_seqlens)
    dq, dk, dv, dg, dinit = _backward(
        p, None, p.g, initial_state, do, dfinal, scale, cu_seqlens, _meta(q, k, v, g), need_dinit
    )
    return dq, dk, dv, dg, (q.new_empty(0) if dinit is None else dinit)  # an op returns tensors only


@_gla_backward_op.register_fake
def _(q, k, v, g, initial_state, do, dfinal, scale, chunk_size, cu_seqlens, need_dinit):
    dinit = torch.empty_like(initial_state) if need_dinit else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dinit


def _gla_op_setup(ctx, inputs, output):
    q, k, v, g, initial_state, scale, chunk_size, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
    ctx.cfg = (scale, chunk_size)


def _gla_op_backward(ctx, do, dfinal):
    q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
    scale, chunk_size = ctx.cfg
    need_dinit = initial_state is not None and ctx.needs_input_grad[4]
    if do is None:
        do = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    dq, dk, dv, dg, dinit = _gla_backward_op(
        q, k, v, g, initial_state, do, dfinal, scale, chunk_size, cu_seqlens, need_dinit
    )
    return dq, dk, dv, dg, (dinit if need_dinit else None), None, None, None


_gla_op.register_autograd(_gla_op_backward, setup_context=_gla_op_setup)


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Chunked GLA; see ``gla_reference`` for the contract. Internal math is fp32."""
    check_gla_args(q, k, v, g, initial_state, cu_seqlens)
    if int(chunk_size) < 1:
        raise ValueError(f"gla: chunk_size must be a positive number of tokens, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # needs_input_grad is set even under no_grad: decide here whether a backward can follow.
    tensors = (q, k, v, g) + (() if initial_state is None else (initial_state,))
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        o, final = _gla_op(q, k, v, g, initial_state, scale, int(chunk_size), cu_seqlens)
    else:
        o, final = ChunkedGLA.apply(q, k, v, g, initial_state, scale, int(chunk_size), cu_seqlens, training)
    return o, (final if output_final_state else None)


gla.register(Backend(name="chunked", fn=gla_chunked, priority=10, platforms=("cpu", "cuda", "maca")))
