"""The per-rank memory of one training step, predicted without allocating anything.

:func:`plan_memory` validates the layout exactly as training does (``validate_parallel``), builds
the model on the meta device for the parameter walk (:mod:`sbtrain.plan.params`), sizes every
block's saved activations (:mod:`sbtrain.plan.activations`), then walks one optimizer step of the
last micro batch as a timeline of moments:

  root all-gather  FSDP's first gather: the flat all-gather output beside the copied-out root
  forward end    the LM head's chunked cross-entropy runs over everything the blocks kept
  head backward  the head's gradient products appear
  block i bwd    blocks L-1 .. 0: block i's saved set (recomputed when checkpointed) and its
                 backward workspace, the kept inputs of blocks < i, the gradients of blocks > i
  embedding bwd  every gradient, the embedding's dense gradient, the root unit's reduce-scatter
  optimizer      every gradient, AdamW's temporaries

FSDP2 as ``parallel.fsdp`` applies it (observed on gloo, torch 2.13): the root unit (embeddings,
final norm, LM head) is gathered through the whole forward and again through the whole backward,
its gradients stay unsharded until the end of backward; one block unit is gathered at a time, the
last one kept from its forward to its backward; a unit's unsharded gradients live until its
reduce-scatter. The peak is the largest moment; ``at_peak`` is its composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from omegaconf import DictConfig, OmegaConf

from sbtrain.config.parallel import ParallelConfig, resolve_dims, validate_parallel
from sbtrain.config.train import TrainerConfig
from sbtrain.models.build import to_model_config
from sbtrain.models.ffn import ffn_kind
from sbtrain.models.mixers import layer_mixers
from sbtrain.plan.activations import FP32, Shapes, block_activations, head_saved, per_forward
from sbtrain.plan.params import plan_params, state_bytes

ROWS = ("params", "grads", "optimizer", "activations", "transient")
GIB = 1 << 30


@dataclass
class Moment:
    name: str
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    transient: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, r) for r in ROWS)


@dataclass
class MemoryPlan:
    moments: list[Moment]
    peak: Moment
    held: dict  # each row's largest value over the step (params / grads / optimizer: their steady size)
    layout: dict
    state: dict  # steady bytes of params, grads (after backward) and optimizer state
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        gib = {r: round(getattr(self.peak, r) / GIB, 3) for r in ROWS}
        gib["total"] = round(self.peak.total / GIB, 3)
        held = {r: round(self.held[r] / GIB, 3) for r in ROWS}
        held["total"] = round(sum(self.held[r] for r in ROWS) / GIB, 3)
        return {**self.layout, "per_rank_gib": gib, "peak_moment": self.peak.name, "held_gib": held,
                "peak_bytes": self.peak.total, "bytes": {r: getattr(self.peak, r) for r in ROWS},
                "state_bytes": self.state, "notes": self.notes}


def _plain(node, schema):
    """A dataclass instance from a Hydra node, a dict or the dataclass itself."""
    if isinstance(node, schema):
        return node
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is schema:
        return OmegaConf.to_object(node)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def checkpointed(mode: str, index: int) -> bool:
    """``parallel.activation_checkpoint``: full wraps every block, selective every other (even) one."""
    return mode == "full" or (mode == "selective" and index % 2 == 0)


def plan_memory(model, world: int, parallel, trainer, device: str = "cuda") -> MemoryPlan:
    """Predict the per-rank peak of one training step. ``model``/``parallel``/``trainer`` are the
    training recipe's sections (dataclasses, Hydra nodes or dicts); trainer.global_batch_size=-1
    means one micro batch per data-parallel rank."""
    mcfg = to_model_config(model)
    pcfg, tcfg = _plain(parallel, ParallelConfig), _plain(trainer, TrainerConfig)
    if tcfg.global_batch_size == -1:  # a copy: the caller's config stays as given
        tcfg = replace(tcfg, global_batch_size=tcfg.micro_batch_size * resolve_dims(pcfg, world).dp)
    dims = validate_parallel(pcfg, world, mcfg, tcfg)  # the training run's checks, before any build
    accumulating = tcfg.global_batch_size // (tcfg.micro_batch_size * dims.dp) > 1
    bf16 = tcfg.precision == "bf16"
    deepspeed = pcfg.engine == "deepspeed" and world > 1
    plan, _ = plan_params(mcfg, dims, pcfg.engine)
    state = state_bytes(plan, dims, pcfg, tcfg.precision, accumulating, device)
    fsdp = plan.root.sharded
    gather = 2 if pcfg.param_dtype == "bf16" else FP32  # FSDP's gathered (and unsharded-grad) width
    hd = mcfg.resolved_head_dim
    s = Shapes(B=tcfg.micro_batch_size, T=tcfg.seq_len // dims.cp, cp=dims.cp, tp=dims.tp, d=mcfg.hidden_size,
               hq=mcfg.num_attention_heads // dims.tp, hkv=mcfg.num_key_value_heads // dims.tp, D=hd,
               inter=mcfg.intermediate_size // dims.tp, a=2 if bf16 else FP32, window=mcfg.sliding_window,
               sinks=mcfg.hybrid.num_sink_tokens, gate_rank=mcfg.gla.gate_rank, vocab_rows=plan.embed_rows,
               device=device)
    # bf16 autocast caches a bf16 copy of each Linear weight it casts, and the matmul saves it. No
    # copy when the weights already are bf16 (FSDP param_dtype=bf16, DeepSpeed's bf16 module).
    copies = bf16 and not deepspeed and not (fsdp and pcfg.param_dtype == "bf16")
    blocks = [block_activations(s, mcfg, i, plan.blocks[i].linear_local, copies) for i in range(mcfg.num_layers)]
    mode = tcfg.activation_checkpointing
    keep = [b.input if checkpointed(mode, i) else b.saved for i, b in enumerate(blocks)]
    rotary = any(kind.uses_rope for kind in layer_mixers(mcfg))
    fwd = per_forward(s, rotary)
    head, head_fwd, head_bwd = head_saved(s, device, bf16)

    # Gradients per unit once reduced (sharded) and FSDP's unsharded working copies.
    def unit_grad(i: int) -> int:
        experts = plan.experts[i]
        return (plan.blocks[i].rank + (experts.rank if experts else 0)) * FP32

    def unit_gathered(i: int) -> int:
        units = [u for u in (plan.blocks[i], plan.experts[i]) if u is not None and u.sharded]
        return sum(u.local for u in units) * gather

    embed = plan.embed_rows * mcfg.hidden_size
    root_gathered = plan.root.local * gather if fsdp else 0
    root_grads_unsharded = (plan.root.local - (0 if mcfg.tie_embeddings else embed)) * gather if fsdp else 0
    last = len(blocks) - 1
    base = {"params": state.params, "optimizer": state.optimizer}
    held_grads = state.grads + state.grad_buffers
    # Autocast's cast cache holds every bf16 weight copy until the forward (LM-head loss included)
    # returns, checkpointed blocks too; the other blocks' copies are in their saved set already.
    cache = sum(b.weight_copies for i, b in enumerate(blocks) if checkpointed(mode, i))
    moments = [Moment("root all-gather", **base, grads=held_grads if accumulating else 0, activations=fwd,
                      transient=2 * root_gathered),  # the flat all-gather output beside the copied-out params
               Moment("forward end (LM-head loss)", **base, grads=held_grads if accumulating else 0,
                      activations=sum(keep) + fwd + head,
                      transient=head_fwd + cache + root_gathered + (unit_gathered(last) if fsdp else 0)),
               Moment("head backward", **base, grads=held_grads if accumulating else 0,
                      activations=sum(keep) + fwd + head,
                      transient=head_bwd + root_gathered + (unit_gathered(last) if fsdp else 0))]
    reduce_width = 2 if pcfg.reduce_dtype == "bf16" else FP32

    def in_flight(i: int) -> int:  # FSDP2 keeps the previous unit's reduce-scatter input alive
        return unit_gathered(i) // gather * reduce_width if fsdp and i <= last else 0

    for i in range(last, -1, -1):
        done = held_grads if accumulating else sum(unit_grad(j) for j in range(i + 1, last + 1)) + (
            0 if fsdp else (plan.root.rank - embed) * FP32)
        fsdp_now = root_gathered + root_grads_unsharded + 2 * unit_gathered(i) + in_flight(i + 1) if fsdp else 0
        moments.append(Moment(f"block {i} backward ({blocks[i].kind}{', checkpointed' if checkpointed(mode, i) else ''})",
                              **base, grads=done, activations=sum(keep[:i]) + fwd + blocks[i].saved,
                              transient=blocks[i].workspace + fsdp_now))
    # The embedding's dense gradient (under TP the full vocabulary, sliced afterwards); under FSDP
    # the root's gathered parameters and unsharded gradients, then (parameters resharded) its
    # reduce-scatter input beside the unsharded gradients.
    embed_grad = (mcfg.vocab_size if dims.tp > 1 else plan.embed_rows) * mcfg.hidden_size * FP32
    if fsdp:
        # The reduce-scatter's input (the unsharded gradients are freed once copied in) and output;
        # gloo (the CPU) also copies the input inside the collective (measured), NCCL does not.
        rs_input = plan.root.local * reduce_width
        reduce_root = rs_input * (2 if device == "cpu" else 1) + plan.root.rank * reduce_width + in_flight(0)
        embed_now = max(root_gathered + root_grads_unsharded + embed_grad, reduce_root)
        grads_now = held_grads - plan.root.rank * FP32
    else:
        embed_now, grads_now = embed_grad, held_grads - embed * FP32
    moments.append(Moment("embedding backward", **base, grads=grads_now, activations=fwd, transient=embed_now))
    largest = max(plan.largest_tensor, 1)
    step_work = plan.elements() * FP32 if device == "cuda" else 2 * largest * FP32
    moments.append(Moment("optimizer step", **base, grads=held_grads, transient=step_work))
    peak = max(moments, key=lambda m: m.total)
    held = {r: max(getattr(m, r) for m in moments) for r in ROWS}
    layout = {"model": mcfg.name, "world": world, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard,
              "cp": dims.cp, "tp": dims.tp, "ep": dims.ep, "engine": pcfg.engine, "seq_len": tcfg.seq_len,
              "micro_batch_size": tcfg.micro_batch_size, "grad_accumulation": tcfg.global_batch_size
              // (tcfg.micro_batch_size * dims.dp), "precision": tcfg.precision, "activation_checkpointing": mode,
              "param_dtype": pcfg.param_dtype, "device": device}
    if pcfg.engine == "deepspeed":
        layout["zero_stage"] = pcfg.deepspeed.zero_stage
    notes = list(state.notes)
    if copies:
        notes.append("bf16 autocast over fp32 weights: every Linear's bf16 weight copy is kept, saved for backward "
                     "or, in checkpointed blocks, by autocast's cast cache until the forward ends "
                     f"({cache / GIB:.2f} GiB here; parallel.param_dtype=bf16 avoids it under FSDP)")
    if device == "cuda":
        notes.append("not counted: the CUDA context, NCCL buffers, cuBLAS workspaces and the caching allocator's "
                     "fragmentation (compare with torch.cuda.max_memory_allocated); CUDA kernel terms (fla GLA, "
                     "SDPA) are read from their code, the CPU ones measured (benchmarks/plan_vs_measured.py)")
    if plan.expert_padding:
        notes.append(f"expert FSDP over more ranks than local experts: FSDP2 pads dim 0, so every rank stores whole "
                     f"experts; on average {plan.expert_padding * FP32 / GIB:.2f} GiB of this rank's parameters (and as much "
                     "of its gradients) is padding (TorchTitan shards experts on dim 1 then; parallel.fsdp does not yet)")
    for ffn in dict.fromkeys(b.ffn for b in blocks):  # each FFN kind present states its own assumption
        note = ffn_kind(ffn).plan_note(mcfg)
        if note:
            notes.append(note)
    steady = {"params": state.params, "grads": state.grads, "optimizer": state.optimizer}
    return MemoryPlan(moments, peak, held, layout, steady, notes)


def format_table(result: MemoryPlan) -> str:
    """Rows params .. total in GiB per rank: what each holds at its largest during the step, and the
    composition of the peak moment (whose total is the prediction)."""
    lines = [f"{'per rank (GiB)':<14} {'held':>10} {'at peak':>10}"]
    for r in ROWS:
        lines.append(f"{r:<14} {result.held[r] / GIB:>10.2f} {getattr(result.peak, r) / GIB:>10.2f}")
    lines.append(f"{'total':<14} {sum(result.held.values()) / GIB:>10.2f} {result.peak.total / GIB:>10.2f}")
    lines.append(f"peak at: {result.peak.name}")
    return "\n".join(lines)


__all__ = ["ROWS", "MemoryPlan", "Moment", "checkpointed", "format_table", "plan_memory"]
