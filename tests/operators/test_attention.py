"""Conformance of every ``ops.attention`` backend against the float64 reference, the reference
against HF transformers' sliding-window convention, and the errors of the op."""

from __future__ import annotations

import pytest
import torch

from operators import ops
from operators.attention import flash_attn_backend
from operators.attention.reference import attention_mask, attention_reference
from operators.attention.sdpa import windowed
from tests.operators.conformance import (
    assert_close,
    devices,
    platform_for,
    poisoned_allocations,
    to64,
    tolerances,
)


def _backend_params():
    """(device, backend) for every non-reference backend available on each device."""
    out = []
    for dev in devices():
        device = dev.values[0]
        if device != "cpu" and not torch.cuda.is_available():
            out.append(pytest.param(device, "none", marks=dev.marks, id=f"{dev.id}-all"))
            continue
        for name in ops.attention.available_backends(platform_for(device)):
            if name != "reference":
                out.append(pytest.param(device, name, marks=dev.marks, id=f"{dev.id}-{name}"))
    return out


BACKENDS = _backend_params()

# B, Tq, Tk, heads, head dim D, sinks S, causal, window, cu_seqlens. The windowed path of
# ``sdpa`` uses query blocks of max(64, ceil(W/2)), so T=150 with a small W spans three blocks and
# does not divide; Tq=150 of Tk=190 runs the block path with a key prefix.
BASE = {"B": 1, "Tq": 40, "Tk": 40, "Hq": 4, "Hkv": 2, "D": 16, "S": 0, "causal": True, "window": None, "cu": None}
CASES = {
    "gqa_full_causal": {"B": 2, "Tq": 37, "Tk": 37},
    "mqa7_noncausal_tq_lt_tk": {"Tq": 20, "Tk": 33, "Hq": 7, "Hkv": 1, "causal": False},
    "window_lt_T_blocks": {"B": 2, "Tq": 150, "Tk": 150, "window": 5},
    "window_just_below_T": {"Tq": 150, "Tk": 150, "window": 148},
    "window_ge_T": {"B": 2, "Tq": 150, "Tk": 150, "window": 200},
    "window_0": {"Tq": 150, "Tk": 150, "window": 0},
    "decode_full": {"Tq": 1, "Tk": 40},
    "decode_window": {"B": 2, "Tq": 1, "Tk": 40, "window": 7},
    "tq5_full": {"Tq": 5, "Tk": 40},
    "tq5_window": {"Tq": 5, "Tk": 40, "window": 7},
    "mqa7_full_causal": {"Tq": 30, "Tk": 30, "Hq": 7, "Hkv": 1},
    "sinks_full": {"B": 2, "Tq": 50, "Tk": 50, "S": 3},
    "sinks_window": {"Tq": 150, "Tk": 150, "S": 3, "window": 6},
    "sinks_noncausal": {"Tq": 20, "Tk": 20, "S": 2, "Hq": 7, "Hkv": 1, "causal": False},
    "sinks_decode_window": {"Tq": 1, "Tk": 40, "S": 4, "window": 7},
    "sinks_long_prefix": {"Tq": 30, "Tk": 80, "S": 3},
    "sinks_prefill_window_blocks": {"B": 2, "Tq": 150, "Tk": 190, "S": 3, "window": 10},
    "docs_full": {"Tq": 77, "Tk": 77, "cu": [0, 5, 5, 30, 77]},
    "docs_window_sinks": {"Tq": 177, "Tk": 177, "S": 2, "window": 4, "cu": [0, 5, 5, 30, 177]},
    "docs_noncausal": {"Tq": 40, "Tk": 40, "causal": False, "cu": [0, 1, 25, 40]},
}


