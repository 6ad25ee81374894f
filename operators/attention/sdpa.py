"""``sdpa`` backend of ``attention``: torch's fused ``scaled_dot_product_attention`` on every
platform, with O(T·W) block-local sliding-window attention, sink tokens and document masking.

What torch 2.13 does on CPU (measured, B=1, H=4, T=4096, D=64, fp32, one thread): every form below
dispatches to the fused ``_scaled_dot_product_flash_attention_for_cpu`` kernel, masks and
``enable_gqa`` included. ``is_causal`` skips the key blocks above the diagonal; an explicit mask
does not (a tril bool mask costs what non-causal attention costs, ~2x ``is_causal``), and a float
mask makes the backward ~1.6x slower again than a bool one. Hence: ``is_causal`` wherever the
pattern allows it, bool masks elsewhere, and never a T x T mask for a window.

Layout: the op takes [B,T,H,D]; SDPA wants [B,H,T,D]. The transposed views go to the kernel as they
are (it takes strides; a copy bought nothing), and its output transposes back to [B,T,H,D].
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from operators.attention.op import attention
from operators.attention.reference import check_attention_args
from operators.registry import Backend

# Query block of the windowed path: ceil(W/2), within [MIN_BLOCK, MAX_BLOCK]. Each query computes
# W + blk scores, so smaller blocks waste less, but every block copies its W + blk keys and small
# blocks run the kernel less efficiently. Measured fwd+bwd on CPU (fp32, H=4, D=128, T=16k, one
# thread, noisy shared machine): W=512: blk W 10.1 s, W/2 3.6 s, W/4 5.4 s; W=4096: blk W 71 s,
# W/2 31 s, W/4 (1024) 26 s.
MIN_BLOCK = 64
MAX_BLOCK = 1024


def _sdpa(q, k, v, *, scale, mask=None, causal=False):
    """SDPA on [B,H,T,D] tensors with GQA. CPU kernels take ``enable_gqa`` with or without a mask;
    CUDA's memory-efficient kernel (the one that takes masks) does not and would fall back to the
    O(T^2)-memory math path, so there the key/value heads are repeated instead."""
    rep = q.shape[1] // k.shape[1]
    gqa = rep > 1
    if gqa and mask is not None and q.device.type != "cpu":
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def _with_sinks(k, v, sink_k, sink_v, batch):
    """Prepend the sinks ([S,Hkv,D]) to heads-first keys/values of ``batch`` rows."""
    if sink_k is None:
        return k, v
    S, Hkv, D = sink_k.shape
    sk = sink_k.to(k.dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, Hkv, S, D)
    sv = sink_v.to(v.dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, Hkv, S, D)
    return torch.cat([sk, k], dim=2), torch.cat([sv, v], dim=2)


def _full(q, k, v, *, causal, scale, sink_k, sink_v):
    """Full attention, heads-first. Queries align to the end of the keys (bottom-right causal)."""
    Tq = q.shape[2]
    k, v = _with_sinks(k, v, sink_k, sink_v, q.shape[0])
    L = k.shape[2] - Tq  # keys every query sees: the sinks and the past without queries
    if not causal or Tq == 1:
        return _sdpa(q, k, v, scale=scale)
    if L == 0:
        return _sdpa(q, k, v, scale=scale, causal=True)
    if L <= Tq:
        # SDPA's is_causal aligns top-left. L dummy queries in front shift the real ones to the
        # bottom-right alignment and keep the fused kernel's block skipping: (L+Tq)^2/2 scores
        # against Tq*(L+Tq) for an explicit mask, so this wins while L <= Tq.
        out = _sdpa(F.pad(q, (0, 0, L, 0)), k, v, scale=scale, causal=True)
        return out[:, :, L:]
    mask = torch.ones(Tq, L + Tq, dtype=torch.bool, device=q.device).tril(L)
    return _sdpa(q, k, v, scale=scale, mask=mask)


def _band_mask(rows, cols, offset, window, device):
    """True where 0 <= offset + i - j <= window (query i at key position offset + i)."""
    d = torch.arange(offset, offset + rows, device=device).unsqueeze(1) - torch.arange(cols, device=device)
    return (d >= 0) & (d <= window)


def _sink_cols(mask, n_sinks):
    """Sink keys sit in front of every block's keys and are never masked."""
    if not n_sinks:
        return mask
    return torch.cat([mask.new_ones(*mask.shape[:-1], n_sinks), mask], dim=-1)


