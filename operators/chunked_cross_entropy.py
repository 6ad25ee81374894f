"""Memory-bounded LM-head cross-entropy: backend ``chunked`` of ``ops.linear_cross_entropy``.

The logits of a whole batch are the largest tensor of a training step (152064 x 4 bytes per
token for the 7B). This backend never holds more than ``chunk_size`` tokens of fp32 logits:
with a sharded head (or without gradients) the forward keeps only the per-token log-sum-exp and
the backward recomputes each chunk's logits to form ``softmax - onehot``; with an unsharded head
in training the forward forms ``softmax - onehot`` per chunk at once and keeps the [N, d] and
[V, d] gradient products instead (no recompute: three matmuls per chunk, like full logits).
Extra memory is O(chunk_size * V) plus O((N + V) * d) in fp32: the gradient accumulators and a
copy of the head in the matmul input dtype. One host sync per call (the label check).

Precision: under bf16 / fp16 autocast (or with bf16 hidden and head) the matmuls read bf16 / fp16
operands and accumulate in fp32 (``torch.mm(..., out_dtype=float32)`` on CUDA: tensor-core speed,
fp32 logits); the log-sum-exp, softmax and every gradient accumulator are fp32. Without autocast
everything is fp32, like the reference. The weight gradient's GEMM widens its rounded operands to
fp32 to accumulate in place (no [V, d] temporary): fp32 / TF32 speed for that one product.

Vocabulary-sharded head (``group`` given): every rank of ``group`` holds the same ``hidden``
and ``labels`` and rows ``[vocab_start, vocab_start + V_local)`` of the head. Contract:
  - the returned loss is the global sum of token losses, identical on every rank;
  - the gradient w.r.t. ``hidden`` is the full gradient, already all-reduced over ``group``
    and replicated on every rank, so the caller must NOT all-reduce it again (do not wrap
    ``hidden`` in a Megatron-style "copy to TP region" function);
  - the gradient w.r.t. ``weight`` covers this rank's rows only (any data-parallel reduction is
    the caller's, as for every other parameter).
The forward does two collectives in all (not per chunk): each rank computes its local
log-sum-exp, then a MAX and a SUM all-reduce combine them with the target logits.
"""

from __future__ import annotations

import torch

from operators.cross_entropy import linear_cross_entropy
from operators.registry import Backend