def _inputs(case, dtype, device, seed=0):
    c = {**BASE, **case}
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_()

    q = rand(c["B"], c["Tq"], c["Hq"], c["D"])
    k = rand(c["B"], c["Tk"], c["Hkv"], c["D"])
    v = rand(c["B"], c["Tk"], c["Hkv"], c["D"])
    kw = {"causal": c["causal"], "window": c["window"], "scale": 0.7 * c["D"] ** -0.5}
    if c["S"]:
        kw["sink_k"] = rand(c["S"], c["Hkv"], c["D"])
        kw["sink_v"] = rand(c["S"], c["Hkv"], c["D"])
    if c["cu"] is not None:
        kw["cu_seqlens"] = torch.tensor(c["cu"], dtype=torch.int32, device=device)
    return (q, k, v), kw


def _check_against_reference(fn, qkv, kw, dtype, seed=1):
    """Forward and gradients of q, k, v and the sinks against the float64 reference."""
    leaves = {"q": qkv[0], "k": qkv[1], "v": qkv[2], "sink_k": kw.get("sink_k"), "sink_v": kw.get("sink_v")}
    with poisoned_allocations():
        out = fn(*qkv, **kw)
    assert out.dtype == dtype and out.shape == qkv[0].shape
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with poisoned_allocations():
        (out * w.to(out.device, out.dtype)).sum().backward()

    ref_leaves = dict(zip(leaves, to64(*leaves.values())))
    ref_kw = {**kw, "sink_k": ref_leaves["sink_k"], "sink_v": ref_leaves["sink_v"]}
    if ref_kw.get("cu_seqlens") is not None:
        ref_kw["cu_seqlens"] = ref_kw["cu_seqlens"].cpu()
    ref = attention_reference(ref_leaves["q"], ref_leaves["k"], ref_leaves["v"], **ref_kw)
    (ref * w).sum().backward()

    tol = tolerances(dtype)
    assert_close(out, ref, **tol, name="output")
    for name, leaf in leaves.items():
        if leaf is not None:
            assert leaf.grad is not None, f"no gradient reached {name}"
            assert_close(leaf.grad, ref_leaves[name].grad, **tol, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backend_matches_reference(device, backend, case, dtype):
    qkv, kw = _inputs(CASES[case], dtype, device)
    reason = ops.attention.backends[backend].accepts(*qkv, **kw)
    if reason:
        pytest.skip(f"{backend} declines this case: {reason}")
    _check_against_reference(lambda *a, **k: ops.attention.call_backend(backend, *a, **k), qkv, kw, dtype)


@pytest.mark.parametrize(
    "Tq,Tk,window,block,S",
    [(50, 50, 10, 4, 0), (50, 61, 10, 4, 2), (33, 33, 9, 3, 0), (40, 45, 8, 8, 1), (40, 40, 0, 4, 0)],
)
def test_windowed_small_blocks(Tq, Tk, window, block, S):
    """Blocks smaller than the window: each query block reaches back over several key blocks."""
    qkv, kw = _inputs({"B": 2, "Tq": Tq, "Tk": Tk, "S": S, "window": window}, torch.float32, "cpu")
    kw.pop("causal")

    def fn(q, k, v, **kw):
        out = windowed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block=block, **kw)
        return out.transpose(1, 2)

    _check_against_reference(fn, qkv, kw, torch.float32)  # the reference's default causal=True


def test_cpu_dispatch_picks_sdpa(monkeypatch):
    (q, k, v), kw = _inputs(CASES["sinks_window"], torch.float32, "cpu")
    assert ops.attention.select(q, k, v, **kw).name == "sdpa"
    monkeypatch.setenv("SBTRAIN_OPS", "attention:sdpa")
    assert ops.attention.select(q, k, v, **kw).name == "sdpa"
    assert ops.attention.select(q.double(), k.double(), v.double()).name == "sdpa"
    # mixed dtypes: sdpa declines and says why
    assert "one floating dtype" in ops.attention.backends["sdpa"].accepts(q, k.bfloat16(), v)


