"""Typed schema of ``sbtrain-plan`` (``recipes/plan.yaml``): a model, a world size, the training
run's own ``parallel.*`` and ``trainer.*`` sections (the same dataclasses, so the same keys and the
same validation as ``sbtrain-train``) and the device whose kernels set the workspace terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sbtrain.config.model import ConfigError
from sbtrain.config.parallel import ParallelConfig
from sbtrain.config.train import TrainerConfig

DEVICES = ("cuda", "cpu")


@dataclass
class PlanConfig:
    model: Any = MISSING  # ModelConfig, from the model group
    world: int = 1  # processes (GPUs) of the job
    # cuda (and MACA, cuda-alike): foreach AdamW, bf16 LM-head operands; cpu: per-tensor AdamW and
    # fp32-widened head operands (no fp32-output bf16 matmul there). Only workspace terms differ.
    device: str = "cuda"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # global_batch_size=-1: micro_batch_size x data-parallel size (one micro batch per rank, no
    # accumulation); larger values accumulate, which changes what FSDP keeps (parallel.grad_sync).
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> PlanConfig:
        if self.world < 1:
            raise ConfigError(f"world={self.world} must be >= 1 (the number of processes / GPUs)")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is unknown; use one of {DEVICES}")
        return self


ConfigStore.instance().store(name="plan_schema", node=PlanConfig)

__all__ = ["DEVICES", "PlanConfig"]
