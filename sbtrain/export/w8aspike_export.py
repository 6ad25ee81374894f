"""The ``format=w8aspike`` part of :func:`sbtrain.export.hf_export.export`.

The folder is the ``format=hf`` folder with three differences:

- every weight :func:`sbtrain.spike.w8a.quantized_weight_names` lists is stored as
  ``<name>_int8`` (int8 codes in Linear orientation ``[..., d_out, d_in]``; routed experts
  ``[E, Dout, Din]``, the transpose of their ``[E, Din, Dout]`` parameter) and ``<name>_scale``
  (fp32 ``[..., d_out, ceil(d_in / group_size)]``); every other tensor is written as in ``hf``;
- ``config.json`` adds ``w8aspike`` (method, group size, the quantized names) and ``spike``
  (sbtrain's ``model.spike`` with the export's mode / k / spike_down_proj), and its
  ``auto_map.AutoModelForCausalLM`` names ``w8aspike_sbtrain.SbtrainW8ASpikeForCausalLM``;
- ``w8aspike_report.json``: per quantized weight its clipped codes, max abs and relative error
  (:func:`sbtrain.spike.w8a.summarize`), plus totals;
- ``w8aspike_sbtrain.py`` (standalone: torch + transformers + the two other .py files) is copied
  beside the usual modeling files; it dequantizes ``codes * scale`` exactly as
  :func:`sbtrain.spike.w8a.dequantize` and spikes as ``operators.spike`` does, so the folder
  reproduces sbtrain's fake-quant model (:func:`sbtrain.spike.w8a.apply_w8aspike`).

``config.yaml`` in the folder is the source's ModelConfig as it was (its own spike settings);
sbtrain cannot re-import the int8 tensors: load the source checkpoint and call ``apply_w8aspike``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass, replace

import torch
from omegaconf import DictConfig, OmegaConf

from sbtrain.config.model import ModelConfig
from sbtrain.export.config import W8AConfig
from sbtrain.spike.w8a import QuantizedWeight, check_settings, quantize_model, quantized_weight_names, summarize

W8A_CODE_FILE = "w8aspike_sbtrain.py"
W8A_REPORT_FILE = "w8aspike_report.json"
W8A_MODEL_CLASS = "w8aspike_sbtrain.SbtrainW8ASpikeForCausalLM"
CODES_SUFFIX, SCALES_SUFFIX = "_int8", "_scale"


def w8a_settings(w8a: W8AConfig | DictConfig | dict | None) -> W8AConfig:
    """A checked :class:`W8AConfig` from a dataclass, a Hydra node, a dict or None (defaults)."""
    if w8a is None:
        settings = W8AConfig()
    elif isinstance(w8a, W8AConfig):
        settings = w8a
    else:
        plain = OmegaConf.to_container(w8a, resolve=True) if isinstance(w8a, DictConfig) else dict(w8a)
        settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(W8AConfig), plain))
    check_settings(settings.method, settings.group_size, settings.k if settings.spike else None)
    return settings


def quantize_for_export(model: torch.nn.Module, settings: W8AConfig) -> dict[str, QuantizedWeight]:
    return quantize_model(model, settings.method, settings.group_size)


def w8a_tensors(state: dict[str, torch.Tensor], names: list[str], quantized: dict[str, QuantizedWeight],
                target: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The folder's tensors in state-dict order: codes + scales for quantized weights, the rest
    cast to ``target`` (the router's fp32 expert bias kept)."""
    for name in names:
        if name in quantized:
            yield name + CODES_SUFFIX, quantized[name].codes
            yield name + SCALES_SUFFIX, quantized[name].scales.float()
        else:
            tensor = state[name]
            yield name, tensor if name.endswith("expert_bias") else tensor.to(target)


def w8a_total_bytes(state: dict[str, torch.Tensor], names: list[str], quantized: dict[str, QuantizedWeight],
                    target: torch.dtype) -> int:
    total = 0
    for name in names:
        if name in quantized:
            total += quantized[name].codes.numel() + 4 * quantized[name].scales.numel()
        else:
            total += state[name].numel() * (4 if name.endswith("expert_bias") else target.itemsize)
    return total


def spike_settings(cfg: ModelConfig, settings: W8AConfig) -> dict:
    """The model's spike config with the export's switches (mode eval, or off for W8 only)."""
    spike = cfg.spike
    spike = (replace(spike, mode="eval", k=float(settings.k), spike_down_proj=settings.spike_down_proj)
             if settings.spike else replace(spike, mode="off"))
    plain = asdict(spike) if is_dataclass(spike) else dict(spike)
    plain["targets"] = list(plain["targets"])
    return plain


def w8a_config(config: dict, model: torch.nn.Module, settings: W8AConfig) -> dict:
    """``config.json`` of the ``hf`` format plus the quantization and spike sections."""
    config = dict(config)
    config["auto_map"] = dict(config["auto_map"], AutoModelForCausalLM=W8A_MODEL_CLASS)
    config["architectures"] = ["SbtrainW8ASpikeForCausalLM"]
    config["w8aspike"] = {
        "weight_dtype": "int8",
        "symmetric": True,
        "method": settings.method,
        "group_size": int(settings.group_size),
        "codes_suffix": CODES_SUFFIX,
        "scales_suffix": SCALES_SUFFIX,
        "quantized": quantized_weight_names(model),
    }
    config["spike"] = spike_settings(model.config, settings)
    return config


def w8a_report(quantized: dict[str, QuantizedWeight], settings: W8AConfig) -> str:
    """``w8aspike_report.json``'s text."""
    return json.dumps(summarize(quantized, settings.method, settings.group_size), indent=1)


__all__ = ["CODES_SUFFIX", "SCALES_SUFFIX", "W8A_CODE_FILE", "W8A_REPORT_FILE", "quantize_for_export", "spike_settings", "w8a_config",
           "w8a_report", "w8a_settings", "w8a_tensors", "w8a_total_bytes"]