def windowed(q, k, v, *, window, scale, sink_k=None, sink_v=None, block=None):
    """Causal sliding-window attention on heads-first q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D].

    Queries are cut into blocks of ``blk`` (default ``ceil(window/2)`` clamped to [MIN_BLOCK,
    MAX_BLOCK]); each block attends
    to the ``n_prev = ceil(window/blk)`` key blocks before it and its own, through one band mask that
    is the same for every block, all blocks batched into one SDPA call over [nb*B, H, blk, K]. Cost
    O(Tq*(window + blk)), never Tq*Tk. Keys are padded in front so that every block has n_prev
    blocks behind it; the first blocks, which see that padding, get their own call and mask.
    """
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    n_sinks = 0 if sink_k is None else sink_k.shape[0]
    # Keys before the first query's window are never seen: drop them (decode, chunked prefill).
    start = max(0, Tk - Tq - window)
    k, v = k[:, :, start:], v[:, :, start:]
    P = k.shape[2] - Tq  # past keys without a query; P <= window
    blk = block or max(MIN_BLOCK, min(MAX_BLOCK, -(-window // 2)))
    if Tq == 1:  # decode: every kept key is in the window
        kk, vv = _with_sinks(k, v, sink_k, sink_v, B)
        return _sdpa(q, kk, vv, scale=scale)
    n_prev = math.ceil(window / blk)
    front = n_prev * blk
    span = front + blk  # keys of one query block
    if P + Tq <= span:  # no more keys than one block has: one masked call over what is left
        mask = _sink_cols(_band_mask(Tq, P + Tq, P, window, q.device), n_sinks)
        kk, vv = _with_sinks(k, v, sink_k, sink_v, B)
        return _sdpa(q, kk, vv, scale=scale, mask=mask)

    nb = math.ceil(Tq / blk)
    pad_front, pad_end = front - P, nb * blk - Tq
    # Query blocks, ordered (block, batch) so the first blocks are one contiguous slice.
    qb = F.pad(q, (0, 0, 0, pad_end)).view(B, Hq, nb, blk, D).permute(2, 0, 1, 3, 4).reshape(nb * B, Hq, blk, D)

    def key_blocks(x):  # [B,Hkv,P+Tq,D] -> [nb*B, Hkv, span, D]; unfold is a view, reshape the one copy
        xp = F.pad(x, (0, 0, pad_front, pad_end)).unfold(2, span, blk)  # [B,Hkv,nb,D,span]
        return xp.permute(2, 0, 1, 4, 3).reshape(nb * B, x.shape[1], span, D)

    kb, vb = _with_sinks(key_blocks(k), key_blocks(v), sink_k, sink_v, nb * B)
    band = _band_mask(blk, span, front, window, q.device)
    # Blocks whose keys reach into the front padding (at most n_prev of them) also mask it.
    n_edge = min(nb, math.ceil(pad_front / blk))
    outs = []
    if n_edge:
        edge = torch.stack([band & (torch.arange(span, device=q.device) >= pad_front - b * blk) for b in range(n_edge)])
        edge = _sink_cols(edge, n_sinks).repeat_interleave(B, dim=0).unsqueeze(1)
        e = n_edge * B
        outs.append(_sdpa(qb[:e], kb[:e], vb[:e], scale=scale, mask=edge))
    if n_edge < nb:
        e = n_edge * B
        outs.append(_sdpa(qb[e:], kb[e:], vb[e:], scale=scale, mask=_sink_cols(band, n_sinks)))
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    out = out.view(nb, B, Hq, blk, D).permute(1, 2, 0, 3, 4).reshape(B, Hq, nb * blk, D)
    return out[:, :, :Tq]


def _attend(q, k, v, *, causal, window, scale, sink_k, sink_v):
    """One sequence batch, [B,T,H,D] in and out."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    Tk = k.shape[1]
    # A window reaching back past key 0 for every query is plain causal attention.
    if causal and window is not None and window < Tk - 1:
        out = windowed(qh, kh, vh, window=window, scale=scale, sink_k=sink_k, sink_v=sink_v)
    else:
        out = _full(qh, kh, vh, causal=causal, scale=scale, sink_k=sink_k, sink_v=sink_v)
    return out.transpose(1, 2)


def _doc_bounds(cu_seqlens, T):
    bounds = [int(x) for x in cu_seqlens.reshape(-1).tolist()]
    if cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(
            f"attention: cu_seqlens must be 1-D, start at 0 and end at the sequence length {T}; got {bounds}"
        )
    if any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"attention: cu_seqlens must be non-decreasing; got {bounds}")
    return bounds


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``attention_reference``, on torch's fused SDPA kernels."""
    check_attention_args(q, k, v, causal, window, sink_k, sink_v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kw = {"causal": causal, "window": window, "scale": scale, "sink_k": sink_k, "sink_v": sink_v}
    if cu_seqlens is None:
        return _attend(q, k, v, **kw)
    # Documents one by one: each gets the fused kernel (and is_causal) at the price of a Python
    # loop, which matters only for many very short documents.
    bounds = _doc_bounds(cu_seqlens, q.shape[1])
    outs = [_attend(q[:, a:b], k[:, a:b], v[:, a:b], **kw) for a, b in itertools.pairwise(bounds) if b > a]
    return torch.cat(outs, dim=1)


def _accepts(q, k, v, *args, **kwargs) -> str | None:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v must be tensors"
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"sdpa needs q, k, v of one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


attention.register(Backend(name="sdpa", fn=sdpa_attention, priority=10, accepts=_accepts))
