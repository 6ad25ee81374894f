"""Cut a :class:`CausalLM` into pipeline stages (the model side of ``parallel.pipeline``).

``build_stage_modules(model, split, stage_ids)`` returns one :class:`CausalLMStage` per global
stage this rank holds. Stage ``s`` owns the blocks ``sum(split[:s]) .. sum(split[:s+1]) - 1``;
the first stage also owns the embedding, the last the final norm, the LM head and its loss. The
kept submodules are the model's own (shared, not copied) under the model's own names
(``model.embed_tokens.weight``, ``model.layers.5.mlp...``, ``lm_head.weight``), so a stage's
``state_dict`` is a slice of the full model's and a DCP checkpoint of a pipeline run maps onto
the unsplit model.

A stage's forward takes and returns tensors only (``torch.distributed.pipelining`` sends its
positional outputs to the next stage):

- first stage ``(input_ids) -> (hidden, aux)``; middle ``(hidden, aux) -> (hidden, aux)``; last
  ``(hidden, aux) -> (loss_sum, aux)`` (``loss_sum``: the fp32 Σ token losses of the micro
  batch, as ``CausalLM.forward``; ``aux``: the MoE aux + z losses summed over all layers so far,
  in layer order, so the value and its gradient path equal the unsplit model's);
- keyword metadata, handed by the schedule to every stage of the micro batch locally (never
  sent): ``position_ids [B,T]``, ``cu_seqlens`` (document bounds, padded with -1 to one length
  per step, ``[1, L]`` per micro batch: their count varies per batch), ``labels [B,T]``. Build
  them with :func:`pipeline_batch`, which computes positions exactly as ``CausalLM.hidden_states``.

Tied embeddings: the tie is kept when the first and the last stage live on the same rank (V
placements: ZBV, DualPipeV; then both local stages hold the one parameter and its gradients add
up in it); otherwise refused (:func:`validate_pipeline_model`), since the copy on the other rank
would need its gradient all-reduced, which is not implemented.

Not supported under pipeline parallelism here: context parallelism (the stages build no
``ContextParallel``), tensor parallelism, decode caches, ``return_logits`` consumers
(distillation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from parallel import pipeline as pp_schedules
from sbtrain.config.model import ModelConfig
from sbtrain.models.layers import Rotary, default_position_ids
from sbtrain.models.mixers.base import MixerInputs
from sbtrain.models.model import CausalLM


def validate_pipeline_model(cfg: ModelConfig, schedule: str, pp: int, n_microbatches: int,
                            split: Sequence[int] | None = None, virtual_stages: int | None = None) -> list[int]:
    """Every check of a pipeline layout for this model, before it is built; returns the split
    (the given one, or an even one)."""
    split = pp_schedules.validate_pipeline(schedule, pp, n_microbatches, cfg.num_layers, split, virtual_stages)
    if cfg.tie_embeddings:
        last = pp_schedules.num_stages(schedule, pp, virtual_stages) - 1
        first_rank = pp_schedules.stage_rank(schedule, pp, 0, virtual_stages)
        last_rank = pp_schedules.stage_rank(schedule, pp, last, virtual_stages)
        if first_rank != last_rank:
            raise ValueError(
                f"pipeline: tie_embeddings=true needs the embedding (stage 0, pp rank {first_rank}) and the LM head "
                f"(stage {last}, pp rank {last_rank}) on one rank; schedule {schedule} puts them apart. Use a V "
                f"schedule (ZBV or DualPipeV: both on pp rank 0) or model.tie_embeddings=false")
    return split


def stage_layer_ranges(split: Sequence[int]) -> list[range]:
    bounds = [0]
    for n in split:
        bounds.append(bounds[-1] + int(n))
    return [range(bounds[s], bounds[s + 1]) for s in range(len(split))]


class CausalLMStage(nn.Module):
    """Global stage ``stage`` of ``num_stages`` of a :class:`CausalLM` (see the module doc)."""

    def __init__(self, model: CausalLM, layers: range, stage: int, num_stages: int):
        super().__init__()
        self.config: ModelConfig = model.config
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.layer_ids = list(layers)
        # The model's names: model.embed_tokens / model.layers.{i} / model.norm / lm_head.
        self.model = nn.Module()
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in self.layer_ids})
        if self.is_last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
            self.head_loss = model.head_loss
        self.init_seed = getattr(model, "init_seed", 0)

    def forward(self, *inputs: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        cfg = self.config
        if self.is_first:
            (input_ids,) = inputs
            x = self.model.embed_tokens(input_ids)
            aux = x.new_zeros((), dtype=torch.float32)
        else:
            x, aux = inputs
        B, T = x.shape[:2]
        cu = unpad_cu_seqlens(cu_seqlens) if cfg.document_masking else None
        if cu is not None and (B != 1 or int(cu[-1]) != T):
            raise ValueError(f"cu_seqlens needs a packed batch (B=1) ending at T={T}; got B={B}, "
                             f"cu_seqlens[-1]={int(cu[-1])}")
        if position_ids is None:
            position_ids = default_position_ids(B, T, cu, x.device)
        rotary = Rotary(position_ids, cfg.resolved_head_dim, cfg.rope_base, cfg.rope_yarn)
        for layer in self.model.layers.values():
            x, layer_aux = layer(x, MixerInputs(rotary, cu))
            aux = aux + layer_aux
        if not self.is_last:
            return x, aux
        if labels is None:
            raise ValueError(f"pipeline stage {self.stage} (the last) needs labels")
        hidden = self.model.norm(x)
        loss_sum = self.head_loss(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, labels.reshape(-1))
        return loss_sum, aux


def build_stage_modules(model: CausalLM, split: Sequence[int], stage_ids: Sequence[int]) -> list[CausalLMStage]:
    """The stage modules for the global stages ``stage_ids`` (this rank's, from
    ``parallel.pipeline.stage_ids``) of a cut by ``split`` (layers per global stage)."""
    split = pp_schedules.validate_split(split, model.config.num_layers, len(split))
    ranges = stage_layer_ranges(split)
    ids = [int(s) for s in stage_ids]
    if any(not 0 <= s < len(split) for s in ids):
        raise ValueError(f"pipeline: stage ids {ids} outside 0..{len(split) - 1} (split {split})")
    last = len(split) - 1
    if model.config.tie_embeddings and (0 in ids) != (last in ids):
        raise ValueError(f"pipeline: tie_embeddings=true but this rank holds stages {ids}: the embedding (stage 0) "
                         f"and the LM head (stage {last}) must be on one rank (a V schedule), or untie them")
    return [CausalLMStage(model, ranges[s], s, len(split)) for s in ids]


def pad_cu_seqlens(cu_list: Sequence[torch.Tensor | None], seq_len: int, device=None) -> torch.Tensor:
    """``[M, L]`` int32: each micro batch's document bounds padded with -1 to the longest (a
    missing one is the single document ``[0, seq_len]``), so the schedule can cut them into
    micro batches like every other input."""
    rows = [torch.tensor([0, seq_len], dtype=torch.int32) if c is None else c.reshape(-1).to(torch.int32).cpu()
            for c in cu_list]
    width = max(r.numel() for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
    return out.to(device) if device is not None else out


def unpad_cu_seqlens(cu: torch.Tensor | None) -> torch.Tensor | None:
    if cu is None:
        return None
    cu = cu.reshape(-1)
    return cu[cu >= 0]


def pipeline_batch(micro_batches: Sequence[dict], cfg: ModelConfig, device=None) -> dict:
    """A rank's micro batches (the trainer's dicts: ``input_ids``, ``labels``, optional
    ``position_ids`` / ``cu_seqlens``) stacked for ``PipelineRuntime.step``: ``args`` (the first
    stage's inputs), ``kwargs`` (every stage's metadata), ``target`` and the target-token count."""
    if not micro_batches:
        raise ValueError("pipeline: no micro batches")
    shapes = {tuple(mb["input_ids"].shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"pipeline: every micro batch needs the same [B, T] shape (the schedule sends fixed "
                         f"shapes); got {sorted(shapes)}")
    B, T = shapes.pop()
    masking = cfg.document_masking and any(mb.get("cu_seqlens") is not None for mb in micro_batches)
    if masking and B != 1:
        raise ValueError(f"cu_seqlens needs packed micro batches (B=1); got B={B}")
    pos = []
    for mb in micro_batches:
        if mb.get("position_ids") is not None:
            pos.append(mb["position_ids"])
        else:
            cu = mb.get("cu_seqlens") if cfg.document_masking else None
            pos.append(default_position_ids(B, T, cu, mb["input_ids"].device))
    kwargs = {"position_ids": torch.cat(pos).to(device),
              "labels": torch.cat([mb["labels"] for mb in micro_batches]).to(device)}
    if masking:
        kwargs["cu_seqlens"] = pad_cu_seqlens([mb.get("cu_seqlens") for mb in micro_batches], T, device)
    ids = torch.cat([mb["input_ids"] for mb in micro_batches]).to(device)
    return {"args": (ids,), "kwargs": kwargs, "target": kwargs["labels"],
            "num_tokens": int((kwargs["labels"] != -100).sum())}


__all__ = ["CausalLMStage", "build_stage_modules", "pad_cu_seqlens", "pipeline_batch", "stage_layer_ranges",
           "unpad_cu_seqlens", "validate_pipeline_model"]
