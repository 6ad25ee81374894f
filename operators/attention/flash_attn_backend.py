"""``flash_attn`` backend of ``attention``: Dao-AILab flash-attention 2 on CUDA (and on MetaX,
whose flash-attn ships the same FA2 API), imported lazily so this module imports without it.

Semantics match the reference directly: flash-attn aligns the causal mask to the bottom right
when Tq < Tk (since 2.1), ``window_size=(W, 0)`` keeps W past keys plus the current one (since
2.3), GQA/MQA takes k/v with fewer heads, and ``flash_attn_varlen_func`` with ``cu_seqlens`` keeps
attention inside documents. It has no sink tokens and runs only fp16/bf16 with head dim <= 256:
those calls are declined and go to ``sdpa``.

Test hook: flash-attn cannot run on a CPU box, so ``tests/operators/test_flash_attn_standin.py``
puts a float64 PyTorch stand-in under the name ``flash_attn`` (``sys.modules``) to check this
wrapper's argument mapping. CPU tensors are accepted only while the imported ``flash_attn``
carries ``SBTRAIN_CPU_STANDIN = True``, a marker no real flash-attn has, so it is never on by
accident; on CUDA nothing changes.
"""

from __future__ import annotations

import sys

import torch

from operators.attention.op import attention
from operators.attention.reference import check_attention_args
from operators.registry import Backend

MIN_VERSION = (2, 3)  # window_size appeared in flash-attn 2.3
MAX_HEAD_DIM = 256


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _cpu_standin() -> bool:
    """True only while a test has injected a stand-in ``flash_attn`` that says so."""
    return getattr(sys.modules.get("flash_attn"), "SBTRAIN_CPU_STANDIN", False) is True


def _is_available() -> bool:
    if not (torch.cuda.is_available() or _cpu_standin()):
        return False
    import flash_attn

    return _version(getattr(flash_attn, "__version__", "0")) >= MIN_VERSION


def _accepts(q, k, v, *, causal=True, window=None, sink_k=None, sink_v=None, scale=None, cu_seqlens=None):
    if sink_k is not None or sink_v is not None:
        return "flash-attn has no sink tokens"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _cpu_standin()):
        return f"flash-attn runs on CUDA tensors; got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16; got {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"flash-attn needs one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    D = q.shape[-1]
    if D > MAX_HEAD_DIM or D % 8:
        return f"flash-attn supports head dims that are multiples of 8 up to {MAX_HEAD_DIM}; got {D}"
    return None


def flash_attn_attention(
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
    """Same contract as ``attention_reference`` on flash-attn kernels (no sinks)."""
    check_attention_args(q, k, v, causal, window, sink_k, sink_v, cu_seqlens)
    reason = _accepts(q, k, v, causal=causal, window=window, sink_k=sink_k, sink_v=sink_v)
    if reason:
        raise ValueError(f"attention backend flash_attn: {reason}; use the sdpa backend for this call")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window_size = (window, 0) if window is not None else (-1, -1)
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window_size)
    T = q.shape[1]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T:
        raise ValueError(f"attention: cu_seqlens must be 1-D, start at 0 and end at {T}; got {cu_seqlens.tolist()}")
    max_len = int((cu[1:] - cu[:-1]).max())  # one host sync, as every varlen caller pays
    out = flash_attn_varlen_func(
        q[0],
        k[0],
        v[0],
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
        softmax_scale=scale,
        causal=causal,
        window_size=window_size,
    )
    return out.unsqueeze(0)


attention.register(
    Backend(
        name="flash_attn",
        fn=flash_attn_attention,
        priority=20,
        platforms=("cuda", "maca"),
        is_available=_is_available,
        accepts=_accepts,
    )
)
