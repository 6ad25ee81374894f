"""How gradients become an update: the optimizer engines behind the TrainModule.

An engine owns backward, gradient reduction, clipping, the optimizer step and the optimizer state.
The TrainModule (``train_module.py``) calls only the :class:`StepEngine` protocol, so the step has
no branch per engine: a new ZeRO engine is one class here.

- :class:`TorchEngine` — autograd and a torch optimizer, alone or under FSDP2 (no-sync gradient
  accumulation, the EP experts' share of the gradient average, the global-norm clip).
- :class:`DeepSpeedStep` — the DeepSpeed ZeRO engine (``parallel.deepspeed_engine``): it reduces,
  clips and skips non-finite gradients itself, and holds the optimizer state in its partitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

from parallel.fsdp import scale_expert_grads
from parallel.grad_norm import clip_grad_norm_
from sbtrain.config.model import ConfigError

SetLR = Callable[[torch.optim.Optimizer], None]  # sets every param group's lr for this step


class StepEngine(Protocol):
    model: torch.nn.Module  # what the forward runs (a DeepSpeed engine's module)
    optimizer: torch.optim.Optimizer

    def set_gradient_sync(self, last: bool) -> None: ...  # before each micro batch's backward
    def backward(self, objective: torch.Tensor) -> None: ...
    def step(self, set_lr: SetLR, loss_finite: bool, before_step: Callable[[], None]) -> tuple[float, bool]: ...
    def state_dict(self) -> tuple[dict, dict]: ...  # (model, optimizer), DCP-ready
    def load_state_dict(self, model: dict, optim: dict | None) -> None: ...  # optim None: fresh moments
    def drop_unloaded_state(self) -> None: ...  # forget what a load template materialised


class TorchEngine:
    """Plain autograd and a torch optimizer, on one process or FSDP2-sharded."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float,
                 grad_sync: str = "per_step", expert_grad_divisor: tuple[list, float] | None = None):
        self.model, self.optimizer, self.clip_grad, self.grad_sync = model, optimizer, clip_grad, grad_sync
        self.params = [p for p in model.parameters() if p.requires_grad]
        # (expert modules, divisor): the part of the dp x cp average FSDP does not apply to
        # EP-sharded experts (parallel.fsdp.scale_expert_grads); from trainer.distributed.parallelize.
        self.expert_grad_divisor = expert_grad_divisor

    def set_gradient_sync(self, last: bool) -> None:
        """FSDP2: reduce(-scatter) gradients only in the last micro batch's backward (no-sync
        accumulation: one reduction per optimizer step instead of one per micro batch)."""
        if self.grad_sync == "per_step" and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def step(self, set_lr: SetLR, loss_finite: bool, before_step: Callable[[], None]) -> tuple[float, bool]:
        if self.expert_grad_divisor is not None:
            scale_expert_grads(*self.expert_grad_divisor)
        before_step()  # callbacks read the reduced, unclipped gradients here (model statistics)
        grad_norm = clip_grad_norm_(self.params, self.clip_grad)
        stepped = loss_finite and math.isfinite(grad_norm)
        if stepped:
            set_lr(self.optimizer)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    def state_dict(self) -> tuple[dict, dict]:
        return get_state_dict(self.model, self.optimizer)

    def load_state_dict(self, model: dict, optim: dict | None) -> None:
        if optim is None:
            set_model_state_dict(self.model, model)
            self.drop_unloaded_state()  # fresh moments: AdamW's bias correction restarts at step 1
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=model, optim_state_dict=optim)

    def drop_unloaded_state(self) -> None:
        # DCP's get_state_dict materialises the optimizer state with a zero-lr step; kept, AdamW's
        # step count would start at 1 and the first real update would use the wrong bias correction.
        self.optimizer.state.clear()


class DeepSpeedStep:
    """A ``parallel.deepspeed_engine.DeepSpeedEngine`` behind :class:`StepEngine`: it reduces, clips
    and skips non-finite gradients itself; a non-finite loss skips the step before it sees it."""

    def __init__(self, deepspeed_engine):
        self.deepspeed = deepspeed_engine
        self.model, self.optimizer = deepspeed_engine.module, deepspeed_engine.optimizer

    def set_gradient_sync(self, last: bool) -> None:
        pass  # ZeRO reduces from its own buckets; accumulation is handled inside the engine

    def backward(self, objective: torch.Tensor) -> None:
        self.deepspeed.backward(objective)

    def step(self, set_lr: SetLR, loss_finite: bool, before_step: Callable[[], None]) -> tuple[float, bool]:
        if not loss_finite:
            self.deepspeed.zero_grad()
            return float("nan"), False
        set_lr(self.deepspeed.optimizer)
        grad_norm, stepped = self.deepspeed.step(None)
        self.deepspeed.zero_grad()
        return grad_norm, stepped

    def state_dict(self) -> tuple[dict, dict]:
        state = self.deepspeed.checkpoint_state_dict()  # ZeRO-3: this rank's partitions only
        return state["model"], state["optim"]

    def load_state_dict(self, model: dict, optim: dict | None) -> None:
        if optim is None:
            raise ConfigError("a fresh optimizer over loaded weights (a stage's optimizer=reset) is not supported "
                              "with parallel.engine=deepspeed yet; use optimizer=carry or parallel.engine=fsdp")
        self.deepspeed.load_state_dict({"model": model, "optim": optim})

    def drop_unloaded_state(self) -> None:
        pass  # the engine's template reads its partitions without stepping


__all__ = ["DeepSpeedStep", "SetLR", "StepEngine", "TorchEngine"]
