"""Tensor parallelism + Megatron-style sequence parallelism for every model of the zoo, as DTensor
``parallelize_module`` plans (docs/DESIGN_NOTES.md §3: one plan per model, living with the model).

Layout over the ``tp`` mesh (size P), with ``sequence_parallel=True``:

- the residual stream between mixers / FFNs is sharded along the sequence (``Shard(1)``); the
  RMSNorms run on their shard (``SequenceParallel``) and the sequence is all-gathered at the input
  of each mixer / FFN (``PrepareModuleInput``), reduce-scattered at its row-parallel output;
- embeddings: ``RowwiseParallel`` (vocabulary rows sharded, output ``Shard(1)``);
- attention / GLA / hybrid: q/k/v ``ColwiseParallel`` (whole heads per rank: Hq/P query heads,
  Hkv/P KV heads, so GQA groups never straddle ranks), o_proj ``RowwiseParallel``; the cores
  (``ops.attention``, ``ops.gla``) see plain local tensors with fewer heads. GLA's gate: the
  rank-``gate_rank`` first Linear replicated, the second column-parallel (per KV head), the
  per-head output norm replicated. Hybrid: sink k/v ``[S,Hkv,D]`` sharded by KV head, betas by
  channel, per-head norms replicated, the separate-branch ``linear_*`` projections like q/k/v/o;
- FFNs: each FFN kind's own plan (``FfnKind.tensor_parallel``, ``sbtrain/models/ffn/``): the dense
  SwiGLU gate/up ``ColwiseParallel``, down ``RowwiseParallel``; the MoE runs *replicated* on the
  gathered tokens (every rank doing the whole layer: expert parallelism is its efficient path);
- final norm ``SequenceParallel``, its output gathered to the full local sequence by a hook
  (:func:`gather_sequence`); lm_head ``ColwiseParallel`` (vocabulary rows sharded), and the model's
  ``head_loss`` replaced by :class:`VocabParallelHeadLoss`: the chunked cross-entropy on this rank's
  head rows (:func:`vocab_parallel_head`); full logits are never formed unless ``return_logits``.
  ``CausalLM`` itself calls nothing of this.

Without sequence parallelism the residual stream is replicated and the norms compute replicated.

What comes out: every parameter is a DTensor on ``tp_mesh``; its gradient has the parameter's own
placement (DTensor gives replicated parameters used on sharded activations partial-sum grads and
the embedding a replicated full-vocabulary grad; a post-accumulate hook redistributes them, so
optimizers and grad-norm clipping see grads placed like their parameters). ``CausalLMOutput.loss_sum``, ``num_tokens`` and ``aux_loss`` are plain
tensors, identical on every rank of the TP group: the trainer must not sum them over it.
Sequence lengths must be multiples of P with sequence parallelism (checked at each forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from operators import ops
from parallel import comm_stats
from sbtrain.config.parallel import validate_tensor_parallel
from sbtrain.models.ffn import ffn_kind
from sbtrain.models.mixers import kind_of
from sbtrain.models.tp_styles import ReplicatedCompute, ShardParameters


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> nn.Module:
    """Parallelize a :class:`sbtrain.models.CausalLM` in place over the 1-D ``tp_mesh``.

    Every rank must hold the same initial weights (``distribute_tensor`` scatters rank 0's)."""
    cfg = model.config
    tp = tp_mesh.size()
    validate_tensor_parallel(cfg, tp)
    residual = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel() if sequence_parallel else ReplicatedCompute()
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "model.norm": norm_style,
        # Only used for return_logits (the loss takes the local rows directly): full logits out.
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    })
    for block in model.model.layers:
        kind_of(block.self_attn).tensor_parallel(block.self_attn, tp_mesh, residual)  # the kind's own plan
        ffn_kind(block.ffn_kind).tensor_parallel(block.mlp, tp_mesh, residual)  # the FFN kind's own plan
        plan = {"input_layernorm": norm_style, "post_attention_layernorm": norm_style}
        parallelize_module(block, tp_mesh, plan)
    if cfg.tie_embeddings:  # both styles shard the vocabulary rows: one DTensor serves both
        model.lm_head.weight = model.model.embed_tokens.weight
    # The head sees the whole sequence (plain local tensors) and computes its loss on local vocab rows.
    model.model.norm.register_forward_hook(lambda module, args, output: gather_sequence(output))
    model.head_loss = VocabParallelHeadLoss()
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            raise TypeError(f"parameter {name} was left out of the tensor-parallel plan; add it in {__name__}")
        param.register_post_accumulate_grad_hook(_grad_to_param_placement)
    if sequence_parallel:
        model.register_forward_pre_hook(_check_sequence_divisible(tp), with_kwargs=True)
    return model


def _grad_to_param_placement(param: DTensor) -> None:
    """Give the grad its parameter's placement. Replicated parameters used on sharded activations
    (SP norms, GLA's gate, per-head norms) accumulate partial sums: all-reduced here. The
    embedding's backward yields a replicated full-vocabulary grad: sliced here (no communication)."""
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        if any(p.is_partial() for p in grad.placements):
            comm_stats.record("tp_grad_allreduce", grad.to_local())
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def _check_sequence_divisible(tp: int):
    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        if ids.shape[1] % tp:
            raise ValueError(f"sequence length {ids.shape[1]} is not divisible by parallel.tp={tp} (sequence "
                             f"parallelism shards it); choose trainer.seq_len as a multiple of tp")
    return hook


def gather_sequence(hidden: torch.Tensor) -> torch.Tensor:
    """The full-sequence local tensor of a sequence-sharded DTensor (identity for plain tensors).

    Its backward takes the replicated gradient (which the vocabulary-parallel cross-entropy
    returns already all-reduced) and keeps this rank's slice: no second reduction."""
    if isinstance(hidden, DTensor):
        return hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    return hidden


@dataclass
class VocabShard:
    weight: torch.Tensor  # this rank's rows of the head, a plain tensor (differentiable view)
    group: object  # the process group of the TP mesh
    vocab_start: int  # global index of the first row


class VocabParallelHeadLoss(nn.Module):
    """``CausalLM.head_loss`` under tensor parallelism: the chunked cross-entropy over this rank's
    vocabulary rows of a ``Shard(0)`` head; the hidden-state gradient it returns is already
    all-reduced over the TP group. An unsharded head (a plain tensor) takes the plain loss."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shard = vocab_parallel_head(weight)
        if shard is None:
            return ops.linear_cross_entropy(hidden, weight, labels)
        return ops.linear_cross_entropy(hidden, shard.weight, labels, group=shard.group, vocab_start=shard.vocab_start)


def vocab_parallel_head(weight: torch.Tensor) -> VocabShard | None:
    """This rank's vocabulary rows of a ``Shard(0)`` lm_head weight, or None if it is not sharded."""
    if not isinstance(weight, DTensor):
        return None
    if tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"lm_head weight placements {weight.placements} are not (Shard(0),): only a "
                         f"vocabulary-row-sharded head on a 1-D TP mesh is supported")
    mesh = weight.device_mesh
    rows_per_rank = -(-weight.shape[0] // mesh.size())  # torch.chunk semantics, as distribute_tensor
    return VocabShard(weight.to_local(), mesh.get_group(), mesh.get_local_rank() * rows_per_rank)


__all__ = [
    "ReplicatedCompute", "ShardParameters", "VocabParallelHeadLoss", "VocabShard", "apply_tensor_parallel",
    "gather_sequence", "validate_tensor_parallel", "vocab_parallel_head",
]
