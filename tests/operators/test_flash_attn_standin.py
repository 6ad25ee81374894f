"""The ``flash_attn`` backend's wrapper against a float64 stand-in of flash-attn 2, on the CPU.

flash-attn has no CPU or interpreter path, so CI never runs the real kernels. What can break
on our side is the argument mapping: the window convention (our W past tokens plus the
current one is flash-attn's ``window_size=(W, 0)``), the [B,T,H,D] layout, GQA by fewer KV
heads, and the varlen call (``q[0]``, int32 ``cu_seqlens``, ``max_seqlen``). The stand-in
below is written from flash-attn 2's documented semantics (bottom-right causal alignment,
``window_size=(left, right)`` with -1 for unbounded, ``softmax_scale`` default ``D**-0.5``),
independently of ``operators/attention/reference.py``, and checks the arguments the real
kernel would reject. It computes in float64 and returns q's dtype, as flash-attn returns its
input dtype; gradients flow through it by autograd, so the wrapper's backward is checked too.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType

import pytest
import torch

from operators import ops
from operators.attention.reference import attention_reference


def _check_kernel_args(q, k, v, window_size):
    # What the real kernel asserts; a wrapper bug here would fail on a GPU, so fail here.
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype == v.dtype, (q.dtype, k.dtype)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "flash-attn needs the head dim contiguous"
    assert q.shape[-2] % k.shape[-2] == 0 and k.shape == v.shape, (q.shape, k.shape, v.shape)
    assert isinstance(window_size, tuple) and len(window_size) == 2, window_size
    assert all(isinstance(w, int) for w in window_size), window_size


def _dense(q, k, v, softmax_scale, causal, window_size):
    """One sequence, [Tq, Hq, D] x [Tk, Hkv, D], in float64, flash-attn 2 masking."""
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    qf, kf, vf = (t.double() for t in (q, k, v))
    kf, vf = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (kf, vf))  # query head h reads KV head h // G
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    row = torch.arange(Tq).unsqueeze(1) + (Tk - Tq)  # bottom-right aligned query positions
    col = torch.arange(Tk).unsqueeze(0)
    left, right = window_size
    allowed = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        right = 0
    if left >= 0:
        allowed &= col >= row - left
    if right >= 0:
        allowed &= col <= row + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # flash-attn writes 0 for a row with no key
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
    _check_kernel_args(q, k, v, window_size)
    assert q.dim() == 4 and dropout_p == 0.0, (q.shape, dropout_p)
    return torch.stack([_dense(q[b], k[b], v[b], softmax_scale, causal, window_size) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
    _check_kernel_args(q, k, v, window_size)
    assert q.dim() == 3 and dropout_p == 0.0, (q.shape, dropout_p)
    for cu, total, max_len in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
        assert cu.dtype == torch.int32 and cu.device == q.device, (cu.dtype, cu.device)
        lengths = (cu[1:] - cu[:-1]).tolist()
        assert int(cu[0]) == 0 and int(cu[-1]) == total and max_len == max(lengths), (cu.tolist(), max_len)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = [_dense(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]], softmax_scale, causal, window_size)
           for i in range(len(bq) - 1)]
    return torch.cat(out)


def _standin(marked: bool = True) -> ModuleType:
    module = ModuleType("flash_attn")
    module.__version__ = "2.7.4"
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    if marked:
        module.SBTRAIN_CPU_STANDIN = True
    return module


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _standin())
    backend = ops.attention.backends["flash_attn"]
    monkeypatch.setattr(backend, "_available", None)  # availability is cached; probe again, restore after
    yield backend


# name: B, Tq, Tk, Hq, Hkv, D, causal, window, scale, cu_seqlens
CASES = {
    "causal": (2, 24, 24, 2, 2, 16, True, None, None, None),
    "window_lt_T": (1, 40, 40, 4, 2, 16, True, 7, None, None),
    "window_0": (1, 12, 12, 2, 2, 8, True, 0, None, None),
    "gqa_mqa": (2, 20, 20, 4, 1, 16, True, None, 0.3, None),
    "decode_tq_lt_tk": (2, 5, 29, 4, 2, 16, True, 6, None, None),
    "noncausal": (1, 16, 16, 2, 1, 8, False, None, None, None),
    "varlen": (1, 50, 50, 4, 2, 16, True, None, None, [0, 9, 10, 33, 50]),
    "varlen_window": (1, 50, 50, 4, 2, 16, True, 5, None, [0, 17, 18, 50]),
}
# Relative RMS error ||a - b|| / ||b|| against the float64 reference, per tensor. The stand-in
# is exact in float64, so what is left is the rounding of outputs and gradients to the input
# dtype: measured at most 3.3e-4 (fp16) and 2.9e-3 (bf16) over these cases, so the bounds are
# about 3x that. The mistakes this guards against are far larger: a window one token too wide
# gives 0.2-0.34 here, KV heads tiled instead of grouped ~1.0, attending across documents 0.43.
BOUND = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _rel(a, b) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))  # no broadcasting past a wrong shape
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_wrapper_matches_reference_through_standin(standin, case, dtype):
    B, Tq, Tk, Hq, Hkv, D, causal, window, scale, cu = CASES[case]
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
              for s in ((B, Tq, Hq, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D))]
    kw = {"causal": causal, "window": window, "scale": scale}
    kw["cu_seqlens"] = None if cu is None else torch.tensor(cu, dtype=torch.long)  # the wrapper casts to int32
    assert standin.available() and standin.accepts(*leaves, **kw) is None
    out = ops.attention.call_backend("flash_attn", *leaves, **kw)
    assert out.dtype == dtype and out.shape == (B, Tq, Hq, D)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # distinct gradient per output
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = attention_reference(*leaves64, **kw)
    grads64 = torch.autograd.grad((ref * weight).sum(), leaves64)
    errors = {"o": _rel(out, ref), **{f"d{n}": _rel(g, g64) for n, g, g64 in zip("qkv", grads, grads64)}}
    assert all(math.isfinite(e) for e in errors.values()), errors
    worst = max(errors.values())
    assert worst <= BOUND[dtype], f"{case} {dtype}: relative errors {errors} exceed {BOUND[dtype]}"


def test_window_convention_is_w_past_plus_current(standin, monkeypatch):
    """Our W maps to ``window_size=(W, 0)``; no window to ``(-1, -1)`` (unbounded)."""
    seen = []
    real = flash_attn_func
    monkeypatch.setattr(sys.modules["flash_attn"], "flash_attn_func",
                        lambda *a, **kw: seen.append(kw["window_size"]) or real(*a, **kw))
    q = torch.randn(1, 6, 2, 8, dtype=torch.float16)
    ops.attention.call_backend("flash_attn", q, q, q, window=3)
    ops.attention.call_backend("flash_attn", q, q, q)
    assert seen == [(3, 0), (-1, -1)]


def test_cpu_only_with_a_marked_standin(monkeypatch):
    """CPU tensors are declined unless the injected ``flash_attn`` carries the test marker."""
    backend = ops.attention.backends["flash_attn"]
    q = torch.zeros(1, 4, 2, 8, dtype=torch.float16)
    monkeypatch.setitem(sys.modules, "flash_attn", _standin(marked=False))
    assert "CUDA" in backend.accepts(q, q, q)
    monkeypatch.setitem(sys.modules, "flash_attn", _standin(marked=True))
    assert backend.accepts(q, q, q) is None
    assert "fp16 or bf16" in backend.accepts(q.float(), q.float(), q.float())  # the other checks still hold
    monkeypatch.delitem(sys.modules, "flash_attn")
    assert "CUDA" in backend.accepts(q, q, q)


def test_bad_cu_seqlens_is_an_error(standin):
    q = torch.randn(1, 10, 2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.attention.call_backend("flash_attn", q, q, q, cu_seqlens=torch.tensor([0, 4, 9]))
