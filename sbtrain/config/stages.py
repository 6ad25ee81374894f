"""Typed schema of staged long-context training (``stage_plan`` in an experiment recipe).

A *stage* is one phase of continual pretraining at one sequence length (the report's 7B: CPT-1 8k,
CPT-2 32k, CPT-3 128k). The plan lists the stages in order; ``stage=NAME`` runs one of them and
``stages=all`` runs them in order, resuming mid-sequence after a crash (:mod:`sbtrain.trainer.stages`).

Every stage knob left ``null`` falls back to the run's own ``trainer.*`` / ``optim.*`` /
``parallel.*`` value, except the global batch: by default it keeps the run's tokens per step
(``trainer.global_batch_size * trainer.seq_len``) constant, so the batch shrinks as the length grows.

The plan is called ``stage_plan`` (not ``stages``) because ``stages=all`` is the command-line
contract of the issue: one key cannot be both a list and the word ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sbtrain.config.model import ConfigError

ROPE_KINDS = ("none", "theta", "yarn")
OPTIMIZER_CARRY = ("carry", "reset")
SCHEDULES = ("cosine", "wsd", "linear", "constant")


@dataclass
class RopeScalingConfig:
    """RoPE change for the softmax layers from this stage on (GLA layers have no RoPE).

    none: keep what is in force (the model's, or what an earlier stage set).
    theta: a new base (e.g. 1e6 -> 8e6 before a 4x longer context).
    yarn: YaRN scaling (``model.rope_yarn``, HF's rope_type yarn) on top of the base in force.
    ``original_max_position`` defaults to the length the model had before the first YaRN stage
    (the previous stage's ``seq_len``; the run's ``trainer.seq_len`` for the first stage), ``factor``
    to this stage's ``seq_len`` / ``original_max_position``. A later yarn stage replaces the factor
    and keeps the original length (so 8k -> 32k -> 128k gives factors 4 and 16 over 8k).
    """

    kind: str = "none"  # none | theta | yarn
    theta: float | None = None  # kind=theta: the new RoPE base
    factor: float | None = None  # kind=yarn: null = seq_len / original_max_position
    original_max_position: int | None = None  # kind=yarn: null = the length before the first yarn stage
    beta_fast: float = 32.0  # kind=yarn: see sbtrain.config.model.YarnConfig
    beta_slow: float = 1.0
    attention_factor: float | None = None  # kind=yarn: cos/sin scale; null: 0.1 ln(factor) + 1


@dataclass
class StageConfig:
    name: str = ""  # the stage's name: its folder under trainer.out_dir and the value of stage=NAME
    seq_len: int = 0  # tokens per sequence in this stage
    max_steps: int | None = None  # length of the stage in optimizer steps ...
    max_tokens: int | None = None  # ... or in tokens (steps = ceil(tokens / tokens per step))
    global_batch_size: int | None = None  # null: trainer.global_batch_size * trainer.seq_len / seq_len
    micro_batch_size: int | None = None  # null: trainer.micro_batch_size * trainer.seq_len / seq_len (at least 1)
    lr: float | None = None  # this stage's LR schedule (null: optim.*); it restarts at the stage's first step
    min_lr_ratio: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None  # cosine | wsd | linear | constant
    cp: int | None = None  # context-parallel degree of this stage (null: parallel.cp)
    optimizer: str = "carry"  # carry: AdamW moments go on from the last stage | reset: fresh moments
    rope: RopeScalingConfig = field(default_factory=RopeScalingConfig)


def validate_stage(stage: StageConfig, index: int) -> StageConfig:
    where = f"stage_plan[{index}] ({stage.name or 'unnamed'})"
    if not stage.name or stage.name == "all" or "/" in stage.name:
        raise ConfigError(f"{where}: name={stage.name!r} must be a non-empty folder name other than 'all'")
    if stage.seq_len <= 0:
        raise ConfigError(f"{where}: seq_len={stage.seq_len} must be positive (tokens per sequence)")
    if (stage.max_steps is None) == (stage.max_tokens is None):
        raise ConfigError(f"{where}: set exactly one of max_steps or max_tokens (how long the stage trains)")
    for key in ("max_steps", "max_tokens", "global_batch_size", "micro_batch_size", "cp"):
        value = getattr(stage, key)
        if value is not None and value < 1:
            raise ConfigError(f"{where}: {key}={value} must be >= 1")
    if stage.lr is not None and stage.lr <= 0:
        raise ConfigError(f"{where}: lr={stage.lr} must be positive")
    if stage.warmup_steps is not None and stage.warmup_steps < 0:
        raise ConfigError(f"{where}: warmup_steps={stage.warmup_steps} must be >= 0")
    if stage.schedule is not None and stage.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: schedule={stage.schedule!r} is unknown; use one of {SCHEDULES}")
    if stage.optimizer not in OPTIMIZER_CARRY:
        raise ConfigError(f"{where}: optimizer={stage.optimizer!r} is unknown; use carry or reset")
    rope = stage.rope
    if rope.kind not in ROPE_KINDS:
        raise ConfigError(f"{where}: rope.kind={rope.kind!r} is unknown; use one of {ROPE_KINDS}")
    if rope.kind == "theta" and not (rope.theta and rope.theta > 0):
        raise ConfigError(f"{where}: rope.kind=theta needs a positive rope.theta (the new RoPE base)")
    yarn_only = {"factor": rope.factor is not None, "original_max_position": rope.original_max_position is not None,
                 "beta_fast": rope.beta_fast != RopeScalingConfig.beta_fast,
                 "beta_slow": rope.beta_slow != RopeScalingConfig.beta_slow,
                 "attention_factor": rope.attention_factor is not None}
    set_here = [f"rope.{k}" for k, v in yarn_only.items() if v]
    if rope.kind != "yarn" and set_here:  # a setting that would silently do nothing
        raise ConfigError(f"{where}: {', '.join(set_here)} apply to rope.kind=yarn only (kind is {rope.kind!r}): "
                          f"set rope.kind=yarn or drop them")
    if rope.kind != "theta" and rope.theta is not None:
        raise ConfigError(f"{where}: rope.theta={rope.theta} applies to rope.kind=theta only (kind is {rope.kind!r})")
    if rope.kind == "yarn" and rope.factor is not None and rope.factor < 1:
        raise ConfigError(f"{where}: rope.factor={rope.factor} must be >= 1 (YaRN stretches the context)")
    if rope.kind == "yarn" and rope.original_max_position is not None and rope.original_max_position < 1:
        raise ConfigError(f"{where}: rope.original_max_position={rope.original_max_position} must be positive")
    return stage


def validate_plan(plan: list[StageConfig]) -> list[StageConfig]:
    if not plan:
        raise ConfigError("stage=NAME / stages=all need a stage plan: pick an experiment that has one "
                          "(e.g. experiment=tiny_cpu_stages) or set stage_plan=[...]")
    names = [validate_stage(s, i).name for i, s in enumerate(plan)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"stage_plan has duplicate stage names {dupes}: every stage needs its own name (its folder)")
    return plan


def stage_batch(stage: StageConfig, base_batch: int, base_micro: int, base_seq_len: int) -> tuple[int, int]:
    """(global batch, micro batch) of a stage: constant tokens per step and per micro batch by default."""
    tokens_per_step = base_batch * base_seq_len
    batch = stage.global_batch_size
    if batch is None:
        batch, rem = divmod(tokens_per_step, stage.seq_len)
        if rem or batch == 0:
            raise ConfigError(
                f"stage {stage.name}: seq_len={stage.seq_len} does not divide the run's tokens per step "
                f"{tokens_per_step} (trainer.global_batch_size={base_batch} x trainer.seq_len={base_seq_len}); "
                f"set this stage's global_batch_size or change the run's batch"
            )
    micro = stage.micro_batch_size or max(1, base_micro * base_seq_len // stage.seq_len)
    return batch, min(micro, batch)
