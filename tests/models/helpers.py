"""Shared helpers for the model tests: recipe configs with overrides, tiny models."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import sbtrain.config  # noqa: F401  registers the schema
from sbtrain.config.model import ModelConfig
from sbtrain.models import build_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipe(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of ``recipes/model/NAME.yaml`` with ``model.*`` overrides, via Hydra."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        cfg = compose("info", overrides=[f"model={name}", *(overrides or [])])
    return OmegaConf.to_object(cfg.model)


def tiny_model(name: str, overrides: list[str] | None = None, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(recipe(name, overrides)).to(dtype)
    return model.eval()
