"""Typed schema of ``sbtrain-export`` (``recipes/export.yaml``), stored in Hydra's ConfigStore as
``export_schema`` so a mistyped key (``w8a.methd=mse``) is an error, not a silent default.

``format`` picks the folder written: ``hf`` (the default: the checkpoint's weights as they are)
or ``w8aspike`` (int8 weights in groups of ``w8a.group_size`` along the input dim, scales by
``w8a.method``, and spike activations with ``w8a.k``; see :mod:`sbtrain.spike.w8a`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sbtrain.config.data import TokenizerConfig

FORMATS = ("hf", "w8aspike")


@dataclass
class W8AConfig:
    """``format=w8aspike`` only."""

    method: str = "absmax"  # absmax: scale = absmax/127; mse: clipping search, codes clamped to [-128, 127]
    k: float = 3.0  # spike threshold divisor: V_th = mean(|x|) / k per token
    spike: bool = True  # false: int8 weights only (W8), activations left as they are
    spike_down_proj: bool = False  # also spike the FFN down_proj input (the public code does not)
    group_size: int = 128  # input channels per scale


@dataclass
class ExportConfig:
    ckpt: str = MISSING  # weights directory or training checkpoint (step dir, checkpoints/ or a run's out_dir)
    out: str = MISSING  # the Hugging Face folder to write
    format: str = "hf"  # hf | w8aspike
    dtype: str | None = None  # null keeps the checkpoint's dtype (w8aspike: of the tensors left unquantized)
    max_shard_bytes: int = 4 * 2**30  # larger models are written as shards + model.safetensors.index.json
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    w8a: W8AConfig = field(default_factory=W8AConfig)


def register_export_schema() -> None:
    """Store the schema as ``export_schema`` (idempotent: ConfigStore overwrites)."""
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


register_export_schema()

__all__ = ["FORMATS", "ExportConfig", "W8AConfig", "register_export_schema"]
