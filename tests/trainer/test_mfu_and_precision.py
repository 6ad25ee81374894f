"""Honest throughput figures and precision switches of the GPU path (issue 18), on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from sbtrain.config.model import ConfigError
from sbtrain.config.train import TrainerConfig
from sbtrain.trainer.build import configure_matmul_precision
from sbtrain.trainer.flops import (
    PEAK_DATASHEET,
    PEAK_MEASURED,
    PEAK_OVERRIDE,
    device_peak,
    peak_flops,
    throughput_metrics,
)


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
    ("MetaX C500", "bf16", 280e12),
])
def test_datasheet_peaks_by_device_name(name, precision, peak):
    value, source = device_peak(name, precision)
    assert value == peak
    assert "datasheet" in source or "product brief" in source or "same datasheet" in source


@pytest.mark.parametrize("name", ["MetaX C550", "Some Future GPU"])
def test_no_guessed_peak(name):
    value, source = device_peak(name, "bf16")
    assert math.isnan(value) and "trainer.peak_flops" in source


def test_peak_sources_and_kinds():
    peak, source, kind = peak_flops(torch.device("cpu"), "fp32", 123e12)
    assert (peak, source, kind) == (123e12, "trainer.peak_flops", PEAK_OVERRIDE)
    peak, source, kind = peak_flops(torch.device("cpu"), "fp32")
    assert kind == PEAK_MEASURED and peak > 0 and "measured" in source
    with pytest.raises(ValueError, match="trainer.peak_flops=-1"):
        peak_flops(torch.device("cpu"), "fp32", -1)


def test_throughput_metrics_are_per_device():
    m = throughput_metrics(2e9, 1000.0, 8, 1e12, PEAK_DATASHEET)
    assert m["mfu"] == pytest.approx(2e9 * 1000 / (8 * 1e12), rel=1e-15)
    assert m["tflops_per_device"] == pytest.approx(2e9 * 1000 / 8 / 1e12, rel=1e-15)
    assert m["tokens_per_s_per_device"] == 125.0
    cpu = throughput_metrics(2e9, 1000.0, 2, 1e11, PEAK_MEASURED)
    assert "mfu" not in cpu and cpu["pct_of_measured_matmul"] == pytest.approx(100 * 2e9 * 1000 / (2 * 1e11))
    unknown = throughput_metrics(2e9, 1000.0, 1, float("nan"), "unknown")
    assert "mfu" not in unknown and "pct_of_measured_matmul" not in unknown


def test_peak_flops_override_is_validated():
    with pytest.raises(ConfigError, match="trainer.peak_flops=0"):
        TrainerConfig(max_steps=1, peak_flops=0).validate()


def test_tf32_is_set_for_cuda_only():
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        configure_matmul_precision(torch.device("cpu"), True)
        assert torch.backends.cuda.matmul.fp32_precision == before[0]
        configure_matmul_precision(torch.device("cuda"), True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        configure_matmul_precision(torch.device("cuda"), False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_grad_sync_is_validated():
    from sbtrain.config.model import ModelConfig
    from sbtrain.config.parallel import ParallelConfig, validate_parallel

    model = ModelConfig(name="t", vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48).validate()
    with pytest.raises(ConfigError, match=r"parallel.grad_sync='never' is unknown; use one of \('per_step'"):
        validate_parallel(ParallelConfig(grad_sync="never"), 1, model, TrainerConfig(max_steps=1))
