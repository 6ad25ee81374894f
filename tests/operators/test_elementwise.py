"""ops.rms_norm / ops.swiglu / ops.rotary: every backend vs float64, and vs HF Qwen2 itself."""

from __future__ import annotations

import pytest
import torch

from operators import ops
from operators.elementwise import rotary_cos_sin
from tests.operators.conformance import assert_close, poisoned_allocations, to64, tolerances

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _check(backend, name, got, want, got_grads, want_grads, dtype):
    tol = tolerances(dtype)
    assert got.dtype == dtype
    assert_close(got, want, **tol, name=f"{name}[{backend}] out")
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, w, **tol, name=f"{name}[{backend}] grad {i}")


@pytest.mark.parametrize("backend", ops.rms_norm.available_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64(backend, dtype):
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 64).to(dtype)
    with poisoned_allocations():
        out = ops.rms_norm.call_backend(backend, x, weight, 1e-6)
        gx, gw = _grads(out, (x, weight), grad)
    x64, w64 = to64(x, weight)
    want = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)  # the definition, in float64
    want_gx, want_gw = _grads(want, (x64, w64), grad.double())
    _check(backend, "rms_norm", out, want, (gx, gw), (want_gx, want_gw), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_hf_qwen2(dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    hf = Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(64))
    hf = hf.to(dtype)
    x = (torch.randn(2, 7, 64) * 3).to(dtype)
    # Same op sequence as HF (normalise in fp32, cast, then scale): bit-identical, not just close.
    assert torch.equal(ops.rms_norm(x, hf.weight.detach(), 1e-6), hf(x).detach())


@pytest.mark.parametrize("backend", ops.swiglu.available_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_float64(backend, dtype):
    gate = (torch.randn(4, 9, 48) * 3).to(dtype).requires_grad_()
    up = torch.randn(4, 9, 48).to(dtype).requires_grad_()
    grad = torch.randn(4, 9, 48).to(dtype)
    with poisoned_allocations():
        out = ops.swiglu.call_backend(backend, gate, up)
        got_grads = _grads(out, (gate, up), grad)
    g64, u64 = to64(gate, up)
    want = g64 * torch.sigmoid(g64) * u64
    _check(backend, "swiglu", out, want, got_grads, _grads(want, (g64, u64), grad.double()), dtype)


def _hf_rotary(heads, head_dim, base):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = Qwen2Config(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rope_parameters={"rope_type": "default", "rope_theta": base},
        max_position_embeddings=4096,
    )
    return Qwen2RotaryEmbedding(config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_cos_sin_and_apply_match_hf_qwen2(dtype):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    batch, seq, heads, head_dim, base = 2, 11, 3, 16, 1e6
    rope = _hf_rotary(heads, head_dim, base)
    # Offset, non-contiguous positions (as after packing or in a context-parallel shard).
    position_ids = torch.stack([torch.arange(seq) + 100, torch.arange(seq) * 3])
    x = torch.randn(batch, seq, heads, head_dim).to(dtype)
    hf_cos, hf_sin = rope(x, position_ids)  # [B, T, D] in x's dtype
    cos, sin = rotary_cos_sin(position_ids, head_dim, base, dtype=dtype)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)

    # HF applies on [B, H, T, D]; ours takes [B, T, H, D].
    hf_q, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), hf_cos, hf_sin)
    ours = ops.rotary(x, cos, sin)
    torch.testing.assert_close(ours, hf_q.transpose(1, 2), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ops.rotary.available_backends("cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True], ids=["cos[T,D]", "cos[B,T,D]"])
def test_rotary_matches_float64(backend, dtype, per_batch):
    batch, seq, heads, head_dim = 2, 9, 4, 32
    position_ids = torch.arange(seq) + 5
    if per_batch:
        position_ids = torch.stack([position_ids, position_ids * 2])
    cos, sin = rotary_cos_sin(position_ids, head_dim, 1e6)
    x = torch.randn(batch, seq, heads, head_dim).to(dtype).requires_grad_()
    grad = torch.randn(batch, seq, heads, head_dim).to(dtype)
    with poisoned_allocations():
        out = ops.rotary.call_backend(backend, x, cos, sin)
        (gx,) = _grads(out, (x,), grad)
    # The definition in float64: rotate each (i, i + D/2) pair by the angle of its frequency.
    (x64,) = to64(x)
    c64, s64 = rotary_cos_sin(position_ids, head_dim, 1e6, dtype=torch.float64)
    c64, s64 = c64.reshape(-1, seq, 1, head_dim), s64.reshape(-1, seq, 1, head_dim)
    x1, x2 = x64[..., : head_dim // 2], x64[..., head_dim // 2 :]
    want = torch.cat(
        [
            x1 * c64[..., : head_dim // 2] - x2 * s64[..., : head_dim // 2],
            x2 * c64[..., head_dim // 2 :] + x1 * s64[..., head_dim // 2 :],
        ],
        dim=-1,
    )
    (want_gx,) = _grads(want, (x64,), grad.double())
    _check(backend, "rotary", out, want, (gx,), (want_gx,), dtype)


def _pair_norms(t):
    half = t.shape[-1] // 2
    return t[..., :half] ** 2 + t[..., half:] ** 2


def test_rotary_is_a_rotation():
    # Norm-preserving per pair, and the inverse angle undoes it: properties, not a copy of the code.
    cos, sin = rotary_cos_sin(torch.arange(13), 8, 1e4, dtype=torch.float64)
    x = torch.randn(1, 13, 2, 8, dtype=torch.float64)
    y = ops.rotary(x, cos, sin)
    torch.testing.assert_close(_pair_norms(y), _pair_norms(x))
    torch.testing.assert_close(ops.rotary(y, cos, -sin), x)


@pytest.mark.parametrize("factor, original, base, head_dim", [(4.0, 64, 1e4, 16), (8.0, 8192, 1e6, 128),
                                                               (2.5, 4096, 5e5, 64)])
def test_yarn_frequencies_and_cos_sin_match_hf(factor, original, base, head_dim):
    import math

    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from operators.elementwise import yarn_inv_freq

    cfg = transformers.Qwen2Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=int(original * factor),
                                   rope_parameters={"rope_type": "yarn", "factor": factor, "rope_theta": base,
                                                    "original_max_position_embeddings": original})
    hf = Qwen2RotaryEmbedding(cfg)
    inv_freq, scale = yarn_inv_freq(head_dim, base, factor, original)
    torch.testing.assert_close(inv_freq, hf.inv_freq, rtol=1e-6, atol=0)
    assert scale == pytest.approx(hf.attention_scaling, rel=1e-12) and scale == pytest.approx(0.1 * math.log(factor) + 1)
    pos = torch.arange(300).unsqueeze(0)
    cos, sin = hf(torch.zeros(1, 300, head_dim), pos)
    ours = rotary_cos_sin(pos, head_dim, base, inv_freq=inv_freq, scale=scale)
    torch.testing.assert_close(ours[0], cos, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours[1], sin, atol=2e-6, rtol=0)
    # the fast dimensions keep their frequency, the slowest are divided by the factor
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert inv_freq[0].item() == plain[0].item()
    assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / factor, rel=1e-6)
