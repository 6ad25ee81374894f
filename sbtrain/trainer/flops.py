"""Training FLOPs per token (for MFU) and the peak they are compared with.

Per token, forward + backward, recomputation excluded (that is HFU's business):

    6 · (active non-embedding parameters + LM head)
  + 6 · T · d                      per causal full-attention layer (d = query heads × head dim)
  + 12 · min(W, T/2) · d           per sliding-window layer (= the causal value while T <= 2W)
  + 3 · H · (2·C·(d_k + d_v) + 4·d_k·d_v)   per gated-linear-attention layer (H query heads, C = 64)

An intra-layer hybrid layer pays its softmax branch and its linear branch. Each mixer kind declares
its own term (``MixerKind.flops_per_token`` in ``sbtrain/models/mixers/``). See docs/MFU.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from sbtrain.models.mixers import mixer_kind

# Dense (no sparsity) peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
# Each row: (name substring, bf16, fp32 without TF32, source). The first match wins, so the
# more specific names come first ("H100 PCIe" before "H100"). A GPU missing here reports no MFU
# until trainer.peak_flops is set.
PeakRow = tuple[str, float | None, float | None, str]
DEVICE_PEAKS: tuple[PeakRow, ...] = (
    ("H100 PCIe", 756e12, 51e12, "NVIDIA H100 Tensor Core GPU datasheet (PCIe: 1,513 TFLOPS bf16 with sparsity)"),
    ("H100 NVL", 835e12, 60e12, "NVIDIA H100 Tensor Core GPU datasheet (NVL: 1,671 TFLOPS bf16 with sparsity)"),
    ("H100", 989e12, 67e12, "NVIDIA H100 Tensor Core GPU datasheet (SXM: 1,979 TFLOPS bf16 with sparsity)"),
    ("H200 NVL", 835e12, 60e12, "NVIDIA H200 Tensor Core GPU datasheet (NVL: 1,671 TFLOPS bf16 with sparsity)"),
    ("H200", 989e12, 67e12, "NVIDIA H200 Tensor Core GPU datasheet (SXM: 1,979 TFLOPS bf16 with sparsity)"),
    ("H800", 989e12, 67e12, "NVIDIA H800 SXM: the H100 SXM tensor cores (same datasheet figure)"),
    ("A100", 312e12, 19.5e12, "NVIDIA A100 Tensor Core GPU datasheet (624 TFLOPS bf16 with sparsity)"),
    ("A800", 312e12, 19.5e12, "NVIDIA A800: the A100 tensor cores (same datasheet figure)"),
    ("C500", 280e12, 36e12, "MetaX C500 product brief (BF16/FP16 280 TFLOPS, FP32 vector 36 TFLOPS)"),
    # SpikingBrain trained on C550s; MetaX publishes no C550 datasheet figure that we could find,
    # so the peak must be given (trainer.peak_flops) rather than guessed from the C500's.
    ("C550", None, None, "no public MetaX C550 datasheet figure found: set trainer.peak_flops"),
)
# Where a peak came from: a datasheet row, the user's trainer.peak_flops, or (CPU) a measured
# matmul rate. Only the first two make an MFU; the third is labelled "% of measured matmul".
PEAK_DATASHEET, PEAK_OVERRIDE, PEAK_MEASURED, PEAK_UNKNOWN = "datasheet", "override", "measured", "unknown"


def mixer_flops_per_token(kind: str, seq_len: int, cfg) -> float:
    """The sequence-mixing core's training FLOPs per token, as the layer kind declares them."""
    return mixer_kind(kind).flops_per_token(cfg, seq_len)


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


def device_peak(name: str, precision: str) -> tuple[float, str]:
    """(dense peak FLOP/s, source) for a GPU named ``name``; NaN when the table has no figure."""
    for key, bf16, fp32, source in DEVICE_PEAKS:
        if key.lower() in name.lower():
            value = bf16 if precision == "bf16" else fp32
            if value is None:
                return float("nan"), f"{name!r}: {source}"
            return value, f"{name!r} ~ {key}: {source}"
    return float("nan"), f"unknown device {name!r}: set trainer.peak_flops"


def peak_flops(device: torch.device, precision: str, override: float | None = None) -> tuple[float, str, str]:
    """(peak FLOP/s of ONE device, where the number came from, its kind: PEAK_*)."""
    if override:
        if not override > 0:
            raise ValueError(f"trainer.peak_flops={override} must be a positive FLOP/s figure (e.g. 989e12)")
        return float(override), "trainer.peak_flops", PEAK_OVERRIDE
    if device.type != "cpu":
        value, source = device_peak(torch.cuda.get_device_name(device), precision)
        return value, source, PEAK_UNKNOWN if math.isnan(value) else PEAK_DATASHEET
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(dtype), "measured CPU matmul (1024^3, one process)", PEAK_MEASURED


def throughput_metrics(flops_per_token: float, tokens_per_s: float, world: int, peak: float, kind: str) -> dict:
    """Per-device model FLOP/s and its share of ONE device's peak: MFU when the peak is a
    datasheet or user figure; on the CPU, the share of a measured matmul rate, never called MFU."""
    per_device = flops_per_token * tokens_per_s / max(world, 1)
    out = {"tokens_per_s_per_device": tokens_per_s / max(world, 1), "tflops_per_device": per_device / 1e12}
    if kind in (PEAK_DATASHEET, PEAK_OVERRIDE) and peak > 0:
        out["mfu"] = per_device / peak
    elif kind == PEAK_MEASURED and peak > 0:
        out["pct_of_measured_matmul"] = 100.0 * per_device / peak
    return out


@dataclass(frozen=True)
class Throughput:
    """What the trainer needs to turn tokens/s into MFU: the model's FLOPs per token and the peak of
    ONE device with where that figure came from (``PEAK_*``)."""

    flops_per_token: float = 0.0
    peak_flops: float = float("nan")
    peak_kind: str = PEAK_UNKNOWN

    def metrics(self, tokens_per_s: float, world: int) -> dict:
        return throughput_metrics(self.flops_per_token, tokens_per_s, world, self.peak_flops, self.peak_kind)
