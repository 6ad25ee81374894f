"""Activation bytes per block kind: what autograd saves for backward, tensor by tensor.

Every term below names the tensor the training code keeps and why (which op saves it), for one
micro batch of ``B`` rows of ``T`` tokens on this rank (T = seq_len / cp). The formulas were read
off the code and checked against the bytes autograd actually saves (``saved_tensors_hooks``,
unique storages, parameters excluded) for every kind in fp32 and bf16: ``tests/plan``.

Dtypes: the residual stream is fp32 (fp32 embeddings, fp32 adds); under bf16 autocast every
``nn.Linear`` casts its input to bf16 on its own (q, k and v each save a bf16 copy of the normed
input), while in fp32 the shared input is saved once. ``a`` is the matmul activation width (2 or 4
bytes). Tensor parallelism: the mixer and FFN see the whole sequence (gathered) with ``1/tp`` of
the heads / FFN columns; the norms see ``1/tp`` of the tokens (sequence parallel). MoE layers run
replicated on the gathered tokens under TP.

Workspace terms are the gradients and temporaries alive beside the saved set while a block runs
its backward. Backward runs the FFN first: at its start everything the block saved is alive and the
SwiGLU's two fresh gradients join it; by the time the mixer runs, the FFN's saved tensors are
gone, so the mixer's temporaries only count where they exceed them. Estimates from the kernels'
code, checked against the CPU's resident set (benchmarks/plan_vs_measured.py), not exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


def residual_norm(s: Shapes) -> int:
    """input_layernorm / post_attention_layernorm: fp32 x, rsqrt, fp32 normalised x, on Nr tokens."""
    return rms_saved(s.Nr * s.d, s.Nr, FP32)


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


def mlp_saved(s: Shapes, inter: int, tokens: int, input_counted: bool = False) -> int:
    """SwiGLU: the Linears' inputs, gate and up outputs (silu and the product save them), silu's
    output, the product (down_proj's input): four [tokens, inter] tensors."""
    x = 0 if (input_counted and s.a == FP32) else lin_in(s, 2, s.d, tokens)
    return x + 4 * tokens * inter * s.a


def mlp_workspace(s: Shapes, inter: int, tokens: int) -> int:
    """The product's backward makes d(silu) and d(up) [tokens, inter] before the saved factors go."""
    return 2 * tokens * inter * s.a


def moe_saved(s: Shapes, moe, inter_e: int) -> tuple[int, int]:
    """(saved, workspace) of a MoE FFN on N tokens (gathered under TP: replicated compute).

    The router runs in fp32 on the fp32 normed input (saved), softmax scores, top-k ids, the sort
    order and token index (int64), the z-loss's logits; the routed path runs in fp32 even under autocast (the grouped
    GEMM is not autocast): gathered rows [N*k, d], four [N*k, I_e] SwiGLU tensors, the expert
    output and its weighted copy, the combine weights. Expert parallelism moves rows, not sizes
    (balanced routing assumed). The shared expert is a dense SwiGLU of num_shared x I_e columns."""
    N, k, d = s.N, moe.top_k, s.d
    nk = N * k
    saved = (N * d * FP32 + N * moe.num_experts * FP32 + 3 * nk * 8 + nk * FP32
             + 3 * nk * d * FP32 + 4 * nk * inter_e * FP32)
    if moe.z_loss_coef:
        saved += N * moe.num_experts * FP32 + N * FP32  # logsumexp(logits) saves the logits and its result
    workspace = 2 * nk * inter_e * FP32 + nk * d * FP32  # SwiGLU gradients, d(expert output)
    if moe.num_shared_experts:
        shared = inter_e * moe.num_shared_experts
        saved += mlp_saved(s, shared, N, input_counted=True)
        workspace = max(workspace, mlp_workspace(s, shared, N))
    return saved, workspace


def mixer_saved(s: Shapes, kind: str, cfg, past: int) -> tuple[int, int]:
    """(saved, workspace) of one mixer, from its normed input to its o_proj input."""
    N, hq, hkv, D, a = s.N, s.hq, s.hkv, s.D, s.a
    fp32_views = a == FP32 and s.T % GLA_CHUNK == 0
    if kind == "gla":
        saved = lin_in(s, 4, s.d)  # q, k, v and the gate's first stage read the normed input
        saved += N * (hq + hkv) * D * a  # relu(q), relu(k): ReLU saves its output
        saved += lin_in(s, 1, s.gate_rank)  # the gate's second stage input
        saved += 2 * N * hkv * D * FP32  # logsigmoid of the fp32 gate: its input and buffer
        core, work = gla_core(s, hq, fp32_views)
        saved += core + cp_linear_extra(s)
        saved += rms_saved(N * hq * D, N * hq, a)  # g_norm on the GLA output
        saved += lin_in(s, 1, hq * D)  # o_proj input
        return saved, work
    window = s.window if kind in ("swa", "hybrid_swa") else None
    # Learned sinks exist in the hybrid mixer only (model.hybrid.num_sink_tokens).
    attn, out_copy, work = sdpa_core(s if kind.startswith("hybrid") else replace(s, sinks=0), window, past)
    projections = 3 if kind in ("swa", "full") or cfg.hybrid.share_branch_projections else 6
    saved = lin_in(s, projections, s.d) + rotary_per_layer(s) + attn
    if kind in ("swa", "full"):
        # o_proj reads the output transposed back to [B,T,H,D]: the kernel's own (saved) output laid
        # out that way already on the full path (a view, nothing new), a fresh copy on the windowed one.
        return saved + (lin_in(s, 1, hq * D) if out_copy else 0), work
    # Hybrid: the key-tied linear branch on the same projections (or its own, separate).
    saved += N * hkv * D * FP32  # k_pre.float(), saved by softplus (the decay)
    saved += N * (hq + hkv) * D * a  # sigmoid(q), sigmoid(k): Sigmoid saves its output
    core, gla_work = gla_core(s, hq, fp32_views)
    saved += core + cp_linear_extra(s)
    # attn_norm: in fp32 its input is the attention output already kept (the kernel's output,
    # or the reshaped copy of the windowed path, counted here); in bf16 a fresh fp32 copy.
    attn_x = out_copy if a == FP32 else N * hq * D * FP32
    saved += attn_x + N * hq * FP32 + N * hq * D * a
    saved += rms_saved(N * hq * D, N * hq, a)  # linear_norm on the GLA output
    saved += 2 * N * hq * D * FP32  # beta * norm(.): each saves the fp32 norm output
    saved += lin_in(s, 1, hq * D) * (1 if cfg.hybrid.share_branch_projections else 2)  # o_proj input(s)
    return saved, max(work, gla_work)


def cp_linear_extra(s: Shapes) -> int:
    """LASP-2 under CP (``parallel/context_parallel/linear.py``): the local state from zero keeps the
    fp32 decay weights, k * weights and v (fp32 copies of k and v under bf16)."""
    if s.cp == 1:
        return 0
    per = s.N * s.hkv * s.D * FP32
    return 3 * per + (per if s.a != FP32 else 0)


@dataclass
class BlockActivations:
    kind: str
    moe: bool
    saved: int  # everything the block keeps for backward without checkpointing (its input included)
    input: int  # the block input alone (what a checkpointed block keeps)
    workspace: int  # temporaries of its backward
    weight_copies: int  # bf16 autocast copies of its Linear weights (saved for backward)


def block_activations(s: Shapes, cfg, index: int, linear_local: int, copies: bool) -> BlockActivations:
    """One block without activation checkpointing: two residual norms (the block input is the first
    one's x), the mixer, the FFN; under bf16 autocast the weight casts its Linears save."""
    kind, is_moe = cfg.layer_types()[index], cfg.is_moe_layer(index)
    halo = s.window if (s.cp > 1 and kind in ("swa", "hybrid_swa")) else 0  # CP: the previous rank's keys
    mixer, mixer_work = mixer_saved(s, kind, cfg, halo)
    saved = 2 * residual_norm(s) + mixer
    if is_moe:
        ffn, ffn_work = moe_saved(s, cfg.moe, cfg.moe.expert_intermediate_size or cfg.intermediate_size)
    else:
        # Without TP the dense FFN's fp32 input is the post-norm output: not saved by the norm.
        ffn, ffn_work = mlp_saved(s, s.inter, s.N), mlp_workspace(s, s.inter, s.N)
    weight_copies = linear_local * 2 if copies else 0
    saved += ffn + weight_copies
    # The incoming gradient (residual stream) and the FFN's input gradient beside the larger of the
    # FFN's workspace and what the mixer's needs beyond the FFN's freed saved set.
    workspace = max(ffn_work, mixer_work - ffn) + s.N * s.d * FP32 + s.Nr * s.d * FP32
    return BlockActivations(kind, is_moe, saved, s.Nr * s.d * FP32, workspace, weight_copies)


def per_forward(s: Shapes, rotary: bool) -> int:
    """Saved once per forward: the embedding's int64 ids and, in fp32 with a RoPE layer, the shared
    cos/sin [B,T,D] (bf16 layers save their own casts instead: :func:`rotary_per_layer`)."""
    return s.B * s.T * 8 + (2 * s.N * s.D * FP32 if rotary and s.a == FP32 else 0)


def head_saved(s: Shapes, device: str, bf16: bool) -> tuple[int, int, int]:
    """(saved, forward transient, backward transient) of the final norm and the chunked LM-head
    cross-entropy (``operators/chunked_cross_entropy.py``).

    Unsharded head (no TP), training: the forward forms d loss/d logits chunk by chunk and keeps
    grad_h [N, d] fp32 and grad_w [V, d] (in the dtype of the head operand: fp32 on the CPU or in
    fp32, bf16 on CUDA under bf16), never the logits. Vocabulary-sharded head (TP): it keeps the
    gathered hidden [N, d], the log-sum-exp and the label masks, and recomputes each chunk's logits
    in backward. Transients: one chunk of fp32 logits [min(N, 4096), V_local] and logsumexp's
    temporary of its size (measured on the CPU; CUDA's logsumexp forms exp(x - max) too), the head operand
    (a bf16 copy, widened to fp32 on the CPU), the gradient products of backward."""
    N, d, V = s.B * s.T, s.d, s.vocab_rows
    norm = rms_saved(s.Nr * d, s.Nr, FP32)
    # One chunk of fp32 logits, and logsumexp's own temporary of the same size (exp(logits - max)).
    chunk = 2 * min(N, CE_CHUNK) * V * FP32 + 2 * min(N, CE_CHUNK) * d * FP32
    operand = 0
    if bf16:
        operand = V * d * (2 + FP32) if device == "cpu" else V * d * 2
    if s.tp == 1:
        w_bytes = FP32 if (device == "cpu" or not bf16) else 2
        saved = norm + N * d * FP32 + V * d * w_bytes
        backward = N * d * FP32 + V * d * FP32  # grad_h * g, grad_w * g (the head's grad itself)
    else:
        saved = norm + N * d * FP32 + N * (FP32 + 1 + 1 + 8)
        backward = N * d * FP32 + V * d * FP32 + chunk + operand
    return saved, chunk + operand, backward


__all__ = ["BlockActivations", "Shapes", "block_activations", "head_saved", "per_forward"]
