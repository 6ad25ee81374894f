"""Chunked gated delta rule: backend ``chunked`` of ``ops.gated_delta`` (cpu, cuda, maca).

Same signature and semantics as ``operators.gated_delta.naive.gated_delta_reference``. Plain
torch ops, so autograd gives the backward (gradients reach q, k, v, g, beta and the initial
state); the math runs in fp32 (fp64 for fp64 inputs).

The chunk form (the WY / UT transform of the GDN paper, as fla's ``chunk_gated_delta_rule``).
In a chunk of C tokens entered with state ``S0``, let ``gamma_t`` be the cumulative log-decay
inside the chunk (``Gamma_t = exp(gamma_t)``). The recurrence ``S = e^g S; u = beta (v - S^T k);
S += k u^T`` unrolls to::

    u_t = beta_t (v_t - Gamma_t S0^T k_t - sum_{j<t} e^{gamma_t - gamma_j} (k_t . k_j) u_j)

i.e. ``(I + A) U = beta V - beta Gamma K S0`` with ``A`` strictly lower triangular,
``A_tj = beta_t e^{gamma_t - gamma_j} k_t . k_j``. One triangular solve per chunk (for every chunk
at once, it does not depend on the state) gives ``U' = (I+A)^-1 beta V`` and
``W = (I+A)^-1 beta Gamma K``; then a scan over the chunks does only ``U = U' - W S0`` and
``S_C = Gamma_C S0 + sum_j e^{gamma_C - gamma_j} k_j u_j^T``, and the output is, for every chunk
at once, ``o_t = scale (Gamma_t q_t^T S0 + sum_{j<=t} e^{gamma_t - gamma_j} (q_t . k_j) u_j)``.

Documents (``cu_seqlens``) are copied each to start on a chunk edge, zero-padded to whole
chunks (an empty document gets one chunk of padding, so its final state is its initial state);
the scan restarts the state at each document's first chunk. Padding has k = v = q = 0,
g = 0 and beta = 0, which leaves the state unchanged.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from operators.gated_delta.naive import check_gated_delta_args
from operators.gated_delta.op import gated_delta
from operators.registry import Backend

DEFAULT_CHUNK = 64


def _layout(T: int, C: int, cu_seqlens):
    """``(index, inverse, starts, ends)`` of the packed row for documents (``index``: for every
    padded position the token it holds, T for padding; ``inverse``: each token's padded position;
    ``starts`` / ``ends``: {chunk: document} of each document's first / last chunk)."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    index, inverse, starts, ends, c0 = [], [], {}, {}, 0
    for doc, (s, e) in enumerate(pairwise(bounds)):
        n = max(1, -(-(e - s) // C))
        inverse.extend(range(c0 * C, c0 * C + e - s))
        index.extend(range(s, e))
        index.extend([T] * (n * C - (e - s)))
        starts[c0] = doc
        ends[c0 + n - 1] = doc
        c0 += n
    return index, inverse, starts, ends


def gated_delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Chunked gated delta rule; see ``gated_delta_reference`` for the contract."""
    check_gated_delta_args(q, k, v, g, beta, initial_state, cu_seqlens)
    C = int(chunk_size)
    if C < 1:
        raise ValueError(f"gated_delta: chunk_size must be a positive number of tokens, got {chunk_size}")
    B, T, Hq, Dk = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = Hq // H
    scale = Dk**-0.5 if scale is None else float(scale)
    out_dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))

    # --- pack into R rows of N chunks of C tokens: [R, N*C, ...] ---------------------------------
    if cu_seqlens is None:
        R, N = B, max(1, -(-T // C))
        pad = N * C - T
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
            g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
        starts, ends, inverse = {0: None}, {N - 1: None}, None
    else:
        index, inverse, starts, ends = _layout(T, C, cu_seqlens)
        R, N = 1, len(index) // C
        index = torch.tensor(index, dtype=torch.long, device=q.device)
        inverse = torch.tensor(inverse, dtype=torch.long, device=q.device)

        def gather(t):  # [1, T, ...] -> [1, N*C, ...], padding from an appended zero row
            flat = torch.cat([t[0], t.new_zeros(1, *t.shape[2:])])
            return flat.index_select(0, index).unsqueeze(0)

        q, k, v, g, beta = (gather(t) for t in (q, k, v, g, beta))

    # [R, H, N, C, D] (k, v), [R, H, N, G, C, Dk] (q), [R, H, N, C] (g, beta)
    q = q.view(R, N, C, H, G, Dk).permute(0, 3, 1, 4, 2, 5)
    k = k.view(R, N, C, H, Dk).permute(0, 3, 1, 2, 4)
    v = v.view(R, N, C, H, Dv).permute(0, 3, 1, 2, 4)
    g = g.view(R, N, C, H).permute(0, 3, 1, 2)
    beta = beta.view(R, N, C, H).permute(0, 3, 1, 2)

    # --- per chunk, independent of the state --------------------------------------------------
    gc = g.cumsum(-1)  # gamma_t, cumulative log-decay inside the chunk
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)  # gamma_t - gamma_j
    decay = diff.masked_fill(~lower, float("-inf")).exp()  # e^{gamma_t - gamma_j} for j <= t, else 0
    kk = k @ k.transpose(-1, -2)
    A = (beta.unsqueeze(-1) * kk * decay).tril(-1)  # strictly lower; the solve reads only this
    bk = beta.unsqueeze(-1) * k
    rhs = torch.cat([beta.unsqueeze(-1) * v, bk * gc.exp().unsqueeze(-1)], dim=-1)
    x = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u0, w = x[..., :Dv], x[..., Dv:]  # U' = (I+A)^-1 beta V, W = (I+A)^-1 beta Gamma K
    k_end = k * (gc[..., -1:] - gc).exp().unsqueeze(-1)  # k_j e^{gamma_C - gamma_j}
    chunk_decay = gc[..., -1].exp()  # [R, H, N]

    # --- the scan over chunks: the state entering each chunk, and U --------------------------
    zero = q.new_zeros(R, H, Dk, Dv)
    init = None if initial_state is None else initial_state.to(acc)
    state, entering, us, finals = zero, [], [], {}
    # unbind (one stack in the backward) instead of indexing per chunk (a zero-filled full-size
    # gradient per index in the backward: quadratic in the number of chunks)
    u0_c, w_c, k_end_c = u0.unbind(2), w.unbind(2), k_end.transpose(-1, -2).unbind(2)
    decay_c = chunk_decay[..., None, None].unbind(2)
    for c in range(N):
        if c in starts:
            doc = starts[c]
            if init is None:
                state = zero
            else:
                state = init if doc is None else init[doc : doc + 1]
        entering.append(state)
        u = u0_c[c] - w_c[c] @ state
        us.append(u)
        state = decay_c[c] * state + k_end_c[c] @ u
        if c in ends:
            finals[ends[c]] = state
    S = torch.stack(entering, dim=2)  # [R, H, N, Dk, Dv]
    U = torch.stack(us, dim=2)  # [R, H, N, C, Dv]

    # --- outputs, every chunk at once --------------------------------------------------------
    qg = q * gc.exp().unsqueeze(-1).unsqueeze(3)
    o = qg @ S.unsqueeze(3)  # [R, H, N, G, C, Dv]
    scores = (q @ k.transpose(-1, -2).unsqueeze(3)) * decay.unsqueeze(3)
    o = (o + scores @ U.unsqueeze(3)) * scale
    o = o.permute(0, 2, 4, 1, 3, 5).reshape(R, N * C, Hq, Dv)
    if inverse is None:
        o = o[:, :T]
    else:
        o = o[0].index_select(0, inverse).unsqueeze(0)
    o = o.to(out_dtype)

    final = None
    if output_final_state:
        final = finals[None] if cu_seqlens is None else torch.cat([finals[d] for d in range(len(finals))])
    return o, final


gated_delta.register(Backend(name="chunked", fn=gated_delta_chunked, priority=10, platforms=("cpu", "cuda", "maca")))
