"""References of the small ops: RMSNorm, SwiGLU, rotary embedding (HF conventions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from operators.registry import define_op


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF Qwen2/Llama RMSNorm: normalise in fp32, cast back, then scale by ``weight``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the SwiGLU FFN's activation)."""
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's non-interleaved (rotate-half) convention.

    x ``[B,T,H,D]``; cos/sin ``[B,T,D]`` or ``[T,D]`` (from :func:`rotary_cos_sin`).
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    """Plain RoPE inverse frequencies ``[dim/2]`` (fp32, HF's formula)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_position: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, attention_factor: float | None = None,
                  device=None) -> tuple[torch.Tensor, float]:
    """YaRN ("NTK-by-parts" + attention temperature; Peng et al. 2023, HF's ``rope_type="yarn"``).

    Dimensions that turn fewer than ``beta_slow`` times over the original context are interpolated
    (frequency / factor), those turning more than ``beta_fast`` times keep their frequency, a linear
    ramp blends the ones between (the ramp's ends rounded outward, as HF does). Returns
    ``(inv_freq [dim/2], cos/sin scale)``; the scale defaults to ``0.1 ln(factor) + 1``."""

    def rotations_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(rotations_dim(beta_fast)), 0)
    high = min(math.ceil(rotations_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp: avoid 0/0
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    plain = rope_inv_freq(dim, base, device)
    inv_freq = plain / factor * (1 - keep) + plain * keep
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype=torch.float32,
                   inv_freq: torch.Tensor | None = None, scale: float = 1.0):
    """cos/sin ``[..., T, D]`` for integer positions (computed in fp32, as HF does). ``inv_freq``
    replaces the plain frequencies of ``base`` (e.g. :func:`yarn_inv_freq`'s), ``scale`` multiplies
    cos and sin (YaRN's attention temperature)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(dim, base, position_ids.device)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


# The op (its faster backends register on it from their own modules).
rms_norm = define_op("rms_norm", rms_norm_reference)
swiglu = define_op("swiglu", swiglu_reference)
rotary = define_op("rotary", rotary_reference)
