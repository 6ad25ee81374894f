"""Activation-memory terms shared by the mixer kinds and the planner (``sbtrain.plan.activations``).

Each mixer kind declares the bytes its forward saves for backward (``MixerKind.activations``) from
these terms; the planner adds the norms, FFNs, LM head and checkpointing around them. The formulas
were read off the code and are checked against what autograd saves in ``tests/plan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FP32 = 4
GLA_CHUNK = 64  # operators.gla.chunked.DEFAULT_CHUNK
GLA_SAVE_STATES_BYTES = 1 << 30  # operators.gla.chunk_kernels.SAVE_STATES_BYTES
SDPA_MIN_BLOCK, SDPA_MAX_BLOCK = 64, 1024  # operators.attention.sdpa
CE_CHUNK = 4096  # operators.chunked_cross_entropy: default chunk_size (the model passes none)


@dataclass(frozen=True)
class Shapes:
    """Per-rank shapes of one micro batch: tokens, local heads and widths, activation width."""

    B: int
    T: int  # tokens per row on this rank (seq_len / cp)
    cp: int
    tp: int
    d: int
    hq: int  # query heads on this rank (/ tp)
    hkv: int
    D: int
    inter: int  # dense FFN columns on this rank (/ tp)
    a: int  # 2 under bf16 autocast, else 4
    window: int
    sinks: int
    gate_rank: int
    vocab_rows: int  # LM-head rows on this rank (/ tp)
    device: str = "cpu"  # cuda: fla's GLA kernel and SDPA's GQA repeat (below); cpu: what was measured

    @property
    def N(self) -> int:  # tokens one mixer / FFN sees (gathered over TP)
        return self.B * self.T

    @property
    def Nr(self) -> int:  # residual-stream tokens on this rank (sequence parallel over TP)
        return self.B * self.T // self.tp


def lin_in(s: Shapes, consumers: int, width: int, tokens: int | None = None) -> int:
    """Inputs saved by ``consumers`` Linears reading one tensor of ``width`` features: fp32 saves the
    shared tensor once; bf16 autocast casts (and saves) a bf16 copy per Linear."""
    n = s.N if tokens is None else tokens
    return n * width * (FP32 if s.a == FP32 else 2 * consumers)


def rms_saved(elements: int, rows: int, a_in: int, x_counted: bool = False) -> int:
    """``ops.rms_norm`` (HF numerics): pow saves x.float() (the input itself when fp32), rsqrt its
    result (one float per row), the weight-mul the normalised x cast back to the input dtype."""
    x = 0 if (x_counted and a_in == FP32) else elements * FP32
    return x + rows * FP32 + elements * a_in


def rotary_per_layer(s: Shapes) -> int:
    """fp32: cos/sin [B,T,D] are computed once per forward (counted in :func:`per_forward`); bf16:
    each rotary call saves its own bf16 cos and sin (q and k: four [B,T,D] copies per layer)."""
    return 0 if s.a == FP32 else 4 * s.N * s.D * 2


def gla_core(s: Shapes, hq: int, views_ok: bool) -> tuple[int, int]:
    """(saved, workspace) of the GLA op in training. CUDA (the ``fla`` backend, fla 0.6's
    ``chunk_gla``, read from its code, not measured here): k, v and g expanded to the query heads
    for GQA (copies unless G = 1), the fp32 cumulative gate, A [B,T,Hq,64] fp32; states recomputed.
    Otherwise the chunked Function (``operators/gla/chunked.py``):

    It keeps the packed q, k (strided views of the caller's fp32 q/k when the rows are whole
    chunks: no copy), packed v, the cumulative gate b, every chunk's entry state
    [(n+1), B, Hkv, Dk, Dv], the intra-chunk scores A [n, B, Hkv, G*C, C] and a clone of the final
    state; when states + A exceed SAVE_STATES_BYTES it keeps only q, k, v, g and recomputes."""
    n = math.ceil(s.T / GLA_CHUNK)
    Tp, D, hkv = n * GLA_CHUNK, s.D, s.hkv
    if s.device == "cuda":
        N = s.N
        kv = N * hkv * D * s.a if hq == hkv else 2 * N * hq * D * s.a  # v only, or expanded k and v
        saved = kv + N * hq * D * FP32 + N * hq * GLA_CHUNK * FP32
        return saved, N * (2 * hq + 3 * hq) * D * FP32  # dq dk dv dg, dO; the state recompute is per chunk
    state_bytes = FP32 * (n + 1) * s.B * hkv * (D * D + (hq // hkv) * GLA_CHUNK * GLA_CHUNK)
    if state_bytes <= GLA_SAVE_STATES_BYTES:
        packed_qk = 0 if views_ok else s.B * Tp * (hq + hkv) * D * FP32
        saved = (packed_qk + 2 * s.B * Tp * hkv * D * FP32  # packed q/k, v, b
                 + (n + 1) * s.B * hkv * D * D * FP32  # chunk entry states
                 + s.B * Tp * hq * GLA_CHUNK * FP32  # A
                 + s.B * hkv * D * D * FP32)  # final state
    else:  # q and k are already saved by the feature maps: v (the projection's) and the fp32 gate
        saved = s.N * hkv * D * (s.a + FP32)
    # Backward: dO packed, dq/dk/dv/dg unpacked fp32, ~10 token-sized temporaries per block of
    # chunks (blocks of BLOCK_BYTES = 8 MB per token-sized tensor, or the whole sequence if smaller).
    workspace = s.B * Tp * (2 * hq + 3 * hkv) * D * FP32 + 10 * min(8 << 20, s.B * Tp * hq * D * FP32)
    return saved, workspace


def sdpa_core(s: Shapes, window: int | None, past: int = 0) -> tuple[int, int, int]:
    """(saved, reshaped output copy, workspace) of ``ops.attention`` (sdpa backend) over T queries and
    ``past + T`` keys. The fused kernel saves its q, k, v, output and log-sum-exp.

    Sliding window (W < keys - 1): queries in blocks of blk = clamp(ceil(W/2), 64, 1024), each
    block batched against its ``span = ceil(W/blk)*blk + blk`` keys. With one row the padded q/k/v
    are strided views of one padded copy each; with B > 1 (or sinks, which are concatenated in
    front of every block's keys) the key blocks are materialised, span/blk times the keys. The
    band masks are saved as fp32. The output is reshaped back to [B,T,H,D] (a copy).
    Full: q/k/v are the caller's tensors (rotary outputs, the v projection) unless sinks are
    concatenated in front of k/v (copies, and q padded by S to keep the causal kernel). The fused
    kernel's output is laid out [B,T,H,D] in memory, so the caller's transpose is a free view
    (reshaped output copy 0)."""
    B, T, hq, hkv, D, a, S = s.B, s.T, s.hq, s.hkv, s.D, s.a, s.sinks
    # CUDA's mask-taking kernel has no GQA: with a mask, k/v are repeated to the query heads.
    masked_heads = hq if s.device == "cuda" else hkv
    Tk = past + T
    if window is not None and window < Tk - 1:
        Tk -= max(0, Tk - T - window)
        P = Tk - T
        blk = max(SDPA_MIN_BLOCK, min(SDPA_MAX_BLOCK, -(-window // 2)))
        front = math.ceil(window / blk) * blk
        span = front + blk
        if P + T > span:
            nb = math.ceil(T / blk)
            if S or B > 1 or masked_heads != hkv:
                kv = nb * B * (S + span) * masked_heads * D * a
            else:
                kv = (front + nb * blk) * hkv * D * a
            n_edge = min(nb, math.ceil((front - P) / blk))
            masks = (n_edge * B + (1 if n_edge < nb else 0)) * blk * (S + span) * a  # in the q dtype
            q_out = nb * blk * B * hq * D * a
            saved = 2 * q_out + 2 * kv + masks + nb * blk * B * hq * FP32
            return saved, q_out, 2 * q_out + 2 * kv
        # One masked call over all keys: q as is, k/v with sinks concatenated.
        kv = B * (S + Tk) * masked_heads * D * a
        saved = 2 * B * T * hq * D * a + 2 * kv + T * (S + Tk) * a + B * hq * T * FP32
        return saved, 0, 2 * B * T * hq * D * a + 2 * kv
    if S:
        kv = B * (S + Tk) * hkv * D * a
        q = B * (S + T) * hq * D * a
    else:
        kv = B * Tk * hkv * D * a
        q = B * T * hq * D * a
    saved = 2 * q + 2 * kv + B * hq * (S + T) * FP32
    return saved, 0, 2 * q + 2 * kv


def cp_linear_extra(s: Shapes) -> int:
    """LASP-2 under CP (``parallel/context_parallel/linear.py``): the local state from zero keeps the
    fp32 decay weights, k * weights and v (fp32 copies of k and v under bf16)."""
    if s.cp == 1:
        return 0
    per = s.N * s.hkv * s.D * FP32
    return 3 * per + (per if s.a != FP32 else 0)