def _all_reduce(t: torch.Tensor, group, op: str) -> torch.Tensor:
    """In-place all-reduce over ``group`` (a no-op for an unsharded head)."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=group)
    return t


def _check_args(hidden, weight, labels, chunk_size, vocab_start):
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be [N, d], weight {tuple(weight.shape)} "
            f"[V, d] and labels {tuple(labels.shape)} [N]; flatten batch and time first"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
            f"{tuple(labels.shape)} do not fit (need hidden [N, d], weight [V, d], labels [N])"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size!r} must be a positive int (tokens per chunk)")
    if vocab_start < 0:
        raise ValueError(f"linear_cross_entropy: vocab_start={vocab_start} must be >= 0")


def _bad_label_error(labels, bad, owners, ignore_index, vocab_start, v_local, group) -> ValueError:
    idx = int(bad.nonzero()[0, 0])
    value, count = int(labels[idx]), int(owners[idx])
    if group is None:
        where = f"the vocabulary size is {v_local}"
    else:
        import torch.distributed as dist

        where = (
            f"the vocabulary shards of the {dist.get_world_size(group)} ranks (this rank: "
            f"[{vocab_start}, {vocab_start + v_local})) hold it {count} times, need exactly once"
        )
    return ValueError(
        f"linear_cross_entropy: label {value} at token {idx} is out of range ({where}; labels must lie in "
        f"[0, V) or equal ignore_index={ignore_index}); check the tokenizer's vocab size against the model's"
    )


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, group, vocab_start):
        ctx.mm_dtype = matmul_input_dtype(hidden, weight)  # read before autocast is switched off
        with _fp32_logits_region(hidden.device):
            return _ChunkedLinearCE._forward(ctx, hidden, weight, labels, ignore_index, chunk_size, group, vocab_start)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, ignore_index, chunk_size, group, vocab_start):
        n, v_local = hidden.shape[0], weight.shape[0]
        w32 = _operand(weight, ctx.mm_dtype)  # O(V*d): the head itself, not the logits
        valid = labels != ignore_index
        local = labels - vocab_start
        owned = valid & (local >= 0) & (local < v_local)
        # Clamp so gather never indexes out of range; non-owned positions are masked to 0 below.
        local_idx = torch.where(owned, local, torch.zeros_like(local)).long()

        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Unsharded head under training: form d loss / d logits while the chunk's logits are at
        # hand and keep the two small products, instead of recomputing the logits in backward
        # (3 matmuls per chunk instead of 4, the same work as materialised logits).
        eager = group is None and (need_h or need_w)
        grad_h = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if eager and need_h else None
        grad_w = torch.zeros(w32.shape, dtype=torch.float32, device=w32.device) if eager and need_w else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h32 = _operand(hidden[s:e], ctx.mm_dtype)
            logits = _mm(h32, w32.t())  # [c, V_local] fp32, the only big temporary
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            target[s:e] = logits.gather(1, local_idx[s:e, None]).squeeze(1)
            if eager:
                p = logits.sub_(lse[s:e, None]).exp_()
                p.scatter_add_(1, local_idx[s:e, None], owned[s:e, None].float().neg())
                row = valid[s:e, None].float()
                p = _operand(p, ctx.mm_dtype)
                if need_h:
                    grad_h[s:e] = _mm(p, w32)
                    grad_h[s:e].mul_(row)
                if need_w:
                    grad_w.addmm_(_widen(p).t(), _widen(h32) * row)
                del p
            del logits
        target.masked_fill_(~owned, 0.0)

        if group is not None:
            # Combine local log-sum-exps: lse = M + log(sum_r exp(lse_r - M)), M = max_r lse_r.
            m = _all_reduce(lse.clone(), group, "MAX")
            packed = torch.stack([torch.exp(lse - m), target, owned.float()])
            _all_reduce(packed, group, "SUM")
            lse = m + torch.log(packed[0])
            target, owners = packed[1], packed[2]
        else:
            owners = owned.float()
        # Every valid label must belong to exactly one shard; decided after the collectives so
        # that all ranks raise together instead of leaving the others hanging in a collective.
        bad = valid & (owners != 1)
        if bool(bad.any()):
            raise _bad_label_error(labels, bad, owners, ignore_index, vocab_start, v_local, group)

        losses = torch.where(valid, lse - target, torch.zeros_like(lse))
        ctx.chunk_size, ctx.group, ctx.eager = chunk_size, group, eager
        if eager:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        else:
            ctx.save_for_backward(hidden, weight, lse, valid, owned, local_idx)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        with _fp32_logits_region(grad_loss.device):
            return _ChunkedLinearCE._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        if ctx.eager:  # gradients were formed in forward; scale them by the incoming gradient
            grad_h, grad_w = ctx.saved_tensors
            g = grad_loss.float()
            grad_h = None if grad_h is None else (grad_h * g).to(ctx.dtypes[0])
            grad_w = None if grad_w is None else (grad_w * g).to(ctx.dtypes[1])
            return grad_h, grad_w, None, None, None, None, None
        hidden, weight, lse, valid, owned, local_idx = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, chunk_size = hidden.shape[0], ctx.chunk_size
        w32 = _operand(weight, ctx.mm_dtype)
        grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(w32.shape, dtype=torch.float32, device=w32.device) if need_w else None
        # d loss_i / d logit_ij = (softmax_ij - [j == label_i]) * scale_i, scale_i = grad_loss for
        # valid tokens and 0 for ignored ones. The row scale is applied to the [c, d] factors, not
        # to the [c, V] matrix: one pass less over the biggest temporary.
        scale = (grad_loss.float() * valid.float()).unsqueeze(1)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h32 = _operand(hidden[s:e], ctx.mm_dtype)
            p = _mm(h32, w32.t())
            p.sub_(lse[s:e, None]).exp_()  # local slice of the global softmax, in place
            # Subtract the one-hot; a scatter of 0 at column 0 for non-owned rows avoids the host
            # sync that selecting the owned rows (nonzero) would cost on a GPU.
            p.scatter_add_(1, local_idx[s:e, None], owned[s:e, None].float().neg())
            p = _operand(p, ctx.mm_dtype)
            if need_h:
                grad_h[s:e] = _mm(p, w32)
                grad_h[s:e].mul_(scale[s:e])
            if need_w:
                grad_w.addmm_(_widen(p).t(), _widen(h32) * scale[s:e])
            del p
        if need_h:
            # Each rank holds only its vocabulary slice's share of d loss / d hidden.
            _all_reduce(grad_h, ctx.group, "SUM")
            grad_h = grad_h.to(hidden.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def matmul_input_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls read: autocast's (bf16 / fp16) when it is on, else bf16 / fp16
    when both operands already are (FSDP's param_dtype=bf16), else fp32. Accumulation, the
    log-sum-exp and the softmax are fp32 whatever this says."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in LOW_PRECISION:
            return dtype
    if hidden.dtype == weight.dtype and hidden.dtype in LOW_PRECISION:
        return hidden.dtype
    return torch.float32


LOW_PRECISION = (torch.bfloat16, torch.float16)
_OUT_DTYPE_MM: dict[str, bool] = {}  # device type -> whether torch.mm(..., out_dtype=fp32) runs there


def _fp32_output_mm(device: torch.device) -> bool:
    """CUDA builds have mm(bf16, bf16, out_dtype=fp32): fp32 accumulation AND fp32 logits from the
    tensor cores. The CPU has no such kernel (nor do older torch builds): there the operands are
    widened to fp32 after rounding, which gives the same numbers at fp32-GEMM speed."""
    if device.type not in _OUT_DTYPE_MM:
        try:
            a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
            _OUT_DTYPE_MM[device.type] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[device.type] = False
    return _OUT_DTYPE_MM[device.type]


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the matmul input dtype; widened to fp32 where no fp32-output kernel exists."""
    if dtype == torch.float32:
        return x.float()
    x = x.to(dtype)
    return x if _fp32_output_mm(x.device) else x.float()


