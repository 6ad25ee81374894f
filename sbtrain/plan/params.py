"""Per-rank parameter, gradient and optimizer bytes of a layout, from the model built on ``meta``.

Every parameter of the meta model is placed the way the training path places it, in its order
(``sbtrain.trainer.distributed.parallelize``): the model's tensor-parallel plan
(``sbtrain.models.parallelize``: which dim of which projection is split over ``tp``), expert
parallelism (``experts.*`` split along the expert dim over ``ep``), then FSDP2
(``parallel.fsdp.apply_fsdp``: one unit per block, experts on their own ``dp_shard/ep x cp`` mesh,
the rest in the root unit; each parameter's dim 0 chunked over the shard mesh). Sizes are those of
rank 0, which holds the largest chunk of every split (``torch.chunk`` semantics: ``ceil(n/k)``).

Nothing is allocated: the shapes come from ``build_model(cfg, device="meta")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from sbtrain.config.parallel import ParallelDims
from sbtrain.models.build import build_model
from sbtrain.models.ffn import FfnKind, layer_ffns

FP32 = 4
# The state AdamW keeps per parameter tensor besides exp_avg / exp_avg_sq: its ``step`` (an fp32
# scalar tensor when not capturable).
ADAM_STEP_BYTES = 4


@dataclass
class Group:
    """One FSDP unit: the root (embeddings, final norm, LM head), a block, or a block's experts."""

    name: str
    local: int = 0  # elements after TP / EP (what one all-gather rebuilds)
    rank: int = 0  # elements this rank keeps (after the FSDP chunking as well)
    tensors: int = 0
    sharded: bool = False  # FSDP shards it (else every rank holds ``local`` for good)
    linear_local: int = 0  # nn.Linear weight elements after TP: what bf16 autocast copies


@dataclass
class ParamPlan:
    root: Group
    blocks: list[Group]
    experts: list[Group | None]  # per block: its EP-sharded experts unit (None: part of the block)
    embed_rows: int = 0  # vocabulary rows of the embedding / LM head on this rank (TP-local)
    total_elements: int = 0  # the whole model, unsharded (for DeepSpeed's flat partitions)
    tensors: int = 0
    largest_tensor: int = 0  # elements of this rank's largest parameter chunk
    expert_padding: int = 0  # elements of expert chunks that are FSDP padding (rows beyond the experts)
    groups: list[Group] = field(default_factory=list)

    def elements(self) -> int:
        return sum(g.rank for g in self.groups)


def tp_split_dim(name: str, ffn: FfnKind | None) -> int | None:
    """The dim the model's TP plan shards ``name`` along (None: replicated); ``ffn`` is the FFN kind of
    the parameter's layer. Mirrors ``sbtrain.models.parallelize.apply_tensor_parallel`` (the test
    suite checks it against it)."""
    leaf = name.rsplit(".", 1)[-1]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0  # vocabulary rows
    if ".mlp." in name and ffn is not None:
        return ffn.tp_split_dim(name.split(".mlp.", 1)[1])  # the FFN kind's own plan
    if any(f"{p}.{leaf}" in name for p in ("q_proj", "k_proj", "v_proj")):
        return 0  # column-parallel: output features (weight rows, bias)
    if name.endswith("o_proj.weight"):
        return 1  # row-parallel: input features
    if "gk_proj.1." in name:
        return 0  # the gate's second stage is column-parallel per KV head; the first is replicated
    if leaf in ("sink_k", "sink_v"):
        return 1  # [S, Hkv, D]: by KV head
    if leaf in ("beta_attn", "beta_linear"):
        return 0  # by channel
    return None  # norms, the gate's first stage


def _chunk(n: int, k: int) -> int:
    return math.ceil(n / k) if k > 1 else n


def local_shape(name: str, shape: tuple[int, ...], ffn: FfnKind | None, dims: ParallelDims) -> tuple[int, ...]:
    shape = list(shape)
    dim = tp_split_dim(name, ffn) if dims.tp > 1 else None
    if dim is not None:
        shape[dim] = _chunk(shape[dim], dims.tp)
    if dims.ep > 1 and ".experts." in name:
        shape[0] = _chunk(shape[0], dims.ep)
    return tuple(shape)


