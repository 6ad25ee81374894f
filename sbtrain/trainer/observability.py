"""Observability callbacks for the Trainer (``observe.*``): profiler, model statistics, slow ranks,
evaluation during training. All are off by default; :func:`build_observability` makes only the
ones a config turns on, so an unobserved run has no extra callback at all.

- :class:`ProfilerCallback` — torch.profiler over ``num_steps`` steps after ``start_step``, one
  Chrome trace per rank (``trace_rank{R}.json``, open in chrome://tracing or Perfetto) and a
  text table of the top ops. While it records, the op registry wraps every op call in a
  ``sbtrain::<op>[<backend>]`` range (``operators.registry.set_profiling``), so the trace shows
  which backend ran each op; outside the window the registry pays one flag read per call.
- :class:`~sbtrain.trainer.model_stats.ModelStatsCallback` — per-layer gradient norms, GLA
  decay, MoE load / drops / router entropy, spike rates (see that module).
- :class:`SlowRankDetector` — every ``every`` steps each rank's mean *busy* time per step (step
  time minus the time it waited in the trainer's all-reduces, where a fast rank waits for a slow
  one) is all-gathered; a rank above ``factor`` x the median is named in a warning and a
  ``slow_rank`` record. Limit: waiting inside FSDP's own collectives is not subtracted, so a
  straggler in compute shows mostly in the ranks' *equal* step times; one in data loading or in
  anything before the step's first all-reduce is named.
- ``observe.eval`` — :class:`sbtrain.eval.callback.EvalCallback`, every ``every`` steps
  ``sbtrain.eval.evaluate_ppl`` / ``loss_by_position`` on the validation micro batches. The eval
  room sits above the trainer (tests/test_architecture.py), so this module does not import it:
  the caller hands the class in (``build_observability(..., eval_callback=EvalCallback)``, as
  ``sbtrain.train`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from operators import registry
from sbtrain.config.model import ConfigError
from sbtrain.trainer.callbacks import Callback
from sbtrain.trainer.model_stats import ModelStatsCallback

log = logging.getLogger("sbtrain.train")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class ProfilerCallback(Callback):
    all_ranks = True  # every rank writes its own trace

    def __init__(self, start_step: int, num_steps: int, directory: str | Path, record_shapes: bool = False):
        self.start_step, self.stop_step = start_step, start_step + num_steps
        self.directory, self.record_shapes = Path(directory), record_shapes
        self.profiler = None
        self.trace: Path | None = None

    def on_fit_start(self, trainer):
        if trainer.step == self.start_step:
            self._start()

    def on_step_end(self, trainer, metrics):
        if self.profiler is not None and trainer.step >= self.stop_step:
            self._finish(trainer)
        elif self.profiler is None and trainer.step == self.start_step:
            self._start()

    def on_fit_end(self, trainer):
        if self.profiler is not None:
            self._finish(trainer)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, record_shapes=self.record_shapes)
        self.profiler.start()
        registry.set_profiling(True)

    def _finish(self, trainer) -> None:
        registry.set_profiling(False)
        self.profiler.stop()
        self.directory.mkdir(parents=True, exist_ok=True)
        rank = _rank()
        self.trace = self.directory / f"trace_rank{rank}.json"
        self.profiler.export_chrome_trace(str(self.trace))
        table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (self.directory / f"ops_rank{rank}.txt").write_text(table)
        self.profiler = None
        log.info("profile of steps %d-%d: %s", self.start_step + 1, trainer.step, self.trace)
        if trainer._rank0:
            trainer.log_record("profile", {"step": trainer.step, "first_step": self.start_step + 1,
                                           "trace": str(self.trace)})


class SlowRankDetector(Callback):
    all_ranks = True  # the all-gather needs every rank

    def __init__(self, every: int, factor: float):
        self.every, self.factor = every, factor
        self.busy_s, self.steps = 0.0, 0
        self.wait_mark: float | None = None
        self.last: dict | None = None  # the last check's figures (tests, debugging)

    def on_fit_start(self, trainer):
        self.wait_mark = trainer.sync_wait_s

    def on_step_end(self, trainer, metrics):
        if self.wait_mark is None:
            self.wait_mark = trainer.sync_wait_s
        waited = trainer.sync_wait_s - self.wait_mark
        self.busy_s += metrics["step_time_s"] - waited
        self.steps += 1
        if trainer.step % self.every or not dist.is_initialized() or dist.get_world_size() == 1:
            self.wait_mark = trainer.sync_wait_s
            return
        mean_busy = self.busy_s / self.steps
        self.busy_s, self.steps = 0.0, 0
        device = next(trainer.model.parameters()).device
        mine = torch.tensor([mean_busy], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        self.wait_mark = trainer.sync_wait_s  # the gather is not step time
        busy = torch.cat(gathered).cpu()
        # torch.median: the lower middle value for an even world size (2 ranks: the faster one).
        median, slowest = float(busy.median()), int(busy.argmax())
        ratio = float(busy[slowest]) / median if median > 0 else float("inf")
        self.last = {"step": trainer.step, "busy_s": busy.tolist(), "median_s": median, "slowest_rank": slowest,
                     "ratio": ratio, "slow": ratio > self.factor}
        if ratio > self.factor and trainer._rank0:
            log.warning("step %d: rank %d is slow: %.3f s busy per step, %.2fx the median %.3f s (all ranks: %s)",
                        trainer.step, slowest, float(busy[slowest]), ratio, median,
                        ", ".join(f"{t:.3f}" for t in busy.tolist()))
            trainer.log_record("slow_rank", self.last)


def build_observability(cfg, out_dir: str | Path, cp: int = 1, eval_batches: int = 0,
                        eval_callback: Callable[..., Callback] | None = None) -> list[Callback]:
    """The callbacks an ``ObserveConfig`` turns on (none by default). ``eval_callback`` makes the
    ``observe.eval`` callback from ``every=, ppl=, loss_by_position=, max_batches=``
    (:class:`sbtrain.eval.callback.EvalCallback`); only a config with ``observe.eval.every`` needs it."""
    cfg.validate()
    callbacks: list[Callback] = []
    if cfg.profile.num_steps:
        directory = cfg.profile.dir or Path(out_dir) / "profile"
        callbacks.append(ProfilerCallback(cfg.profile.start_step, cfg.profile.num_steps, directory,
                                          cfg.profile.record_shapes))
    if cfg.model_stats.every:
        callbacks.append(ModelStatsCallback(cfg.model_stats.every))
    if cfg.slow_rank.every:
        callbacks.append(SlowRankDetector(cfg.slow_rank.every, cfg.slow_rank.factor))
    if cfg.eval.every:
        if cp > 1:
            raise ConfigError(f"observe.eval.every={cfg.eval.every} runs whole windows on each rank; with "
                              f"parallel.cp={cp} set observe.eval.every=0 (trainer.eval_every still works)")
        if eval_callback is None:
            raise ValueError("observe.eval.every is set but build_observability got no eval_callback: pass "
                             "eval_callback=sbtrain.eval.callback.EvalCallback")
        callbacks.append(eval_callback(every=cfg.eval.every, ppl=cfg.eval.ppl,
                                       loss_by_position=cfg.eval.loss_by_position, max_batches=eval_batches))
    return callbacks


__all__ = ["ModelStatsCallback", "ProfilerCallback", "SlowRankDetector", "build_observability"]
