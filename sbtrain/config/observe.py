"""Typed schema of the trainer's observability (``observe.*`` in ``recipes/train.yaml``).

Everything here is off by default and cheap when on (see ``sbtrain/trainer/observability.py``):
a profiler window, model statistics every N steps, a slow-rank detector for distributed runs,
and evaluation-during-training through ``sbtrain.eval``. A misspelt key is a Hydra error; a bad
value is a :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sbtrain.config.model import ConfigError


@dataclass
class ProfileConfig:
    """torch.profiler over steps ``start_step + 1 .. start_step + num_steps``, one Chrome trace per rank."""

    num_steps: int = 0  # steps in the profiled window (0: no profiling)
    start_step: int = 5  # profile after this many optimizer steps (past warm-up and allocator growth)
    dir: str | None = None  # where the traces go (None: <trainer.out_dir>/profile)
    record_shapes: bool = False  # input shapes per op in the trace (bigger trace, more overhead)


@dataclass
class ModelStatsConfig:
    """Per-layer gradient norms, GLA decay, MoE load / drops / router entropy, spike rates."""

    every: int = 0  # every N optimizer steps (0: never)


@dataclass
class SlowRankConfig:
    """Per-rank busy time all-gathered every N steps; the slowest rank is named when it exceeds
    the median by ``factor``."""

    every: int = 0  # every N optimizer steps (0: never); meaningful only with more than one rank
    factor: float = 1.5  # slow = busy time > factor x the median busy time over ranks


@dataclass
class EvalObserveConfig:
    """Evaluation during training with ``sbtrain.eval`` on the validation split."""

    every: int = 0  # every N optimizer steps (0: never); needs data.valid_fraction > 0
    ppl: bool = True  # sbtrain.eval.evaluate_ppl
    loss_by_position: bool = False  # sbtrain.eval.loss_by_position


@dataclass
class ObserveConfig:
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    model_stats: ModelStatsConfig = field(default_factory=ModelStatsConfig)
    slow_rank: SlowRankConfig = field(default_factory=SlowRankConfig)
    eval: EvalObserveConfig = field(default_factory=EvalObserveConfig)

    def validate(self) -> ObserveConfig:
        for key, value in (
            ("observe.profile.num_steps", self.profile.num_steps),
            ("observe.profile.start_step", self.profile.start_step),
            ("observe.model_stats.every", self.model_stats.every),
            ("observe.slow_rank.every", self.slow_rank.every),
            ("observe.eval.every", self.eval.every),
        ):
            if value < 0:
                raise ConfigError(f"{key}={value} must be >= 0 (0 turns it off)")
        if self.slow_rank.factor <= 1.0:
            raise ConfigError(f"observe.slow_rank.factor={self.slow_rank.factor} must be > 1 (e.g. 1.5: a rank "
                              "50% slower than the median is reported)")
        if self.eval.every and not (self.eval.ppl or self.eval.loss_by_position):
            raise ConfigError("observe.eval.every > 0 but observe.eval.ppl and observe.eval.loss_by_position are "
                              "both false: turn one on or set observe.eval.every=0")
        return self


__all__ = ["EvalObserveConfig", "ModelStatsConfig", "ObserveConfig", "ProfileConfig", "SlowRankConfig"]
