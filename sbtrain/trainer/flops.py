"""Training FLOPs per token (for MFU) and the peak they are compared with.

Per token, forward + backward, recomputation excluded (that is HFU's business):

    6 · (active non-embedding parameters + LM head)
  + 6 · T · d                      per causal full-attention layer (d = query heads × head dim)
  + 12 · min(W, T/2) · d           per sliding-window layer (= the causal value while T <= 2W)
  + 3 · H · (2·C·(d_k + d_v) + 4·d_k·d_v)   per gated-linear-attention layer (H query heads, C = 64)

An intra-layer hybrid layer pays its softmax branch and its linear branch. See docs/MFU.md.
"""

from __future__ import annotations

import time

import torch

GLA_CHUNK = 64

# Dense peak FLOP/s per device and dtype (vendor datasheets, dense, no sparsity).
DEVICE_PEAK = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp32": 19.5e12},
    "H800": {"bf16": 989e12, "fp32": 67e12},
    "C500": {"bf16": 280e12, "fp32": 35e12},  # MetaX C500 (vendor figure)
}


def mixer_flops_per_token(kind: str, seq_len: int, cfg) -> float:
    hd = cfg.resolved_head_dim
    d = cfg.num_attention_heads * hd
    full = 6.0 * seq_len * d
    swa = 12.0 * min(cfg.sliding_window, seq_len / 2) * d
    gla = 3.0 * cfg.num_attention_heads * (2 * GLA_CHUNK * (2 * hd) + 4 * hd * hd)
    return {"full": full, "swa": swa, "gla": gla, "hybrid_full": full + gla, "hybrid_swa": swa + gla}[kind]


def flops_per_token(cfg, seq_len: int, active_non_embedding: int, lm_head: int) -> float:
    """Model FLOPs per trained token for a :class:`sbtrain.config.ModelConfig`."""
    total = 6.0 * (active_non_embedding + lm_head)
    for kind in cfg.layer_types():
        total += mixer_flops_per_token(kind, seq_len, cfg)
    return total


def measure_matmul_flops(dtype=torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a square matmul on this CPU (the peak MFU is quoted against on CPU)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        n += 1
    return 2.0 * size**3 * n / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from)."""
    if override:
        return float(override), "trainer.peak_flops"
    if device.type != "cpu":
        name = torch.cuda.get_device_name(device)
        for key, table in DEVICE_PEAK.items():
            if key in name:
                return table["bf16" if precision == "bf16" else "fp32"], f"table[{key}]"
        return float("nan"), f"unknown device {name!r}: set trainer.peak_flops"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(dtype), "measured CPU matmul"
