"""Shared pieces of the end-to-end training tests: the small model/trainer overrides and a
``run`` that composes the real Hydra config and trains."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sbtrain.cli.app import RECIPES_DIR
from sbtrain.train import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model=sb7b_tiny", "model.vocab_size=320", "model.hidden_size=64", "model.num_layers=2",
    "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.intermediate_size=128",
    "model.sliding_window=16", "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
    "optim.lr=3e-3", "optim.warmup_steps=2", "logger.console=false", "logger.wandb.mode=disabled",
    "logger.plot=false", "data.valid_fraction=0.05",
]


def run(dataset: str, out: Path, *extra: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL, f"data.datasets=[{dataset}]", f"trainer.out_dir={out}", *extra])
    return train(cfg)


def losses(out: Path, kind: str = "train") -> dict:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    key = "loss" if kind == "train" else "valid_loss"
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


