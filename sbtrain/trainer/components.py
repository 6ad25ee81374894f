"""Features of the train step, as components the TrainModule calls at fixed points.

A component adds to the objective, watches each micro batch's output, or acts after the update;
the step itself (``train_module.py``) knows none of them by name. The hooks, in the order a step
calls them (each optional):

- ``on_step_start(step)`` — also before evaluation (spiking must match the step being measured);
- ``objective(mb, out, scale, autocast)`` — an extra term for this micro batch, already scaled like
  the LM loss (``scale`` = grad-reduce size / global target tokens), or None;
- ``after_micro_batch(out)``;
- ``metrics(all_reduce, global_tokens)`` — step metrics (every rank calls it: it may all-reduce);
- ``after_update(all_reduce)`` — only when the optimizer step was applied.

``needs_logits`` asks the model for full logits (the LM loss alone never forms them).
Each component is built from its typed config or from the model by ``from_config`` /
``from_model``, which return None when the feature is off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sbtrain.config.model import ConfigError
from sbtrain.models.spiking import set_spiking_step
from sbtrain.trainer.distill import kd_loss_sum

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class StepComponent:
    needs_logits = False

    def on_step_start(self, step: int) -> None:
        pass

    def objective(self, mb: dict, out, scale: float, autocast: Callable) -> torch.Tensor | None:
        return None

    def after_micro_batch(self, out) -> None:
        pass

    def metrics(self, all_reduce: AllReduce, global_tokens: int) -> dict:
        return {}

    def after_update(self, all_reduce: AllReduce) -> None:
        pass


class SpikeSchedule(StepComponent):
    """``model.spike.train_from_step``: spike-aware training for the last part of a run, and spiking
    evaluation from the same step (the hooks read the step set here)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def on_step_start(self, step: int) -> None:
        set_spiking_step(self.model, step)


class Distillation(StepComponent):
    """``distill.*``: τ²·KL(teacher || student) per target token beside the LM loss, summed like it so
    one global-token normalisation serves both (``trainer/distill.py``)."""

    needs_logits = True

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature
        self.kd_sum: torch.Tensor | None = None

    @classmethod
    def from_config(cls, dcfg, device: torch.device, vocab_size: int, mesh=None, engine: str = "fsdp"):
        """None when ``distill.weight`` is 0; the layouts it does not support are named here, before the
        teacher is read."""
        if not dcfg.weight:
            return None
        if mesh is not None and (mesh.cp > 1 or mesh.tp > 1 or engine != "fsdp"):
            raise ConfigError("distillation runs with data parallelism (FSDP) only for now: set parallel.cp=1, "
                              "parallel.tp=1, parallel.engine=fsdp, or distill.weight=0")
        from sbtrain.trainer.distill import load_teacher

        teacher = load_teacher(dcfg.teacher, device)
        if teacher.config.vocab_size != vocab_size:
            raise ConfigError(f"distill.teacher has vocab_size={teacher.config.vocab_size}, the student "
                              f"{vocab_size}: distillation needs the same tokenizer")
        return cls(teacher, dcfg.weight, dcfg.temperature)

    def on_step_start(self, step: int) -> None:
        self.kd_sum = None

    def objective(self, mb: dict, out, scale: float, autocast: Callable) -> torch.Tensor:
        with torch.no_grad(), autocast():
            teacher_logits = self.teacher(**mb, return_logits=True).logits
        kd = kd_loss_sum(out.logits, teacher_logits, mb["labels"], self.temperature)
        part = kd.detach().double()
        self.kd_sum = part if self.kd_sum is None else self.kd_sum + part
        return self.weight * kd * scale

    def metrics(self, all_reduce: AllReduce, global_tokens: int) -> dict:
        # On the model's device: an NCCL group rejects CPU tensors.
        device = next(self.teacher.parameters()).device
        kd_sum = self.kd_sum if self.kd_sum is not None else torch.zeros((), dtype=torch.float64, device=device)
        return {"kd_loss": float(all_reduce(kd_sum) / global_tokens)}


class ExpertBiasBalancing(StepComponent):
    """Auxiliary-loss-free MoE balancing (``model.moe.aux_free_balancing``): each layer's expert bias
    follows the global expert load of the step, summed over micro batches and ranks."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.layers = layers
        self.loads: list[torch.Tensor | None] = [None] * len(layers)

    @classmethod
    def from_model(cls, model: torch.nn.Module):
        layers = [m for m in model.modules() if hasattr(m, "update_expert_bias")
                  and getattr(getattr(m, "cfg", None), "aux_free_balancing", False)]
        return cls(layers) if layers else None

    def on_step_start(self, step: int) -> None:
        self.loads = [None] * len(self.layers)

    def after_micro_batch(self, out) -> None:
        for i, moe in enumerate(self.layers):
            load = moe.last_tokens_per_expert.detach().double()
            self.loads[i] = load if self.loads[i] is None else self.loads[i] + load

    def after_update(self, all_reduce: AllReduce) -> None:
        for moe, load in zip(self.layers, self.loads):
            if load is not None:
                moe.update_expert_bias(all_reduce(load))


def default_components(model: torch.nn.Module, distillation: Distillation | None = None) -> list[StepComponent]:
    """What every run of ``model`` gets: the spiking schedule, MoE bias balancing when the model has
    it, and distillation when configured."""
    found = [SpikeSchedule(model), ExpertBiasBalancing.from_model(model), distillation]
    return [c for c in found if c is not None]


__all__ = ["Distillation", "ExpertBiasBalancing", "SpikeSchedule", "StepComponent", "default_components"]
