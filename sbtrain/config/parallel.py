"""Typed schema of the parallel layout (``parallel.*`` in ``sbtrain.train``).

Five degrees make one device mesh (TorchTitan's vocabulary): ``dp_replicate`` (HSDP replicas),
``dp_shard`` (FSDP / ZeRO shards; ``-1`` takes whatever the world size leaves), ``cp``
(context parallel: contiguous sequence shards), ``tp`` (tensor + sequence parallel) and ``ep``
(expert parallel, *borrowed* from ``dp_shard``: the ep ranks are dp_shard ranks that hold
different experts, so ep adds no ranks). ``world = dp_replicate * dp_shard * cp * tp``.

:func:`validate_parallel` runs before any model is built and names the bad value and the fix.
What combines with what is tabled in docs/PARALLELISM.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from parallel.mesh import ParallelDims
from sbtrain.config.model import FFN_TP_CHECKS, ConfigError, ModelConfig

ENGINES = ("fsdp", "deepspeed")
ACCELERATORS = ("auto", "cpu", "cuda", "maca")
CP_LINEAR = ("allgather", "scan")
GRAD_SYNC = ("per_step", "per_micro_batch")
PARAM_DTYPES = ("fp32", "bf16")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer state and step on the CPU (compiles CPUAdam on first use)
    accelerator: str = "auto"  # auto (from the platform probe) | cpu | cuda: what deepspeed.accelerator uses


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # replicas (HSDP's outer dim; gradients all-reduced across them)
    dp_shard: int = -1  # FSDP shard degree; -1: world / (dp_replicate * cp * tp)
    cp: int = 1  # context-parallel degree (sequence shards)
    tp: int = 1  # tensor-parallel degree (heads / FFN columns; Megatron-style sequence parallel norms)
    ep: int = 1  # expert-parallel degree (divides dp_shard and the number of routed experts)
    cp_linear: str = "allgather"  # linear-attention CP: allgather (LASP-2) | scan (pipelined P2P, large cp)
    engine: str = "fsdp"  # fsdp (torch FSDP2) | deepspeed (ZeRO 1/2/3 engine)
    param_dtype: str = "fp32"  # fsdp: dtype parameters are gathered and computed in (bf16: fp32 master copy)
    reduce_dtype: str = "fp32"  # fsdp and deepspeed: dtype gradients are reduced in (fp32 | bf16)
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (ZeRO-3) or keep (ZeRO-2)
    # fsdp, with gradient accumulation: per_step reduces once per optimizer step (after the last micro
    # batch; unsharded gradients of every FSDP unit are held across the micro batches), per_micro_batch
    # reduce-scatters after each (sharded gradient memory, micro-batches-fold communication).
    grad_sync: str = "per_step"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # A collective that waits longer than this (a rank hung or gone) fails with the rank and the op
    # named (sbtrain.trainer.distributed.CollectiveTimeoutError) instead of hanging the job.
    collective_timeout_s: float = 1800.0


def resolve_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    for name in ("dp_replicate", "cp", "tp", "ep"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(cfg, name)} must be >= 1")
    fixed = cfg.dp_replicate * cfg.cp * cfg.tp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.dp_replicate*cp*tp = {cfg.dp_replicate}*"
                f"{cfg.cp}*{cfg.tp} = {fixed}; change the degrees or the number of processes"
            )
        dp_shard = world_size // fixed
    elif dp_shard < 1:
        raise ConfigError(f"parallel.dp_shard={dp_shard} must be >= 1 (or -1: whatever the world size leaves)")
    dims = ParallelDims(cfg.dp_replicate, dp_shard, cfg.cp, cfg.tp, cfg.ep)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel.dp_replicate*dp_shard*cp*tp = {cfg.dp_replicate}*{dp_shard}*{cfg.cp}*{cfg.tp} = "
            f"{dims.world_size} but the world size is {world_size}; make the product equal the number of "
            f"processes (dp_shard=-1 fills it in)"
        )
    return dims

def validate_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise :class:`ConfigError` if ``cfg`` cannot be split over ``tp`` ranks (heads, FFN, vocab)."""
    if tp < 1:
        raise ConfigError(f"parallel.tp={tp} must be >= 1")
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if hq % tp:
        raise ConfigError(
            f"model.num_attention_heads={hq} is not divisible by parallel.tp={tp}: each rank needs whole query "
            f"heads; choose parallel.tp among the divisors of {hq}"
        )
    if hkv % tp:
        replicated = math.lcm(hkv, tp)
        fix = (
            f"or convert the checkpoint with each KV head repeated {replicated // hkv} times "
            f"(model.num_key_value_heads={replicated}, same function, {replicated // hkv}x the KV cache)"
            if hq % replicated == 0 else "(KV-head replication cannot help: query heads are not a multiple of tp)"
        )
        raise ConfigError(
            f"model.num_key_value_heads={hkv} is not divisible by parallel.tp={tp}: each rank needs whole KV heads; "
            f"choose parallel.tp among the divisors of {hkv}, {fix}"
        )
    for kind in dict.fromkeys(cfg.ffn_types()):  # each FFN kind's own divisibility (sbtrain/models/ffn/)
        if kind not in FFN_TP_CHECKS:  # a check skipped silently would let a bad layout through
            raise RuntimeError(f"FFN kind {kind!r} is not registered: import sbtrain.models before validating a "
                               f"tensor-parallel layout")
        FFN_TP_CHECKS[kind](cfg, tp)
    if cfg.vocab_size % tp:
        padded = -(-cfg.vocab_size // tp) * tp
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={tp}: embeddings and lm_head are "
            f"split by vocabulary rows; pad the vocabulary to a multiple of tp (e.g. {padded}) or change parallel.tp"
        )