def test_flash_attn_declines_what_it_cannot_run():
    backend = ops.attention.backends["flash_attn"]
    assert backend.platforms == ("cuda", "maca")
    q = torch.zeros(1, 8, 4, 64, dtype=torch.bfloat16)
    sink = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    assert "sink" in backend.accepts(q, q, q, sink_k=sink, sink_v=sink)
    assert "CUDA" in backend.accepts(q, q, q)
    if torch.cuda.is_available():
        qc = q.cuda()
        assert backend.accepts(qc, qc, qc) is None
        assert "fp16 or bf16" in backend.accepts(qc.float(), qc.float(), qc.float())
        wide = torch.zeros(1, 8, 4, 264, dtype=torch.bfloat16, device="cuda")
        assert "head dims" in backend.accepts(wide, wide, wide)
    else:
        assert not backend.available()
    assert flash_attn_backend._version("2.7.4.post1") == (2, 7)


# --- the reference against HF transformers' sliding-window convention ------------------------


def _hf_sliding_mask(Tq, Tk, sliding_window):
    masking_utils = pytest.importorskip("transformers.masking_utils")
    mask = masking_utils.sdpa_mask(
        batch_size=1,
        q_length=Tq,
        kv_length=Tk,
        q_offset=Tk - Tq,
        mask_function=masking_utils.sliding_window_causal_mask_function(sliding_window),
        allow_is_causal_skip=False,
        device="cpu",
    )
    return mask[0, 0]


@pytest.mark.parametrize("Tq,Tk,W", [(12, 12, 0), (12, 12, 3), (12, 12, 11), (12, 12, 20), (4, 15, 5), (1, 15, 5)])
def test_reference_window_is_hf_sliding_window_plus_one(Tq, Tk, W):
    # Rule written independently of both: query i (at key position Tk-Tq+i) sees keys i-W..i.
    loop = torch.zeros(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        pos = Tk - Tq + i
        for j in range(Tk):
            loop[i, j] = pos - W <= j <= pos
    ours = attention_mask(Tq, Tk, True, W, None, "cpu")
    hf = _hf_sliding_mask(Tq, Tk, W + 1)
    assert torch.equal(ours, loop)
    assert torch.equal(hf, loop), "HF sliding_window=W+1 should keep W past keys plus the current one"
    if W < Tk - 1:  # HF's own value W would drop the oldest key: the off-by-one the design warns of
        assert not torch.equal(_hf_sliding_mask(Tq, Tk, W), loop)

    # The outputs agree too: attention under HF's mask (float64 SDPA) equals the reference.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, Tq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, Tk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, Tk, 8, generator=g, dtype=torch.float64)
    hf_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=hf)
    ref = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=W)
    assert_close(ref, hf_out.transpose(1, 2), atol=1e-6, rtol=1e-6, name="reference vs HF-masked attention")


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [ops.attention, ops.attention.reference], ids=["dispatched", "reference"])
def test_errors_name_the_problem(fn):
    q = torch.randn(1, 6, 4, 8)
    k = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="6 queries but only 5 keys"):
        fn(q, k, k)
    with pytest.raises(ValueError, match="window=3 needs causal=True"):
        fn(q[:, :5], k, k, causal=False, window=3)
    with pytest.raises(ValueError, match=r"sinks must be \[S,2,8\]"):
        fn(
            q,
            torch.randn(1, 6, 2, 8),
            torch.randn(1, 6, 2, 8),
            sink_k=torch.randn(3, 4, 8),
            sink_v=torch.randn(3, 4, 8),
        )
    with pytest.raises(ValueError, match="give both sink_k and sink_v"):
        fn(q[:, :5], k, k, sink_k=torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="cu_seqlens needs B=1"):
        fn(q[:, :5].expand(2, 5, 4, 8), k.expand(2, 5, 2, 8), k.expand(2, 5, 2, 8), cu_seqlens=torch.tensor([0, 5]))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_bad_cu_seqlens_is_rejected_by_every_backend(backend):
    q = torch.randn(1, 10, 4, 8)
    k = torch.randn(1, 10, 2, 8)
    for bad in ([0, 4, 8], [0, 6, 4, 10], [1, 10]):
        with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=10; got \[" + ", ".join(map(str, bad))):
            ops.attention.call_backend(backend, q, k, k, cu_seqlens=torch.tensor(bad))