def _widen(x: torch.Tensor) -> torch.Tensor:
    # The [V, d] weight gradient accumulates in place in fp32 (addmm_ into an fp32 buffer), so its
    # operands are widened after rounding: bf16 inputs, fp32 accumulation, no [V, d] temporary.
    return x.float()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 result of a @ b for operands made by :func:`_operand`."""
    if a.dtype == torch.float32:
        return a @ b
    return torch.mm(a, b, out_dtype=torch.float32)


def _fp32_logits_region(device: torch.device):
    # Under autocast the fp32 matmuls below would silently run in bf16/fp16 (then so would the
    # log-sum-exp over 150k logits); the op promises fp32 logits, so autocast is switched off.
    return torch.autocast(device_type=device.type, enabled=False)


def linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    group=None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Same contract as :func:`operators.cross_entropy.linear_cross_entropy_reference`, plus a
    vocabulary-sharded head (see the module docstring). Returns the fp32 sum of token losses."""
    _check_args(hidden, weight, labels, chunk_size, vocab_start)
    return _ChunkedLinearCE.apply(hidden, weight, labels, ignore_index, chunk_size, group, vocab_start)


def _accepts(*args, **kwargs) -> str | None:
    return None  # handles every call; bad arguments raise a clear error in the function


linear_cross_entropy.register(
    Backend(name="chunked", fn=linear_cross_entropy_chunked, priority=10, accepts=_accepts)
)