def shard_sizes(dims: ParallelDims, engine: str) -> tuple[int, int]:
    """(dense, expert) FSDP shard degrees; 1 = not sharded. Mirrors ``parallel.mesh.build_mesh``:
    dense parameters over dp_shard x cp, EP-sharded experts over dp_shard/ep x cp (replicated
    over dp_replicate, HSDP)."""
    if engine != "fsdp" or dims.world_size == 1:
        return 1, 1
    dense = dims.dp_shard * dims.cp
    expert = (dims.dp_shard // dims.ep) * dims.cp if dims.ep > 1 else dense
    return dense, expert


def _numel(shape) -> int:
    return math.prod(shape)


def plan_params(model_cfg, dims: ParallelDims, engine: str = "fsdp"):
    """(ParamPlan, meta model) for ``model_cfg`` under ``dims``."""
    model = build_model(model_cfg, device="meta")
    cfg = model.config
    ffns = layer_ffns(cfg)
    dense_shard, expert_shard = shard_sizes(dims, engine)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    root = Group("root", sharded=dense_shard > 1)
    blocks = [Group(f"layers.{i}", sharded=dense_shard > 1) for i in range(cfg.num_layers)]
    experts: list[Group | None] = [None] * cfg.num_layers
    plan = ParamPlan(root, blocks, experts)
    for name, p in model.named_parameters():  # tied weights appear once
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        shape = local_shape(name, tuple(p.shape), None if layer is None else ffns[layer], dims)
        group = root if layer is None else blocks[layer]
        shard = dense_shard
        if ".experts." in name and dims.ep > 1:
            # EP-sharded experts: their own unit on the expert mesh (left out of FSDP when that
            # mesh is one rank: they then stay whole on this rank).
            shard = expert_shard
            if experts[layer] is None:
                experts[layer] = Group(f"layers.{layer}.experts", sharded=expert_shard > 1)
            group = experts[layer]
        group.local += _numel(shape)
        rank = _chunk(shape[0], shard) * _numel(shape[1:]) if shape else 1
        if ".experts." in name and shard > shape[0]:
            # FSDP2 chunks dim 0 and pads every rank to the largest chunk: with fewer local experts
            # than expert-mesh ranks each rank stores a whole expert, most of them padding only.
            plan.expert_padding += rank * (shard - shape[0]) // shard
        group.rank += rank
        plan.largest_tensor = max(plan.largest_tensor, rank)
        group.tensors += 1
        if id(p) in linear_weights:
            group.linear_local += _numel(shape)
        plan.total_elements += p.numel()
        plan.tensors += 1
    plan.embed_rows = _chunk(cfg.vocab_size, dims.tp)
    plan.groups = [root, *blocks, *[e for e in experts if e is not None]]
    return plan, model


@dataclass
class StateBytes:
    params: int  # the parameters this rank holds between steps (fp32: they are the master copy)
    grads: int  # gradients this rank holds after backward
    optimizer: int  # AdamW moments (+ DeepSpeed's fp32 master partition)
    grad_buffers: int = 0  # DeepSpeed ZeRO-2 reduction buckets (held for the whole run)
    notes: list[str] = field(default_factory=list)


def state_bytes(plan: ParamPlan, dims: ParallelDims, pcfg, precision: str, accumulating: bool,
                device: str = "cuda") -> StateBytes:
    """Bytes per rank of parameters, gradients and AdamW state (2 fp32 moments per element).

    FSDP: parameters stay fp32 (the master copy; ``param_dtype`` only sets the gathered copy), each
    rank keeps its chunk of every sharded tensor, gradients come back reduce-scattered into the same
    chunks. With gradient accumulation and ``grad_sync=per_step`` FSDP keeps every unit's
    *unsharded* gradient (in ``param_dtype``) across the micro batches instead.
    DeepSpeed: the ZeRO paper's accounting over dp x cp ranks, see :func:`deepspeed_bytes`."""
    if pcfg.engine == "deepspeed" and dims.world_size > 1:
        return deepspeed_bytes(plan, dims, pcfg, precision, device)
    elements = plan.elements()
    grads = elements * FP32
    notes = []
    if accumulating and pcfg.grad_sync == "per_step" and any(g.sharded for g in plan.groups):
        gather = 2 if pcfg.param_dtype == "bf16" else FP32
        grads = sum((g.local * gather) if g.sharded else g.rank * FP32 for g in plan.groups)
        notes.append("gradient accumulation with parallel.grad_sync=per_step: unsharded gradients of every "
                     "FSDP unit are held across micro batches (per_micro_batch keeps them sharded)")
    return StateBytes(elements * FP32, grads, elements * 2 * FP32 + plan.tensors * ADAM_STEP_BYTES, notes=notes)


# DeepSpeed's reduce bucket: reduce_bucket_size elements (5e8 by default; the engine sets none).
DS_REDUCE_BUCKET = 500_000_000


def deepspeed_bytes(plan: ParamPlan, dims: ParallelDims, pcfg, precision: str, device: str = "cuda") -> StateBytes:
    """ZeRO over N = dp x cp ranks (DeepSpeed reduces over the whole world here), Psi elements:
    module parameters Psi x (2 bf16 | 4 fp32), or Psi/N at stage 3; an fp32 master partition
    4 Psi/N (ZeRO keeps one even in fp32 training); AdamW moments 8 Psi/N; gradients Psi x dtype
    at stage 1, Psi/N x dtype at 2 and 3; at stages 1 and 2 one contiguous-gradient bucket of
    reduce_bucket_size elements (``overlap_comm`` is off there, so one, not two), allocated
    whole on a GPU, resident only where written (at most Psi elements) on the CPU. Checked against
    one measured layout (ZeRO-2, fp32, RESULTS.md), whose peak is the LM-head loss's."""
    psi, n, stage = plan.total_elements, dims.world_size, pcfg.deepspeed.zero_stage
    width = 2 if precision == "bf16" else FP32
    part = math.ceil(psi / n)
    params = (part if stage == 3 else psi) * width
    master = part * FP32
    grads = (psi if stage == 1 else part) * width
    buckets = 0 if stage == 3 else (min(DS_REDUCE_BUCKET, psi) if device == "cpu" else DS_REDUCE_BUCKET) * (
        FP32 if stage == 1 else width)  # ZeRO-1 stages fp32, ZeRO-2 the gradient dtype
    optimizer = 0 if pcfg.deepspeed.offload_optimizer else master + 2 * part * FP32
    notes = [(f"deepspeed ZeRO-{stage}: the ZeRO paper's accounting; its buckets and partitions were measured "
              "at one layout only (ZeRO-2, fp32)")]
    if stage == 3:
        notes.append("ZeRO-3's gathered parameters and prefetch buckets during forward / backward are not modelled")
    if pcfg.deepspeed.offload_optimizer:
        notes.append("optimizer state and fp32 master offloaded to host memory (not counted)")
    return StateBytes(params, grads, optimizer, buckets, notes)


__all__ = ["Group", "ParamPlan", "StateBytes", "deepspeed_bytes", "local_shape", "plan_params", "shard_sizes",
           "state_bytes", "tp_split_dim"]
