"""Activation bytes per block kind: what autograd saves for backward, tensor by tensor.

Every term below names the tensor the training code keeps and why (which op saves it), for one
micro batch of ``B`` rows of ``T`` tokens on this rank (T = seq_len / cp). The formulas were read
off the code and checked against the bytes autograd actually saves (``saved_tensors_hooks``,
unique storages, parameters excluded) for every kind in fp32 and bf16: ``tests/plan``.

Dtypes: the residual stream is fp32 (fp32 embeddings, fp32 adds); under bf16 autocast every
``nn.Linear`` casts its input to bf16 on its own (q, k and v each save a bf16 copy of the normed
input), while in fp32 the shared input is saved once. ``a`` is the matmul activation width (2 or 4
bytes). Tensor parallelism: the mixer and FFN see the whole sequence (gathered) with ``1/tp`` of
the heads / FFN columns; the norms see ``1/tp`` of the tokens (sequence parallel). Each mixer and FFN
kind declares its own terms (``MixerKind.activations``, ``FfnKind.activations``).

Workspace terms are the gradients and temporaries alive beside the saved set while a block runs
its backward. Backward runs the FFN first: at its start everything the block saved is alive and the
SwiGLU's two fresh gradients join it; by the time the mixer runs, the FFN's saved tensors are
gone, so the mixer's temporaries only count where they exceed them. Estimates from the kernels'
code, checked against the CPU's resident set (benchmarks/plan_vs_measured.py), not exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from sbtrain.models.ffn import ffn_kind
from sbtrain.models.mixers import mixer_kind
from sbtrain.models.mixers.saved_bytes import CE_CHUNK, FP32, Shapes, rms_saved

__all__ = ["FP32", "BlockActivations", "Shapes", "block_activations", "head_saved", "per_forward"]


def residual_norm(s: Shapes) -> int:
    """input_layernorm / post_attention_layernorm: fp32 x, rsqrt, fp32 normalised x, on Nr tokens."""
    return rms_saved(s.Nr * s.d, s.Nr, FP32)


@dataclass
class BlockActivations:
    kind: str  # the mixer kind
    ffn: str  # the FFN kind
    saved: int  # everything the block keeps for backward without checkpointing (its input included)
    input: int  # the block input alone (what a checkpointed block keeps)
    workspace: int  # temporaries of its backward
    weight_copies: int  # bf16 autocast copies of its Linear weights (saved for backward)


def block_activations(s: Shapes, cfg, index: int, linear_local: int, copies: bool) -> BlockActivations:
    """One block without activation checkpointing: two residual norms (the block input is the first
    one's x), the mixer, the FFN; under bf16 autocast the weight casts its Linears save."""
    kind, ffn_name = cfg.layer_types()[index], cfg.ffn_types()[index]
    mixer, mixer_work = mixer_kind(kind).activations(s, cfg)  # each kind declares its own terms
    saved = 2 * residual_norm(s) + mixer
    ffn, ffn_work = ffn_kind(ffn_name).activations(s, cfg)
    weight_copies = linear_local * 2 if copies else 0
    saved += ffn + weight_copies
    # The incoming gradient (residual stream) and the FFN's input gradient beside the larger of the
    # FFN's workspace and what the mixer's needs beyond the FFN's freed saved set.
    workspace = max(ffn_work, mixer_work - ffn) + s.N * s.d * FP32 + s.Nr * s.d * FP32
    return BlockActivations(kind, ffn_name, saved, s.Nr * s.d * FP32, workspace, weight_copies)


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
