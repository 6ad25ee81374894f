"""Helpers every exported mixer shares (HF numerics, RoPE, Qwen2-shaped projections) and the table
the exported decoder layer builds mixers from. Plain torch: pasted into the export (see ``__init__``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- exported code below ---
EXPORT_MIXERS: dict = {}  # layer kind -> class built as cls(config, kind)
EXPORT_FFNS: dict = {}  # FFN kind -> class built as cls(config) (sbtrain/models/ffn/hf/)


def export_mixer(*kinds: str):
    """Class decorator: the HF-side mixer of ``kinds``."""
    def register(cls):
        for kind in kinds:
            EXPORT_MIXERS[kind] = cls
        return cls
    return register


def export_ffn(kind: str):
    """Class decorator: the HF-side FFN of ``kind``."""
    def register(cls):
        EXPORT_FFNS[kind] = cls
        return cls
    return register


class SbtrainRMSNorm(nn.Module):
    """HF RMSNorm numerics: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


FEATURE_MAPS = {"relu": F.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"feature map {kind!r} is unknown; use one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[kind](x)


def rope_inv_freq(dim: int, base: float, yarn: dict, device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale: plain RoPE (HF's formula), or YaRN when
    ``yarn["factor"] > 1`` (HF's rope_type yarn: NTK-by-parts ramp between beta_fast and beta_slow
    rotations over the original context, cos/sin scaled by 0.1 ln(factor) + 1 unless given)."""
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    factor = float(yarn.get("factor", 1.0))
    if factor == 1.0:
        return plain, 1.0
    original = yarn["original_max_position"]

    def rotations_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(rotations_dim(yarn.get("beta_fast", 32.0))), 0)
    high = min(math.ceil(rotations_dim(yarn.get("beta_slow", 1.0))), dim - 1)
    high = high + 0.001 if low == high else high
    keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    scale = yarn.get("attention_factor")
    return plain / factor * (1 - keep) + plain * keep, float(scale if scale is not None else 0.1 * math.log(factor) + 1)


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, base: float,
                   yarn: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin ``[B,T,D]`` (rotate-half layout)."""
    inv_freq, scale = rope_inv_freq(dim, base, yarn or {}, position_ids.device)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_qkvo(module: nn.Module, config, prefix: str = "") -> None:
    d, hd = config.hidden_size, config.head_dim
    hq, hkv, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
    setattr(module, f"{prefix}q_proj", nn.Linear(d, hq * hd, bias=bias))
    setattr(module, f"{prefix}k_proj", nn.Linear(d, hkv * hd, bias=bias))
    setattr(module, f"{prefix}v_proj", nn.Linear(d, hkv * hd, bias=bias))
    setattr(module, f"{prefix}o_proj", nn.Linear(hq * hd, d, bias=False))


def project_qkv(module: nn.Module, x: torch.Tensor, head_dim: int, prefix: str = ""):
    B, T, _ = x.shape
    q = getattr(module, f"{prefix}q_proj")(x).view(B, T, -1, head_dim)
    k = getattr(module, f"{prefix}k_proj")(x).view(B, T, -1, head_dim)
    v = getattr(module, f"{prefix}v_proj")(x).view(B, T, -1, head_dim)
    return q, k, v


def hf_window(config, windowed: bool) -> int | None:
    """W past keys for a windowed kind (``config.sliding_window`` is HF's W + 1, the current token too)."""
    return config.sliding_window - 1 if windowed else None


def padding_neutral(real, *tensors):
    """Each ``[B,T,...]`` tensor with the padding tokens' entries zeroed (``real`` ``[B,T]`` bool, None:
    no padding): a zero key or write strength adds nothing to a recurrent state and a zero log-decay
    keeps it, so padding leaves the state as if it were absent."""
    if real is None:
        return tensors
    return tuple(t.masked_fill(~real.view(*real.shape, *[1] * (t.dim() - 2)), 0) for t in tensors)
