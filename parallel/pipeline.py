"""Pipeline parallelism on ``torch.distributed.pipelining``, model-agnostic (layer 1).

A pipeline cuts a model into ``num_stages`` contiguous *global stages*; each rank of the pp group
holds ``stages_per_rank`` of them and a schedule orders every micro batch's forward and backward
over the ranks, sending activations and their gradients point to point.

| schedule | torch class | stages per rank | placement of global stages on pp rank r |
|---|---|---|---|
| ``1F1B`` | ``Schedule1F1B`` | 1 | ``r`` |
| ``Interleaved1F1B`` | ``ScheduleInterleaved1F1B`` | v >= 2 (default 2) | loop: ``r, r + pp, r + 2 pp, ...`` |
| ``ZBV`` | ``ScheduleZBVZeroBubble`` | 2 | V: ``r`` and ``2 pp - 1 - r`` |
| ``DualPipeV`` | ``ScheduleDualPipeV`` | 2 | V: ``r`` and ``2 pp - 1 - r`` |

Under the V placements the first and the last stage both live on pp rank 0. ZBV and DualPipeV
split each backward into the input gradient (sent at once) and the weight gradient (deferred to
fill bubbles).

What this module fixes, the model does not see:

- every error of a layout (unknown schedule, pp < 2, too few micro batches, a split with an
  empty stage or the wrong layer count) is raised by :func:`validate_pipeline` before a model is
  built, naming the values and a valid alternative;
- the loss: the last stage's module returns ``(loss_sum, aux)`` per micro batch (Σ token losses,
  auxiliary loss); the schedule's loss function turns it into ``loss_sum * scale + aux *
  aux_weight``, with ``scale`` and ``aux_weight`` set per step *before* the schedule runs (the
  normalisation by the global batch's target tokens is known from the labels up front), and the
  schedule sums (``scale_grads=False``): gradients equal those of the same micro batches run one
  after another in one process;
- metadata that every stage needs (positions, document bounds, labels) travels as keyword
  arguments, which the schedule hands to every stage locally (no point-to-point traffic and no
  fixed shapes); only the positional outputs (activations, the running aux loss) are sent.

Torch infers the shapes of the sent tensors once, on the first step, by a real forward and
input-gradient pass of the first micro batch (no parameter gradients; the loss function is called
once more then, which :meth:`PipelineRuntime.step` discounts). Shapes must then stay fixed.

Data parallelism beside the pipeline: :func:`all_reduce_gradients` over the dp group after the
step, or FSDP2 ``fully_shard`` on each stage module before building the runtime (torch's schedules
defer FSDP's reduction to the last micro batch); both tested equal to one process. Not with FSDP:
a parameter shared by two local stages (tied embeddings under a V placement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    torch_class: str  # name in torch.distributed.pipelining
    multi_stage: bool  # takes a list of stages (else one PipelineStage)
    v_shape: bool  # rank r holds stages r and 2 pp - 1 - r
    stages_per_rank: int | None  # fixed count, or None: configurable (>= 2, default 2)


SCHEDULES: dict[str, ScheduleSpec] = {
    "1F1B": ScheduleSpec("1F1B", "Schedule1F1B", False, False, 1),
    "Interleaved1F1B": ScheduleSpec("Interleaved1F1B", "ScheduleInterleaved1F1B", True, False, None),
    "ZBV": ScheduleSpec("ZBV", "ScheduleZBVZeroBubble", True, True, 2),
    "DualPipeV": ScheduleSpec("DualPipeV", "ScheduleDualPipeV", True, True, 2),
}


def schedule_spec(name: str) -> ScheduleSpec:
    spec = SCHEDULES.get(name)
    if spec is None:
        folded = {k.lower(): k for k in SCHEDULES}
        hint = f" (did you mean {folded[name.lower()]!r}?)" if name.lower() in folded else ""
        raise ValueError(f"pipeline: unknown schedule {name!r}{hint}; choose one of {sorted(SCHEDULES)}")
    return spec


def stages_per_rank(schedule: str, virtual_stages: int | None = None) -> int:
    """Global stages each pp rank holds: 1 (1F1B), 2 (ZBV, DualPipeV) or ``virtual_stages``
    (Interleaved1F1B, default 2)."""
    spec = schedule_spec(schedule)
    if spec.stages_per_rank is not None:
        if virtual_stages not in (None, spec.stages_per_rank):
            raise ValueError(f"pipeline: schedule {schedule} holds exactly {spec.stages_per_rank} stage(s) per rank; "
                             f"got virtual_stages={virtual_stages} (leave it unset, or use Interleaved1F1B for "
                             f"{virtual_stages} stages per rank)")
        return spec.stages_per_rank
    v = 2 if virtual_stages is None else virtual_stages
    if v < 2:
        raise ValueError(f"pipeline: Interleaved1F1B needs >= 2 stages per rank, got virtual_stages={v}; "
                         f"use virtual_stages=2, or schedule 1F1B for one stage per rank")
    return v


def num_stages(schedule: str, pp: int, virtual_stages: int | None = None) -> int:
    return pp * stages_per_rank(schedule, virtual_stages)


def stage_ids(schedule: str, pp: int, pp_rank: int, virtual_stages: int | None = None) -> list[int]:
    """The global stage indices pp rank ``pp_rank`` holds, ascending."""
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline: pp_rank={pp_rank} outside 0..{pp - 1}")
    v = stages_per_rank(schedule, virtual_stages)
    if schedule_spec(schedule).v_shape:
        return sorted({pp_rank, 2 * pp - 1 - pp_rank})
    return [pp_rank + k * pp for k in range(v)]


def stage_rank(schedule: str, pp: int, stage: int, virtual_stages: int | None = None) -> int:
    """The pp rank that holds global stage ``stage``."""
    for r in range(pp):
        if stage in stage_ids(schedule, pp, r, virtual_stages):
            return r
    raise ValueError(f"pipeline: stage {stage} outside 0..{num_stages(schedule, pp, virtual_stages) - 1}")


def last_stage_rank(schedule: str, pp: int, virtual_stages: int | None = None) -> int:
    """The pp rank computing the loss: pp - 1, or 0 under a V placement."""
    return stage_rank(schedule, pp, num_stages(schedule, pp, virtual_stages) - 1, virtual_stages)


def min_microbatches(schedule: str, pp: int, virtual_stages: int | None = None) -> int:
    """The fewest micro batches per step the schedule accepts (torch's own bounds, and at least
    one per rank: fewer leaves a rank idle for the whole step)."""
    spec = schedule_spec(schedule)
    if spec.name == "DualPipeV":
        return num_stages(schedule, pp, virtual_stages)  # torch: n_microbatches >= stages
    return pp


def valid_microbatches(schedule: str, pp: int, n: int, virtual_stages: int | None = None) -> bool:
    if n < min_microbatches(schedule, pp, virtual_stages):
        return False
    if schedule_spec(schedule).name == "Interleaved1F1B":
        # torch: rounds = max(1, n // pp) must divide n
        return n % max(1, n // pp) == 0
    return True


def default_split(num_layers: int, n_stages: int) -> list[int]:
    """Layers per global stage, as even as possible, the extra layers on the middle stages (the
    first stage also runs the embedding, the last the final norm and the LM-head loss)."""
    if num_layers < n_stages:
        raise ValueError(f"pipeline: {num_layers} layers cannot fill {n_stages} stages (each needs >= 1 layer); "
                         f"use fewer pp ranks or stages per rank (at most {num_layers} stages)")
    base, extra = divmod(num_layers, n_stages)
    order = sorted(range(n_stages), key=lambda s: (abs(s - (n_stages - 1) / 2), s))
    split = [base] * n_stages
    for s in order[:extra]:
        split[s] += 1
    return split


def validate_split(split: Sequence[int], num_layers: int, n_stages: int) -> list[int]:
    split = [int(x) for x in split]
    if len(split) != n_stages:
        raise ValueError(f"pipeline: split {split} has {len(split)} entries but the layout has {n_stages} stages; "
                         f"give one layer count per stage, e.g. {default_split(num_layers, n_stages)}"
                         if num_layers >= n_stages else
                         f"pipeline: split {split} has {len(split)} entries but the layout has {n_stages} stages")
    if any(x < 1 for x in split):
        empty = [i for i, x in enumerate(split) if x < 1]
        hint = f", e.g. {default_split(num_layers, n_stages)}" if num_layers >= n_stages else ""
        raise ValueError(f"pipeline: split {split} leaves stage(s) {empty} without a layer; every stage needs >= 1 "
                         f"layer{hint}")
    if sum(split) != num_layers:
        raise ValueError(f"pipeline: split {split} sums to {sum(split)} layers but the model has {num_layers}; "
                         f"e.g. {default_split(num_layers, n_stages)}")
    return split


def validate_pipeline(schedule: str, pp: int, n_microbatches: int, num_layers: int | None = None,
                      split: Sequence[int] | None = None, virtual_stages: int | None = None) -> list[int] | None:
    """Every check of a pipeline layout, before anything is built; returns the split (the given
    one, or :func:`default_split` when ``num_layers`` is known)."""
    spec = schedule_spec(schedule)
    if pp < 2:
        raise ValueError(f"pipeline: pp={pp}; a pipeline needs >= 2 ranks (pp=1 trains without one)")
    n_stages = num_stages(schedule, pp, virtual_stages)
    if not valid_microbatches(schedule, pp, n_microbatches, virtual_stages):
        low = min_microbatches(schedule, pp, virtual_stages)
        ok = next(m for m in range(max(low, n_microbatches), 10 * (n_microbatches + low))
                  if valid_microbatches(schedule, pp, m, virtual_stages))
        need = (f">= {low} micro batches" if n_microbatches < low else
                f"a micro batch count divisible by max(1, n // pp) = {max(1, n_microbatches // pp)}")
        raise ValueError(f"pipeline: schedule {spec.name} with pp={pp} ({n_stages} stages) needs {need}; got "
                         f"{n_microbatches}; use {ok} micro batches (global batch / (dp x micro batch size))")
    if split is not None:
        if num_layers is None:
            num_layers = sum(split)
        return validate_split(split, num_layers, n_stages)
    return default_split(num_layers, n_stages) if num_layers is not None else None


def _schedule_class(schedule: str):
    from torch.distributed import pipelining

    return getattr(pipelining, schedule_spec(schedule).torch_class)


@dataclass
class PipelineStepResult:
    """This rank's share of one step, the same on every rank of its pp group (float64):
    ``loss_sum`` = Σ token losses of its micro batches, ``aux_sum`` = Σ aux * aux_weight."""

    loss_sum: torch.Tensor
    aux_sum: torch.Tensor


class PipelineRuntime:
    """One pp rank's stages and the torch schedule over them.

    ``modules`` are this rank's stage modules in the order of :func:`stage_ids`; each takes its
    positional inputs (the first stage: the model inputs; the others: the previous stage's
    outputs) plus keyword metadata and returns a tuple of tensors; the last stage returns
    ``(loss_sum, aux)``."""

    def __init__(self, modules: Sequence[nn.Module], *, schedule: str, pp_group: dist.ProcessGroup,
                 n_microbatches: int, device: torch.device | str = "cpu", virtual_stages: int | None = None):
        from torch.distributed.pipelining import PipelineStage

        self.spec = schedule_spec(schedule)
        self.pp_group = pp_group
        self.pp = dist.get_world_size(pp_group)
        self.pp_rank = dist.get_rank(pp_group)
        self.virtual_stages = virtual_stages
        validate_pipeline(schedule, self.pp, n_microbatches, virtual_stages=virtual_stages)
        self.stage_ids = stage_ids(schedule, self.pp, self.pp_rank, virtual_stages)
        if len(modules) != len(self.stage_ids):
            raise ValueError(f"pipeline: pp rank {self.pp_rank} holds stages {self.stage_ids} under {schedule} but "
                             f"got {len(modules)} stage module(s)")
        self.modules = list(modules)
        self.n_microbatches = n_microbatches
        self.num_stages = num_stages(schedule, self.pp, virtual_stages)
        self.loss_rank = last_stage_rank(schedule, self.pp, virtual_stages)
        self.device = torch.device(device)
        self.stages = [PipelineStage(m, s, self.num_stages, self.device, group=pp_group)
                       for m, s in zip(self.modules, self.stage_ids, strict=True)]
        self.scale = 1.0
        self.aux_weight = 0.0
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []
        cls = _schedule_class(schedule)
        target = self.stages if self.spec.multi_stage else self.stages[0]
        self.schedule = cls(target, n_microbatches, loss_fn=self._loss_fn, scale_grads=False)

    @property
    def holds_loss(self) -> bool:
        return self.pp_rank == self.loss_rank

    def parameters(self):
        """Every parameter of this rank's stages, once (a parameter shared by two local stages,
        e.g. tied embeddings under a V placement, appears once)."""
        seen: set[int] = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _loss_fn(self, output, target) -> torch.Tensor:
        loss_sum, aux = output
        self._records.append((loss_sum.detach(), aux.detach()))
        return loss_sum * self.scale + aux * self.aux_weight

    def step(self, *args: torch.Tensor, target: torch.Tensor, scale: float, aux_weight: float,
             **kwargs) -> PipelineStepResult:
        """Forward and backward of ``n_microbatches`` micro batches (``args``, ``kwargs`` and
        ``target`` stacked along dim 0, cut into equal chunks; ``args`` reach the first stage only,
        ``kwargs`` every stage). Gradients accumulate into ``.grad`` (summed, unscaled by the
        schedule); the objective per micro batch is ``loss_sum * scale + aux * aux_weight``."""
        self.scale, self.aux_weight = float(scale), float(aux_weight)
        self._records.clear()
        self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
        return self._collect()

    @torch.no_grad()
    def eval_step(self, *args: torch.Tensor, target: torch.Tensor | None = None, **kwargs) -> PipelineStepResult:
        """Forward only: Σ token losses and Σ aux of the micro batches, on every rank of the pp
        group. The stages run one micro batch after another, in stage order, with blocking
        point-to-point sends (no schedule: torch's ``eval()`` runs backward actions under the V
        placements, and a mode switch would re-infer the stage metadata); evaluation is rare."""
        from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

        del target  # the last stage computes its loss from the labels among the kwargs
        arg_mbs, kwarg_mbs = split_args_kwargs_into_chunks(args, kwargs, self.n_microbatches)
        local = dict(zip(self.stage_ids, self.modules, strict=True))
        owner = [stage_rank(self.spec.name, self.pp, s, self.virtual_stages) for s in range(self.num_stages)]
        out = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in range(self.n_microbatches):
            carry: tuple = ()
            for s in range(self.num_stages):
                if s not in local:
                    if s + 1 < self.num_stages and owner[s + 1] == self.pp_rank:
                        carry = self._recv_tensors(owner[s])
                    continue
                inputs = arg_mbs[mb] if s == 0 else carry
                outputs = local[s](*inputs, **kwarg_mbs[mb])
                carry = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
                if s == self.num_stages - 1:
                    out[0] += carry[0].double()
                    out[1] += carry[1].double()
                elif owner[s + 1] != self.pp_rank:
                    self._send_tensors(carry, owner[s + 1])
        dist.broadcast(out, group=self.pp_group, group_src=self.loss_rank)
        return PipelineStepResult(out[0], out[1])

    def _send_tensors(self, tensors: tuple, dst: int) -> None:
        header = [[(tuple(t.shape), t.dtype) for t in tensors]]
        dist.send_object_list(header, group_dst=dst, group=self.pp_group, device=self.device)
        for t in tensors:
            dist.send(t.contiguous(), group_dst=dst, group=self.pp_group)

    def _recv_tensors(self, src: int) -> tuple:
        header: list = [None]
        dist.recv_object_list(header, group_src=src, group=self.pp_group, device=self.device)
        out = []
        for shape, dtype in header[0]:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(t, group_src=src, group=self.pp_group)
            out.append(t)
        return tuple(out)

    def _collect(self) -> PipelineStepResult:
        out = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.holds_loss:
            # The first step's shape inference also calls the loss function: keep the last n.
            records = self._records[-self.n_microbatches:]
            if len(records) != self.n_microbatches:
                raise RuntimeError(f"pipeline: {len(records)} losses recorded for {self.n_microbatches} micro batches")
            out[0] = sum(r[0].double() for r in records)
            out[1] = sum(r[1].double() for r in records) * self.aux_weight
        self._records.clear()
        dist.broadcast(out, group=self.pp_group, group_src=self.loss_rank)
        return PipelineStepResult(out[0], out[1])


def all_reduce_gradients(params, dp_group: dist.ProcessGroup | None, average: bool = True) -> None:
    """Plain data parallelism over ``dp_group`` for pipeline stages: sum (and by default average)
    every gradient, one flat buffer per dtype."""
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return
    size = dist.get_world_size(dp_group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp_group)
        if average:
            flat.div_(size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def theoretical_bubble(schedule: str, pp: int, n_microbatches: int, virtual_stages: int | None = None,
                       costs: dict[str, float] | None = None) -> float:
    """Idle fraction of a step, averaged over ranks, for the schedule's own action order with
    fixed per-action costs (default F=1, I=1, W=1, full backward B=I+W) and free communication:
    a list simulation of torch's ``pipeline_order``. 1F1B gives (p-1)/(m+p-1)."""
    costs = {"F": 1.0, "I": 1.0, "W": 1.0, **(costs or {})}
    costs.setdefault("B", costs["I"] + costs["W"])
    order = schedule_order(schedule, pp, n_microbatches, virtual_stages)
    n_st = num_stages(schedule, pp, virtual_stages)
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, mb) -> finish time
    clock = [0.0] * pp
    pos = [0] * pp
    busy = [0.0] * pp
    remaining = sum(len(a) for a in order)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(order[r]):
                kind, stage, mb = order[r][pos[r]]
                deps = []
                if kind == "F" and stage > 0:
                    deps.append(("F", stage - 1, mb))
                if kind in ("B", "I"):
                    deps.append(("F", stage, mb))
                    if stage < n_st - 1:
                        deps.append(("BI", stage + 1, mb))
                if kind == "W":
                    deps.append(("BI", stage, mb))
                if any(d not in done for d in deps):
                    break
                start = max([clock[r], *(done[d] for d in deps)])
                clock[r] = start + costs[kind]
                busy[r] += costs[kind]
                done[("BI" if kind in ("B", "I") else kind, stage, mb)] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline: schedule {schedule} order deadlocks in the simulation")
    step = max(clock)
    return sum(1 - b / step for b in busy) / pp


