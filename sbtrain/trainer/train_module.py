"""The TrainModule: what one optimizer step does to a model (OLMo-core's split).

The Trainer (``trainer.py``) owns the loop, evaluation, checkpoints, signals and callbacks and
knows nothing of how a model learns. The TrainModule takes this rank's micro batches of a global
batch and returns one update's :class:`StepStats`:

- context parallelism: each micro batch is cut to this rank's shard, and the mixers get the
  global layout (``ContextParallel``: length, document bounds);
- the loss: Σ token losses / target tokens of the *global* batch, whatever the layout, so micro
  batch, DP and CP sizes change nothing; the MoE auxiliary loss is averaged over micro batches and
  DP ranks;
- the features (spiking schedule, distillation, MoE bias balancing) as components
  (``components.py``), and backward / reduce / clip / update through an engine (``engine.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.context_parallel import ContextParallel
from parallel.mesh import ParallelMesh
from sbtrain.trainer.components import Distillation, StepComponent, default_components
from sbtrain.trainer.engine import DeepSpeedStep, SetLR, StepEngine, TorchEngine


@dataclass
class StepStats:
    loss: float
    tokens: int
    aux_loss: float
    grad_norm: float
    skipped: bool
    extra: dict = field(default_factory=dict)  # the components' metrics (kd_loss, ...)


class TrainModule:
    def __init__(self, engine: StepEngine, *, precision: str = "fp32", mesh: ParallelMesh | None = None,
                 cp_linear: str = "allgather", components: Iterable[StepComponent] = ()):
        self.engine, self.precision, self.mesh, self.cp_linear = engine, precision, mesh, cp_linear
        self.components = list(components)
        self.needs_logits = any(c.needs_logits for c in self.components)
        self.loss_group = mesh.loss_mesh.get_group() if mesh is not None else None
        self.sync_wait_s = 0.0  # seconds spent in the step's own all-reduces (slow-rank detector)

    @classmethod
    def build(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tcfg, ocfg, *,
              mesh: ParallelMesh | None = None, pcfg=None, expert_grad_divisor=None, deepspeed=None,
              distillation: Distillation | None = None) -> TrainModule:
        """The step a run of these configs trains with (TrainerConfig ``tcfg``, OptimConfig ``ocfg``,
        ParallelConfig ``pcfg``): a DeepSpeed engine when ``deepspeed`` (a ``parallel.deepspeed_engine.
        DeepSpeedEngine``, which then holds the model and optimizer) is given, else torch autograd
        (``expert_grad_divisor`` from ``trainer.distributed.parallelize``); every default component."""
        if deepspeed is not None:
            engine: StepEngine = DeepSpeedStep(deepspeed)
        else:
            engine = TorchEngine(model, optimizer, ocfg.clip_grad, grad_sync=pcfg.grad_sync if pcfg else "per_step",
                                 expert_grad_divisor=expert_grad_divisor)
        return cls(engine, precision=tcfg.precision, mesh=mesh, cp_linear=pcfg.cp_linear if pcfg else "allgather",
                   components=default_components(engine.model, distillation))

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def device(self) -> torch.device:
        """Where the model computes, and so where every tensor handed to a collective lives: an NCCL
        group rejects CPU tensors at run time (never at import)."""
        return next(self.model.parameters()).device

    @property
    def grad_reduce_size(self) -> int:
        """Ranks whose gradients the data-parallel wrapper averages (dp x cp)."""
        return self.mesh.grad_reduce_size if self.mesh is not None else 1

    @property
    def cp_size(self) -> int:
        return self.mesh.cp if self.mesh is not None else 1

    def all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks whose tokens make up the global batch (dp x cp)."""
        if dist.is_initialized():
            start = time.perf_counter()
            dist.all_reduce(value, group=self.loss_group)
            self.sync_wait_s += time.perf_counter() - start  # mostly waiting for the slowest rank
        return value

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    def prepare(self, mb: dict) -> dict:
        """Move a micro batch to the device; under context parallelism keep this rank's shard of
        the sequence and hand the mixers the global layout (length, document bounds)."""
        # non_blocking: the prefetching loader pins its batches on CUDA, so the copy overlaps compute.
        device = self.device
        mb = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        if self.cp_size == 1:
            return mb
        T = mb["input_ids"].shape[1]
        cp = ContextParallel(self.mesh.cp_mesh.get_group(), T, mb.pop("cu_seqlens", None), self.cp_linear)
        out = {k: cp.shard(v) for k, v in mb.items() if k in ("input_ids", "labels", "position_ids")}
        if cp.cu_seqlens is not None:
            out["cu_seqlens"] = cp.cu_seqlens
        out["context_parallel"] = cp
        return out

    def set_step(self, step: int) -> None:
        """Tell the components which step comes next (train or evaluation)."""
        for component in self.components:
            component.on_step_start(step)

    def train_batch(self, micro_batches: list[dict], step: int, set_lr: SetLR,
                    before_update=lambda: None) -> StepStats:
        """One optimizer step over this rank's micro batches of the global batch ``step + 1``;
        ``before_update`` runs on the reduced gradients before clipping (the callbacks' hook)."""
        self.set_step(step)
        micro_batches = [self.prepare(mb) for mb in micro_batches]
        device = self.device
        local_tokens = torch.zeros((), dtype=torch.float64, device=device)
        for mb in micro_batches:
            local_tokens += (mb["labels"] != -100).sum()
        global_tokens = int(self.all_reduce(local_tokens).item())
        if global_tokens == 0:
            raise ValueError(f"step {step + 1}: the global batch has no target tokens (all labels are -100)")
        # The data-parallel wrapper averages gradients over dp x cp ranks; times that count, the
        # sum of every rank's objective is the global-batch loss.
        scale = self.grad_reduce_size / global_tokens
        # Under CP each rank returns its share of its sequences' aux loss (shares sum to the whole):
        # the mean over micro batches and DP ranks takes the factor cp.
        aux_weight = self.cp_size / len(micro_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, mb in enumerate(micro_batches):
            self.engine.set_gradient_sync(last=i == len(micro_batches) - 1)
            with self.autocast():
                out = self.model(**mb, return_logits=self.needs_logits)
            objective = out.loss_sum * scale
            for component in self.components:
                extra = component.objective(mb, out, scale, self.autocast)
                if extra is not None:
                    objective = objective + extra
            if out.aux_loss is not None and torch.is_tensor(out.aux_loss):
                objective = objective + out.aux_loss * aux_weight
                aux_sum += out.aux_loss.detach().double() * aux_weight
            self.engine.backward(objective)
            loss_sum += out.loss_sum.detach().double()
            for component in self.components:
                component.after_micro_batch(out)
        loss = (self.all_reduce(loss_sum) / global_tokens).item()
        aux = float(self.all_reduce(aux_sum) / self.grad_reduce_size)
        extra: dict = {}
        for component in self.components:
            extra.update(component.metrics(self.all_reduce, global_tokens))
        grad_norm, stepped = self.engine.step(set_lr, math.isfinite(loss), before_update)
        if stepped:
            for component in self.components:
                component.after_update(self.all_reduce)
        return StepStats(loss, global_tokens, aux, grad_norm, not stepped, extra)

    @torch.no_grad()
    def eval_batch(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (loss sum, target tokens) of one validation micro batch, float64."""
        with self.autocast():
            out = self.model(**self.prepare(mb))
        return out.loss_sum.double(), out.num_tokens.double()


__all__ = ["StepStats", "TrainModule"]
