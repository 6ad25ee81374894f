"""The Trainer: owns the loop, evaluation, checkpoints, signals and callbacks; what one step does
to the model is its TrainModule's (``train_module.py``: loss, components, engine).

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
from typing import Any, Protocol

import torch
import torch.distributed as dist

from sbtrain.trainer.callbacks import Callback
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.engine import StepEngine
from sbtrain.trainer.flops import Throughput
from sbtrain.trainer.optim import apply_lr
from sbtrain.trainer.train_module import StepStats, TrainModule

log = logging.getLogger("sbtrain.train")


class TrainData(Protocol):
    def next_global_batch(self) -> list[dict]: ...  # this rank's micro batches of the next step
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...  # stages.py also passes new_stage=True


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(
        self,
        *,
        module: TrainModule,  # the step: model, engine (optimizer), parallel layout, components
        cfg,  # TrainerConfig
        optim_cfg,  # OptimConfig: the LR schedule
        train_data: TrainData,
        valid_data: Any | None = None,  # has .batches() -> Iterable[dict]
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 0,
        callbacks: Iterable[Callback] = (),
        throughput: Throughput | None = None,  # FLOPs per token and the device peak: MFU (None: no MFU)
        meta: dict | None = None,  # written beside each checkpoint (git revision, config, ...)
    ):
        self.module, self.cfg, self.optim_cfg = module, cfg, optim_cfg
        self.train_data, self.valid_data = train_data, valid_data
        self.checkpointer, self.checkpoint_every = checkpointer, checkpoint_every
        # Other ranks run only the callbacks that join collectives (observability: all_ranks).
        self.callbacks = [cb for cb in callbacks if self._rank0 or getattr(cb, "all_ranks", False)]
        self.throughput = throughput or Throughput()
        self.meta = meta or {}
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

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def _rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    @property
    def model(self) -> torch.nn.Module:
        return self.module.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.module.optimizer

    @property
    def engine(self) -> StepEngine:
        return self.module.engine

    @property
    def mesh(self):
        return self.module.mesh

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def sync_wait_s(self) -> float:
        """Seconds spent in the step's own all-reduces (the slow-rank detector reads it)."""
        return self.module.sync_wait_s

    def all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks of the global batch (dp x cp); callbacks use it for their statistics."""
        return self.module.all_reduce(value)

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
        model_sd, optim_sd = self.engine.state_dict()
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
        self.engine.load_state_dict(state["model"], state["optim"])
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
        # step); if nothing is loaded into it, the engine drops it again.
        state = self.state_dict()
        meta = self.checkpointer.load(state, None if resume == "auto" else resume)
        if meta is None:
            self.engine.drop_unloaded_state()
        else:
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
    def log_record(self, kind: str, record: dict) -> None:
        """Hand a record (e.g. ``model_stats``) to the logging callbacks (metrics.jsonl, wandb)."""
        for cb in self.callbacks:
            cb.on_record(self, kind, record)

    def train_step(self, micro_batches: list[dict]) -> StepStats:
        """One optimizer step (the TrainModule's), at this step's learning rate."""
        def set_lr(optimizer):
            apply_lr(optimizer, self.step - self.schedule_start, self.total_steps, self.optim_cfg)

        def before_update():
            for cb in self.callbacks:
                cb.on_before_optimizer_step(self)

        return self.module.train_batch(micro_batches, self.step, set_lr, before_update)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.valid_data is None:
            return None
        was_training = self.model.training
        self.module.set_step(self.step)
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(self.valid_data.batches()):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            batch_loss, batch_tokens = self.module.eval_batch(mb)
            loss_sum += batch_loss
            tokens += batch_tokens
        self.model.train(was_training)
        loss_sum, tokens = self.all_reduce(loss_sum), self.all_reduce(tokens)
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
            **stats.extra,  # the components' metrics (kd_loss with a teacher)
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": stats.grad_norm,
            "skipped": int(stats.skipped),
            "skipped_steps": self.skipped_steps,
            "step_time_s": elapsed,
            "tokens_per_s": tokens_per_s,
            # MFU is per device: global model FLOP/s / world / one device's peak (docs/MFU.md).
            **self.throughput.metrics(tokens_per_s, world),
            "memory_gb": _memory_gb(self.device),
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
