"""Typed schema of a training run (``python -m sbtrain.train`` / ``sbtrain-train``).

Every knob of the trainer lives here; a key that is not declared is an error (with the closest
valid names suggested by the CLI), never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sbtrain.config.model import ConfigError
from sbtrain.config.observe import ObserveConfig
from sbtrain.config.operators import OperatorsConfig
from sbtrain.config.parallel import ParallelConfig
from sbtrain.config.stages import StageConfig

PRECISIONS = ("fp32", "bf16")
AC_MODES = ("none", "selective", "full")
WANDB_MODES = ("offline", "online", "disabled")
RESUME_MODEL_CHANGES = ("refuse", "allow")
SCHEDULES = ("cosine", "wsd", "constant", "linear")  # sbtrain.trainer.optim implements each


@dataclass
class TrainerConfig:
    global_batch_size: int = 8  # sequences per optimizer step (all DP ranks together)
    micro_batch_size: int = 2  # sequences per forward/backward on one rank
    seq_len: int = 512  # tokens per sequence
    max_steps: int | None = None  # train by steps ...
    max_tokens: int | None = None  # ... or by tokens (steps = ceil(tokens / (global batch * seq_len)))
    exit_at_step: int | None = None  # checkpoint and exit at this step (the schedule still spans max_steps)
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights and optimizer state)
    activation_checkpointing: str = "none"  # none | selective (every other block) | full (every block)
    compile: bool = False  # torch.compile each block
    eval_every: int = 0  # validation every N steps (0: never); also at step 0 and at the end
    eval_batches: int = 8  # micro batches of the validation split per evaluation (0: all)
    log_every: int = 1  # console log line every N steps when not a terminal (metrics.jsonl gets every step)
    max_consecutive_nonfinite: int = 3  # consecutive NaN/Inf steps tolerated (each skipped) before stopping
    peak_flops: float | None = None  # FLOP/s the MFU is quoted against; default: device table / CPU matmul
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, loss curve, resolved config
    resume: str = "auto"  # auto (newest good checkpoint in out_dir) | never | PATH
    init_from: str | None = None  # start a new run from a weights directory (sbtrain-convert output)
    # A resumed checkpoint of another model / tokenizer / vocabulary: refuse (naming what differs) |
    # allow (deliberate surgery: tensors the run needs must still be in the checkpoint, same shapes).
    resume_model_change: str = "refuse"
    device: str = "auto"  # auto | cpu | cuda
    tf32: bool = True  # CUDA / MACA: fp32 matmuls on TF32 tensor cores (no effect on the CPU)

    def validate(self, dp_size: int = 1) -> TrainerConfig:
        per_rank, rem = divmod(self.global_batch_size, dp_size)
        if rem or per_rank % self.micro_batch_size:
            raise ConfigError(
                f"trainer.global_batch_size={self.global_batch_size} must be a multiple of trainer.micro_batch_size="
                f"{self.micro_batch_size} x data-parallel size {dp_size}; change one of them"
            )
        if self.seq_len <= 0:
            raise ConfigError(f"trainer.seq_len={self.seq_len} must be positive")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("set trainer.max_steps or trainer.max_tokens (how long to train)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r} is unknown; use one of {PRECISIONS}")
        if self.activation_checkpointing not in AC_MODES:
            raise ConfigError(
                f"trainer.activation_checkpointing={self.activation_checkpointing!r} is unknown; use one of {AC_MODES}"
            )
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ConfigError(f"trainer.peak_flops={self.peak_flops} must be a positive FLOP/s figure for ONE device "
                              "(e.g. 989e12 for an H100 SXM in bf16), or null for the built-in table")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError(f"trainer.max_consecutive_nonfinite={self.max_consecutive_nonfinite} must be >= 1")
        if self.resume_model_change not in RESUME_MODEL_CHANGES:
            raise ConfigError(f"trainer.resume_model_change={self.resume_model_change!r} is unknown; use one of "
                              f"{RESUME_MODEL_CHANGES}")
        return self


@dataclass
class NewParamsConfig:
    """Parameters a conversion added (the Transformer had none of them): their own learning rate
    and warmup, and an optional first phase in which only they train (frozen body)."""

    patterns: list[str] = field(default_factory=lambda: [
        "gk_proj", "g_norm", "attn_norm", "linear_norm", "beta_attn", "beta_linear", "sink_k", "sink_v", "router",
    ])  # name substrings
    lr: float | None = None  # their peak lr (None: optim.lr)
    warmup_steps: int | None = None  # their warmup (None: optim.warmup_steps)
    freeze_body_steps: int = 0  # the first N steps update only the new parameters (the body's lr is 0)

    def validate(self) -> NewParamsConfig:
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"optim.new_params.lr={self.lr} must be positive (or null: optim.lr)")
        for name in ("warmup_steps", "freeze_body_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"optim.new_params.{name}={value} must be >= 0")
        return self


@dataclass
class DistillConfig:
    """Distillation from a teacher's logits (the report mentions it as an option after conversion)."""

    teacher: str | None = None  # a weights directory (sbtrain-convert output of the teacher, or any sbtrain model)
    weight: float = 0.0  # the KL term's weight beside the LM loss (0: off)
    temperature: float = 1.0

    def validate(self) -> DistillConfig:
        if self.weight < 0:
            raise ConfigError(f"distill.weight={self.weight} must be >= 0 (0 turns distillation off)")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be positive")
        if self.weight and not self.teacher:
            raise ConfigError("distill.weight > 0 needs distill.teacher=DIR (a weights directory)")
        return self


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear / wsd)
    schedule: str = "cosine"  # cosine | wsd | linear | constant, each after a linear warmup
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameters that never decay besides every vector (norms, biases, betas): name substrings.
    no_decay: list[str] = field(default_factory=lambda: ["embed_tokens", "gk_proj", "sink", "router"])
    clip_grad: float = 1.0  # on the global gradient norm (0: no clipping)
    foreach: bool | None = None
    new_params: NewParamsConfig = field(default_factory=NewParamsConfig)

    def validate(self) -> OptimConfig:
        """Every value torch's AdamW or the schedule would reject (or silently misuse), named as a
        key=value. Comparisons are written so that NaN fails them too."""
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0 (the peak learning rate)")
        betas = list(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps={self.eps} must be > 0")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if not self.warmup_steps >= 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (the final lr is optim.lr x "
                              "min_lr_ratio)")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1] (wsd: the share of steps "
                              "that decay)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if not self.clip_grad >= 0:
            raise ConfigError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0: no clipping)")
        self.new_params.validate()
        return self


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end and on SIGTERM / SIGUSR1)
    keep_last: int = 3
    async_save: bool = False  # snapshot to CPU, write in a background thread (collectives on its own gloo group)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "sbtrain"
    name: str | None = None


@dataclass
class LoggerConfig:
    console: bool = True
    jsonl: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot: bool = True  # loss-curve PNG beside the checkpoints at the end


@dataclass
class TrainConfig:
    model: Any = MISSING  # ModelConfig, from the model group
    data: Any = MISSING  # DataConfig, from the data group
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    operators: OperatorsConfig = field(default_factory=OperatorsConfig)  # backend overrides, MetaX tuning
    observe: ObserveConfig = field(default_factory=ObserveConfig)  # profiler, model stats, slow ranks (all off)
    # Staged long-context training (sbtrain/config/stages.py): the plan, and which part of it to run.
    stage_plan: list[StageConfig] = field(default_factory=list)
    stage: str | None = None  # stage=NAME: run that stage (from the previous stage's final checkpoint)
    stages: str | None = None  # stages=all: run every stage in order, resuming where a crash left off


def validate_logger(cfg: LoggerConfig) -> None:
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={cfg.wandb.mode!r} is unknown; use one of {WANDB_MODES}")


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
