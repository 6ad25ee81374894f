"""The Trainer: owns the loop, the optimizer step, evaluation and checkpoints.

Vocabulary (Megatron's): a *global batch* of ``global_batch_size`` sequences makes one
optimizer step; each data-parallel rank takes ``global_batch_size / dp`` of them in micro
batches of ``micro_batch_size``; gradient accumulation is what is left over. The loss of a
step is the sum of token losses over the global batch divided by the number of target tokens
in the global batch, whatever the layout, so changing micro batch or DP size changes nothing.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from parallel.context_parallel import ContextParallel
from parallel.fsdp import scale_expert_grads
from parallel.grad_norm import clip_grad_norm_
from parallel.mesh import ParallelMesh
from sbtrain.models.spiking import set_spiking_step
from sbtrain.trainer.callbacks import Callback
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.distill import kd_loss_sum
from sbtrain.trainer.flops import PEAK_UNKNOWN, throughput_metrics
from sbtrain.trainer.optim import apply_lr

log = logging.getLogger("sbtrain.train")


class TrainData(Protocol):
    def next_global_batch(self) -> list[dict]: ...  # this rank's micro batches of the next step
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepStats:
    loss: float
    tokens: int
    aux_loss: float
    grad_norm: float
    skipped: bool
    kd_loss: float = 0.0  # distillation KL per target token (0 without a teacher)


class Trainer:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg,  # TrainerConfig
        optim_cfg,  # OptimConfig
        train_data: TrainData,
        valid_data: Any | None = None,  # has .batches() -> Iterable[dict]
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 0,
        callbacks: Iterable[Callback] = (),
        flops_per_token: float = 0.0,
        peak_flops: float = float("nan"),
        peak_kind: str = PEAK_UNKNOWN,  # sbtrain.trainer.flops.PEAK_*: is the peak a datasheet figure?
        meta: dict | None = None,
        mesh: ParallelMesh | None = None,
        cp_linear: str = "allgather",
        engine: Any | None = None,
        teacher: torch.nn.Module | None = None,
        expert_grad_divisor: tuple[list, float] | None = None,  # from trainer.distributed.parallelize
        distill_cfg: Any | None = None,  # DistillConfig: weight, temperature
        grad_sync: str = "per_step",  # parallel.grad_sync: FSDP reduces once per step or per micro batch
    ):
        self.model, self.optimizer, self.cfg, self.optim_cfg = model, optimizer, cfg, optim_cfg
        self.train_data, self.valid_data = train_data, valid_data
        self.checkpointer, self.checkpoint_every = checkpointer, checkpoint_every
        # Other ranks run only the callbacks that join collectives (observability: all_ranks).
        self.callbacks = [cb for cb in callbacks if self._rank0 or getattr(cb, "all_ranks", False)]
        self.sync_wait_s = 0.0  # seconds spent in the trainer's own all-reduces (slow-rank detector)
        self.flops_per_token, self.peak_flops, self.peak_kind = flops_per_token, peak_flops, peak_kind
        self.meta = meta or {}
        self.mesh, self.cp_linear = mesh, cp_linear
        # A DeepSpeed engine (parallel.deepspeed_engine) owns backward, clipping, the optimizer
        # step and the optimizer state; None: plain autograd + torch optimizer (FSDP or one rank).
        self.engine = engine
        self.teacher, self.distill_cfg = teacher, distill_cfg
        self.grad_sync = grad_sync
        self.loss_group = mesh.loss_mesh.get_group() if mesh is not None else None
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # target tokens trained on
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.tokens_per_step = cfg.global_batch_size * cfg.seq_len
        self.total_steps = self._total_steps()  # length of this run's LR schedule (of this stage, when staged)
        # First step of the LR schedule: 0, or a stage's first step when step and token counts carry
        # over from the previous stage (set by sbtrain.trainer.stages); training ends at end_step.
        self.schedule_start = 0
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        # (expert modules, divisor): the part of the dp x cp average FSDP does not apply to
        # EP-sharded experts (parallel.fsdp.scale_expert_grads).
        self.expert_grad_divisor = expert_grad_divisor
        # MoE layers with auxiliary-loss-free balancing: their expert bias follows the global load.
        self.balancers = [
            m for m in model.modules()
            if hasattr(m, "update_expert_bias") and getattr(getattr(m, "cfg", None), "aux_free_balancing", False)
        ]

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def _rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def device(self) -> torch.device:
        """Where the model computes, and so where every tensor the trainer hands to a collective
        lives: an NCCL group rejects CPU tensors at run time (never at import)."""
        return next(self.model.parameters()).device

    @property
    def grad_reduce_size(self) -> int:
        """Ranks whose gradients the data-parallel wrapper averages (dp x cp)."""
        return self.mesh.grad_reduce_size if self.mesh is not None else 1

    @property
    def cp_size(self) -> int:
        return self.mesh.cp if self.mesh is not None else 1

    def _prepare(self, mb: dict, device: torch.device) -> dict:
        """Move a micro batch to the device; under context parallelism keep this rank's shard of
        the sequence and hand the mixers the global layout (length, document bounds)."""
        # non_blocking: the prefetching loader pins its batches on CUDA, so the copy overlaps compute.
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

    @property
    def end_step(self) -> int:
        return self.schedule_start + self.total_steps

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return int(self.cfg.max_steps)
        if self.cfg.max_tokens is not None:
            return max(1, math.ceil(self.cfg.max_tokens / self.tokens_per_step))
        raise ValueError("set trainer.max_steps or trainer.max_tokens (how long to train)")

    def state_dict(self) -> dict:
        if self.engine is not None:
            engine_sd = self.engine.checkpoint_state_dict()  # ZeRO-3: this rank's partitions only
            model_sd, optim_sd = engine_sd["model"], engine_sd["optim"]
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "data": self.train_data.state_dict(),
            "trainer": {
                "step": self.step,
                "tokens": self.tokens,
                "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "rng_torch": torch.get_rng_state(),
                "rng_python": _python_rng_to_json(random.getstate()),
                # The accelerator's generator (CUDA / MACA: 16 bytes of philox seed + offset), as
                # JSON so a CPU checkpoint (empty list) resumes on a GPU and the other way round.
                "rng_device": _device_rng_state(self.device),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if self.engine is not None:
            self.engine.load_state_dict({"model": state["model"], "optim": state["optim"]})
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.train_data.load_state_dict(state["data"])
        t = state["trainer"]
        self.step, self.tokens = int(t["step"]), int(t["tokens"])
        self.skipped_steps, self.consecutive_nonfinite = int(t["skipped_steps"]), int(t["consecutive_nonfinite"])
        torch.set_rng_state(t["rng_torch"])
        random.setstate(_python_rng_from_json(t["rng_python"]))
        if t.get("rng_device") and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(t["rng_device"], dtype=torch.uint8), self.device)

    def save_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        path = self.checkpointer.save(self.step, self.state_dict(), {"tokens": self.tokens, **self.meta})
        self._saved_step = self.step
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)

    def maybe_resume(self, resume: str) -> dict | None:
        """``auto``: newest good checkpoint if any; ``never``; or a checkpoint path."""
        if self.checkpointer is None or resume == "never":
            return None
        if resume == "auto" and not self.checkpointer.candidates():
            return None  # a fresh run: do not build a load template at all (see below)
        # The template materialises the optimizer state (DCP's get_state_dict takes a zero-lr
        # step); if nothing is loaded into it, drop it again, or AdamW's step count would start
        # at 1 and the first real update would use the wrong bias correction.
        state = self.state_dict()
        meta = self.checkpointer.load(state, None if resume == "auto" else resume)
        if meta is None and self.engine is None:
            self.optimizer.state.clear()
        if meta is not None:
            self.load_state_dict(state)
            self._saved_step = self.step
            log.info("resumed from %s at step %d (%d tokens)", meta["path"], self.step, self.tokens)
        return meta

    # -- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return previous

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM / SIGUSR1. A signal reaches the ranks at different moments
        (one may see it a step later): they agree here, or some would checkpoint (a collective)
        while the others start the next step, and the job would hang."""
        if dist.is_initialized():
            flag = torch.tensor([self._stop_signal or 0], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._stop_signal = int(flag.item()) or None
        return self._stop_signal is not None

    # -- the step -------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "bf16":
            device_type = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            start = time.perf_counter()
            dist.all_reduce(value, group=self.loss_group)
            self.sync_wait_s += time.perf_counter() - start  # mostly waiting for the slowest rank
        return value

    def log_record(self, kind: str, record: dict) -> None:
        """Hand a record (e.g. ``model_stats``) to the logging callbacks (metrics.jsonl, wandb)."""
        for cb in self.callbacks:
            cb.on_record(self, kind, record)

    def train_step(self, micro_batches: list[dict]) -> StepStats:
        set_spiking_step(self.model, self.step)  # model.spike.train_from_step: spikes for the last part
        device = self.device
        micro_batches = [self._prepare(mb, device) for mb in micro_batches]
        local_tokens = torch.zeros((), dtype=torch.float64, device=device)
        for mb in micro_batches:
            local_tokens += (mb["labels"] != -100).sum()
        global_tokens = int(self._all_reduce(local_tokens).item())
        if global_tokens == 0:
            raise ValueError(f"step {self.step + 1}: the global batch has no target tokens (all labels are -100)")
        # The data-parallel wrapper averages gradients over dp x cp ranks; times that count, the
        # sum of every rank's objective is the global-batch loss.
        scale = self.grad_reduce_size / global_tokens
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=device)
        loads = [None] * len(self.balancers)
        for i, mb in enumerate(micro_batches):
            self._set_gradient_sync(last=i == len(micro_batches) - 1)
            with self._autocast():
                out = self.model(**mb, return_logits=self.teacher is not None)
            objective = out.loss_sum * scale
            if self.teacher is not None:
                with torch.no_grad(), self._autocast():
                    teacher_logits = self.teacher(**mb, return_logits=True).logits
                kd = kd_loss_sum(out.logits, teacher_logits, mb["labels"], self.distill_cfg.temperature)
                objective = objective + self.distill_cfg.weight * kd * scale
                kd_sum += kd.detach().double()
            if out.aux_loss is not None and torch.is_tensor(out.aux_loss):
                # Mean over micro batches and DP ranks. Under CP each rank returns its share of
                # its sequences' aux loss (shares sum to the whole), hence the factor cp.
                objective = objective + out.aux_loss * (self.cp_size / len(micro_batches))
                aux_sum += out.aux_loss.detach().double() * (self.cp_size / len(micro_batches))
            if self.engine is not None:
                self.engine.backward(objective)
            else:
                objective.backward()
            loss_sum += out.loss_sum.detach().double()
            for i, moe in enumerate(self.balancers):
                load = moe.last_tokens_per_expert.detach().double()
                loads[i] = load if loads[i] is None else loads[i] + load
        loss_sum = self._all_reduce(loss_sum)
        loss = (loss_sum / global_tokens).item()
        aux_sum = self._all_reduce(aux_sum) / self.grad_reduce_size
        kd = float(self._all_reduce(kd_sum) / global_tokens) if self.teacher is not None else 0.0
        if self.engine is not None:
            stats = self._engine_step(loss, global_tokens, float(aux_sum), loads)
            stats.kd_loss = kd
            return stats
        if self.expert_grad_divisor is not None:
            scale_expert_grads(*self.expert_grad_divisor)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        grad_norm = clip_grad_norm_(self.params, self.optim_cfg.clip_grad)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            apply_lr(self.optimizer, self.step - self.schedule_start, self.total_steps, self.optim_cfg)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for moe, load in zip(self.balancers, loads):
                if load is not None:
                    moe.update_expert_bias(self._all_reduce(load))
        return StepStats(loss, global_tokens, float(aux_sum), grad_norm, skipped, kd)

    def _set_gradient_sync(self, last: bool) -> None:
        """FSDP2: reduce(-scatter) gradients only in the last micro batch's backward (no-sync
        accumulation: one reduction per optimizer step instead of one per micro batch)."""
        if self.engine is None and self.grad_sync == "per_step" and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)

    def _engine_step(self, loss: float, global_tokens: int, aux: float, loads: list) -> StepStats:
        """The optimizer step through a DeepSpeed engine: it reduces, clips and skips non-finite
        gradients itself; a non-finite loss skips the step before the engine sees it."""
        if not math.isfinite(loss):
            self.engine.zero_grad()
            return StepStats(loss, global_tokens, aux, float("nan"), True)
        apply_lr(self.engine.optimizer, self.step - self.schedule_start, self.total_steps, self.optim_cfg)
        grad_norm, stepped = self.engine.step(None)
        self.engine.zero_grad()
        if stepped:
            for moe, load in zip(self.balancers, loads):
                if load is not None:
                    moe.update_expert_bias(self._all_reduce(load))
        return StepStats(loss, global_tokens, aux, grad_norm, not stepped)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.valid_data is None:
            return None
        was_training = self.model.training
        set_spiking_step(self.model, self.step)
        self.model.eval()
        device = self.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        for i, mb in enumerate(self.valid_data.batches()):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            mb = self._prepare(mb, device)
            with self._autocast():
                out = self.model(**mb)
            loss_sum += out.loss_sum.double()
            tokens += out.num_tokens
        self.model.train(was_training)
        loss_sum, tokens = self._all_reduce(loss_sum), self._all_reduce(tokens)
        metrics = {"step": self.step, "tokens": self.tokens, "valid_loss": (loss_sum / tokens.clamp(min=1)).item()}
        for cb in self.callbacks:
            cb.on_eval(self, metrics)
        return metrics

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until ``total_steps``; returns a summary. A SIGTERM / SIGUSR1 checkpoints and
        returns with ``stopped_by`` set (the launcher exits 0 and Slurm requeues)."""
        previous = self._install_signal_handlers()
        self.model.train()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        summary: dict = {"first_valid_loss": None, "last_valid_loss": None, "stopped_by": None}
        try:
            if self.cfg.eval_every and self.step == self.schedule_start:  # a fresh run's (or stage's) first step
                first = self.evaluate()
                summary["first_valid_loss"] = first and first["valid_loss"]
            while self.step < self.end_step:
                start = time.perf_counter()
                stats = self.train_step(self.train_data.next_global_batch())
                elapsed = time.perf_counter() - start
                self.step += 1
                self._after_step(stats, elapsed)
                if self.cfg.eval_every and (self.step % self.cfg.eval_every == 0 or self.step == self.end_step):
                    last = self.evaluate()
                    summary["last_valid_loss"] = last and last["valid_loss"]
                if self._stop_requested() or self.step == self.cfg.exit_at_step:
                    reason = signal.Signals(self._stop_signal).name if self._stop_signal else "exit_at_step"
                    summary["stopped_by"] = reason
                    log.warning("stopping at step %d (%s): checkpointing", self.step, reason)
                    self.save_checkpoint()
                    break
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
            else:
                if self._saved_step != self.step:
                    self.save_checkpoint()
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for cb in self.callbacks:
                cb.on_fit_end(self)
        summary.update(step=self.step, tokens=self.tokens, skipped_steps=self.skipped_steps)
        return summary

    def _after_step(self, stats: StepStats, elapsed: float) -> None:
        if stats.skipped:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped",
                        self.step, stats.loss, stats.grad_norm)
            if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive non-finite steps ending at step {self.step}: "
                    "lower optim.lr, raise optim.warmup_steps, check the data near this step, or train in fp32 "
                    "(trainer.precision=fp32); trainer.max_consecutive_nonfinite sets how many are tolerated"
                )
        else:
            self.consecutive_nonfinite = 0
            self.tokens += stats.tokens
        tokens_per_s = self.tokens_per_step / elapsed
        world = dist.get_world_size() if dist.is_initialized() else 1
        metrics = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": stats.loss,
            "aux_loss": stats.aux_loss,
            **({"kd_loss": stats.kd_loss} if self.teacher is not None else {}),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": stats.grad_norm,
            "skipped": int(stats.skipped),
            "skipped_steps": self.skipped_steps,
            "step_time_s": elapsed,
            "tokens_per_s": tokens_per_s,
            # MFU is per device: global model FLOP/s / world / one device's peak (docs/MFU.md).
            **throughput_metrics(self.flops_per_token, tokens_per_s, world, self.peak_flops, self.peak_kind),
            "memory_gb": _memory_gb(next(self.model.parameters()).device),
        }
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def _device_rng_state(device: torch.device) -> list[int]:
    return torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else []


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