def schedule_order(schedule: str, pp: int, n_microbatches: int,
                   virtual_stages: int | None = None) -> list[list[tuple[str, int, int]]]:
    """Per pp rank, the compute actions of torch's schedule as ``(kind, stage, micro batch)``,
    kind F, B (full backward), I (input gradient) or W (weight gradient), built without a process
    group (torch's own ``_calculate_single_rank_operations`` / 1F1B order)."""
    spec = schedule_spec(schedule)
    validate_pipeline(schedule, pp, n_microbatches, virtual_stages=virtual_stages)
    n_st = num_stages(schedule, pp, virtual_stages)
    if not spec.multi_stage:  # 1F1B: warm-up forwards, then one forward one backward, then cool-down
        out = []
        for r in range(pp):
            warm = min(n_microbatches, n_st - r)
            acts = [("F", r, i) for i in range(warm)]
            f, b = warm, 0
            while b < n_microbatches:
                acts.append(("B", r, b))
                b += 1
                if f < n_microbatches:
                    acts.append(("F", r, f))
                    f += 1
            out.append(acts)
        return out
    cls = _schedule_class(schedule)
    fake = cls.__new__(cls)
    fake.pp_group_size = pp
    fake._n_microbatches = n_microbatches
    fake.n_local_stages = stages_per_rank(schedule, virtual_stages)
    fake.num_stages = fake._num_stages = n_st
    fake.number_of_rounds = max(1, n_microbatches // pp)
    fake.microbatches_per_round = n_microbatches // fake.number_of_rounds
    out = []
    for r in range(pp):
        fake.rank = r
        acts = []
        for a in cls._calculate_single_rank_operations(fake, r):
            if a is None:
                continue
            for sub in a.sub_actions or (a,):  # OVERLAP_F_B (DualPipeV): a forward and a backward together
                acts.append((sub.computation_type.value, sub.stage_index, sub.microbatch_index))
        out.append(acts)
    return out


__all__ = [
    "SCHEDULES", "PipelineRuntime", "PipelineStepResult", "ScheduleSpec", "all_reduce_gradients", "default_split",
    "last_stage_rank", "min_microbatches", "num_stages", "schedule_order", "schedule_spec", "stage_ids",
    "stage_rank", "stages_per_rank", "theoretical_bubble", "valid_microbatches", "validate_pipeline",
    "validate_split",
]