def validate_parallel(cfg: ParallelConfig, world_size: int, model: ModelConfig, trainer) -> ParallelDims:
    """Every layout error before anything is built, the trainer's own checks against the
    resolved data-parallel size included. ``trainer`` is the TrainerConfig."""
    if cfg.engine not in ENGINES:
        raise ConfigError(f"parallel.engine={cfg.engine!r} is unknown; use one of {ENGINES}")
    if cfg.deepspeed.accelerator not in ACCELERATORS:
        raise ConfigError(f"parallel.deepspeed.accelerator={cfg.deepspeed.accelerator!r} is unknown; use one of "
                          f"{ACCELERATORS}")
    if cfg.grad_sync not in GRAD_SYNC:
        raise ConfigError(f"parallel.grad_sync={cfg.grad_sync!r} is unknown; use one of {GRAD_SYNC}")
    if cfg.cp_linear not in CP_LINEAR:
        raise ConfigError(f"parallel.cp_linear={cfg.cp_linear!r} is unknown; use one of {CP_LINEAR}")
    for name in ("param_dtype", "reduce_dtype"):
        if getattr(cfg, name) not in PARAM_DTYPES:
            raise ConfigError(f"parallel.{name}={getattr(cfg, name)!r} is unknown; use one of {PARAM_DTYPES}")
    dims = resolve_dims(cfg, world_size)
    if dims.tp > 1:
        validate_tensor_parallel(model, dims.tp)
    if trainer.seq_len % (dims.cp * dims.tp):
        raise ConfigError(
            f"trainer.seq_len={trainer.seq_len} must be divisible by parallel.cp*tp = {dims.cp}*{dims.tp} (context "
            f"shards, then sequence-parallel shards of each); choose a multiple of {dims.cp * dims.tp}"
        )
    if dims.ep > 1:
        experts = model.moe.num_experts
        if not experts:
            raise ConfigError(f"parallel.ep={dims.ep} needs a Mixture-of-Experts model; {model.name} has no experts")
        if experts % dims.ep:
            raise ConfigError(
                f"parallel.ep={dims.ep} must divide the routed experts (model.moe.num_experts={experts}); "
                f"choose ep from its divisors"
            )
        if dims.dp_shard % dims.ep:
            raise ConfigError(
                f"parallel.ep={dims.ep} borrows its ranks from parallel.dp_shard={dims.dp_shard} and must divide it; "
                f"raise dp_shard (more processes) or lower ep"
            )
    if dims.tp > 1 and dims.ep > 1:
        raise ConfigError(
            f"parallel.tp={dims.tp} with parallel.ep={dims.ep} is not supported yet (experts would need tensor-"
            f"parallel sharding too); use ep with dp/cp, or tp without ep (MoE layers then run replicated)"
        )
    if cfg.engine == "deepspeed":
        from parallel.deepspeed_engine import validate_deepspeed

        if dims.dp_replicate > 1:
            raise ConfigError("parallel.engine=deepspeed has no replicate dimension; set parallel.dp_replicate=1 "
                              "and use dp_shard for the data-parallel degree")
        try:
            validate_deepspeed(cfg.deepspeed.zero_stage, tp=dims.tp, ep=dims.ep, cp=dims.cp,
                               offload_optimizer=cfg.deepspeed.offload_optimizer, precision=trainer.precision)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    trainer.validate(dims.dp)  # batch sizes against the data-parallel size (one check, one message)
    return dims


__all__ = ["DeepSpeedConfig", "ParallelConfig", "ParallelDims", "resolve_dims", "validate_parallel",
           "validate_tensor_parallel"]
