"""Typed config schemas (dataclasses registered in Hydra's ConfigStore on import)."""

from sbtrain.config import data as _data  # noqa: F401  data/tokenizer schemas
from sbtrain.config import train as _train  # noqa: F401  train_schema
from sbtrain.config.model import LAYER_KINDS, ConfigError, GLAConfig, HybridConfig, ModelConfig, MoEConfig

__all__ = ["LAYER_KINDS", "ConfigError", "GLAConfig", "HybridConfig", "MoEConfig", "ModelConfig"]
