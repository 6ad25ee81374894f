"""Mixture-of-Experts FFN: fp32 router, top-k, shared expert, grouped expert GEMM.

Dispatch sorts the (token, expert) assignments by expert (stable argsort of the expert ids),
runs every expert's SwiGLU with ``ops.grouped_mm`` (``offs`` = int32 cumulative counts) and
scatters the weighted results back. Dropless by default; with ``capacity_factor`` each expert
keeps its first ``ceil(cf * N * k / E)`` assignments in token order and the rest are dropped
(counted in ``last_dropped``; a dropped token still gets the shared expert and the residual).

Expert weights are stored ``[E, Din, Dout]`` (grouped_mm's layout), i.e. the transpose of an
HF Linear weight: ``experts.gate_proj[e] = dense.gate_proj.weight.T``.

Expert parallelism (``parallel.expert_parallel.shard_experts(moe.experts, ep_mesh)``): the expert
weights become Shard(0) DTensors and ``experts.ep_mesh`` is set. The router and the shared
expert stay replicated; each rank routes its own tokens with the full router, the sorted rows
are all-to-all'ed to the ranks owning their experts, only the local experts run, and the outputs
come back the same way. Dropless by default; a capacity factor is applied per *source* rank
(each rank's own assignments against ``ceil(cf * N_local * k / E)``, before dispatch), i.e. the
same drops the non-EP layer makes on that rank's tokens.

``token_group`` (set when one token set is split over ranks, e.g. context parallelism): the
balance loss's expert shares use routing counts summed over that group, and every rank returns
its *share* of the aux loss (mean terms = local sum / global token count), so the shares sum to
the aux loss of the unsplit token set and the summed router gradients match it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, parallelize_module

from operators import ops
from parallel import expert_parallel
from sbtrain.config.model import ModelConfig, MoEConfig
from sbtrain.models.ffn.dense import mlp_saved, mlp_workspace
from sbtrain.models.ffn.registry import FfnKind, register
from sbtrain.models.layers import MLP
from sbtrain.models.mixers.saved_bytes import FP32, Shapes
from sbtrain.models.tp_styles import ReplicatedCompute


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [N, k] chosen experts
    weights: torch.Tensor  # [N, k] fp32 combine weights (from the unbiased scores)
    aux_loss: torch.Tensor  # scalar fp32: aux_loss_coef * balance + z_loss_coef * z


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``bincount(ids, minlength=E)`` for ids in [0, E), with an output size known without the data:
    bincount's depends on max(ids), which breaks a torch.compile graph at every call."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_ids.device)
    return counts.scatter_add_(0, expert_ids.long(), torch.ones_like(expert_ids, dtype=torch.long))


class Router(nn.Module):
    """Linear(hidden -> E, no bias) evaluated in fp32, softmax or sigmoid scores.

    ``expert_bias`` (auxiliary-loss-free balancing) is added to the scores for the top-k
    selection only; the combine weights come from the unbiased scores.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size, device=device, dtype=dtype))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor, token_group=None) -> Routing:
        """``token_group``: the group over which this token set is split (None: not split); the
        aux loss returned is then this rank's share of the aux loss of the whole set."""
        cfg, E = self.cfg, self.cfg.num_experts
        # fp32 even under autocast: autocast would run this matmul of fp32 operands in bf16 and
        # the top-k choice and the balance / z losses would follow bf16 rounding.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x.float() @ self.weight.float().t()
        scores = logits.softmax(-1) if cfg.router_activation == "softmax" else torch.sigmoid(logits)
        select = scores + self.expert_bias if cfg.aux_free_balancing else scores
        expert_ids = select.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(-1, expert_ids)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        aux = logits.new_zeros(())
        if not self.training or not (cfg.aux_loss_coef or cfg.z_loss_coef):
            return Routing(expert_ids, weights, aux)
        counts = tokens_per_expert(expert_ids.flatten(), E)
        num_tokens = x.shape[0]
        if token_group is not None:
            # Shares and means over the whole split token set: sum [counts..., N] over the group.
            total = expert_parallel.all_reduce_sum_no_grad(torch.cat([counts, counts.new_tensor([num_tokens])]),
                                                           token_group)
            counts, num_tokens = total[:E], int(total[E])
        if cfg.aux_loss_coef:
            # Switch balance loss: E * sum_e (share of assignments to e) * (mean score of e).
            share = counts.float() / (num_tokens * cfg.top_k)
            probs = scores / scores.sum(-1, keepdim=True) if cfg.router_activation == "sigmoid" else scores
            aux = aux + cfg.aux_loss_coef * E * (share * (probs.sum(0) / num_tokens)).sum()
        if cfg.z_loss_coef:
            aux = aux + cfg.z_loss_coef * torch.logsumexp(logits, -1).pow(2).sum() / num_tokens
        return Routing(expert_ids, weights, aux)


class Experts(nn.Module):
    """E SwiGLU experts as three ``[E, Din, Dout]`` tensors."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **kw))

    def forward(self, x_sorted: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``offs`` over this module's (local, under EP) experts."""
        # Under EP the weights are Shard(0) DTensors: compute with this rank's experts only.
        gate, up, down = (expert_parallel.local_shard(w) for w in (self.gate_proj, self.up_proj, self.down_proj))
        h = ops.swiglu(ops.grouped_mm(x_sorted, gate, offs), ops.grouped_mm(x_sorted, up, offs))
        return ops.grouped_mm(h, down, offs)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, dense_intermediate_size: int, cfg: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        size = cfg.expert_intermediate_size or dense_intermediate_size
        self.router = Router(hidden_size, cfg, device=device, dtype=dtype)
        self.experts = Experts(cfg.num_experts, hidden_size, size, device=device, dtype=dtype)
        self.shared_expert = (
            MLP(hidden_size, size * cfg.num_shared_experts, device=device, dtype=dtype)
            if cfg.num_shared_experts else None
        )
        # Statistics of the last forward (for logging and aux-free bias updates; the trainer
        # sums them across ranks: the model itself never talks to torch.distributed).
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_dropped = 0
        # Group over which one token set is split (context/sequence parallel); see the module doc.
        self.token_group = None

    def init_specs(self, std: float) -> dict:
        """Init by (relative) name; see :func:`sbtrain.models.build.init_weights`."""
        specs = {f"experts.{n}": ("normal", std) for n in ("gate_proj", "up_proj", "down_proj")}
        specs.update({"router.weight": ("normal", std), "router.expert_bias": ("const", 0.0)})
        return specs

    def capacity(self, num_tokens: int) -> int | None:
        if self.cfg.capacity_factor is None:
            return None
        return math.ceil(self.cfg.capacity_factor * num_tokens * self.cfg.top_k / self.cfg.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B,T,d]`` -> (y ``[B,T,d]``, aux loss scalar)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        N, E, k = flat.shape[0], self.cfg.num_experts, self.cfg.top_k
        routing = self.router(flat, token_group=self.token_group)
        expert_ids = routing.expert_ids.flatten()
        order = torch.argsort(expert_ids, stable=True)
        token_of = order // k  # assignment a belongs to token a // k
        counts = tokens_per_expert(expert_ids, E)
        self.last_tokens_per_expert = counts.detach()
        cap = self.capacity(N)
        if cap is not None:
            # Rank of each sorted assignment inside its expert; keep the first `cap`.
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=x.device) - starts[expert_ids[order]]
            keep = rank < cap
            self.last_dropped = int((~keep).sum())
            order, token_of = order[keep], token_of[keep]
            counts = counts.clamp(max=cap)
        else:
            self.last_dropped = 0
        ep_mesh = getattr(self.experts, "ep_mesh", None)
        if ep_mesh is None:
            offs = torch.cumsum(counts, 0).to(torch.int32)
            y_sorted = self.experts(flat[token_of], offs)
        else:
            x_local, offs, plan = expert_parallel.dispatch(flat[token_of], counts, ep_mesh)
            y_sorted = expert_parallel.combine(self.experts(x_local, offs), plan)
        weights = routing.weights.flatten()[order].unsqueeze(-1)
        combine = torch.promote_types(y_sorted.dtype, torch.float32)  # at least fp32 for the weighting
        weighted = (y_sorted.to(combine) * weights.to(combine)).to(flat.dtype)
        out = torch.zeros_like(flat).index_add(0, token_of, weighted)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape), routing.aux_loss

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing step: raise the bias of under-loaded experts, lower it for
        over-loaded ones (sign rule). Pass globally summed counts in data-parallel training."""
        counts = self.last_tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if counts is None:
            return
        counts = counts.float()
        self.router.expert_bias += self.cfg.aux_free_update_rate * torch.sign(counts.mean() - counts)


def routed_expert_fraction(cfg: MoEConfig) -> float:
    """Fraction of routed-expert parameters a token uses (top_k / num_experts)."""
    return cfg.top_k / cfg.num_experts if cfg.num_experts else 0.0


def _build(cfg: ModelConfig, device=None, dtype=None) -> MoE:
    return MoE(cfg.hidden_size, cfg.intermediate_size, cfg.moe, device=device, dtype=dtype)


def _tensor_parallel(moe: MoE, tp_mesh, residual) -> None:
    """Run *replicated* on the gathered tokens (router, experts and shared expert as ``Replicate``
    DTensors, every rank doing the whole layer): correct but redundant tp-fold; expert parallelism
    is the efficient path for MoE layers."""
    styles = [ReplicatedCompute()]
    if residual.is_shard():  # sequence parallel: gather the sequence in, scatter it back out
        styles.insert(0, PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                            use_local_output=True))
        styles.append(PrepareModuleOutput(output_layouts=(Replicate(), None), desired_output_layouts=(residual, None)))
    for style in styles:  # the hooks stack in this order
        parallelize_module(moe, tp_mesh, style)


def moe_saved(s: Shapes, cfg: ModelConfig) -> tuple[int, int]:
    """(saved, workspace) of a MoE FFN on N tokens (gathered under TP: replicated compute).

    The router runs in fp32 on the fp32 normed input (saved), softmax scores, top-k ids, the sort
    order and token index (int64), the z-loss's logits; the routed path runs in fp32 even under autocast (the grouped
    GEMM is not autocast): gathered rows [N*k, d], four [N*k, I_e] SwiGLU tensors, the expert
    output and its weighted copy, the combine weights. Expert parallelism moves rows, not sizes
    (balanced routing assumed). The shared expert is a dense SwiGLU of num_shared x I_e columns."""
    moe, inter_e = cfg.moe, cfg.moe.expert_intermediate_size or cfg.intermediate_size
    N, k, d = s.N, moe.top_k, s.d
    nk = N * k
    saved = (N * d * FP32 + N * moe.num_experts * FP32 + 3 * nk * 8 + nk * FP32
             + 3 * nk * d * FP32 + 4 * nk * inter_e * FP32)
    if moe.z_loss_coef:
        saved += N * moe.num_experts * FP32 + N * FP32  # logsumexp(logits) saves the logits and its result
    workspace = 2 * nk * inter_e * FP32 + nk * d * FP32  # SwiGLU gradients, d(expert output)
    if moe.num_shared_experts:
        shared = inter_e * moe.num_shared_experts
        saved += mlp_saved(s, shared, N, input_counted=True)
        workspace = max(workspace, mlp_workspace(s, shared, N))
    return saved, workspace


def _inactive_params(moe: MoE) -> int:
    routed = sum(p.numel() for p in moe.experts.parameters())
    return routed - routed * moe.cfg.top_k // moe.cfg.num_experts


def _upcycled_from(name: str) -> tuple[str, str] | None:
    """Routed and shared experts start as scaled copies of the teacher's dense FFN (sbtrain.convert.upcycle)."""
    for prefix, role in (("experts.", "routed"), ("shared_expert.", "shared")):
        if name.startswith(prefix):
            which = name.removeprefix(prefix).split(".")[0]  # gate_proj / up_proj / down_proj
            return f"{which}.weight", role
    return None


def _info(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    return {"moe": {
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "num_shared_experts": moe.num_shared_experts,
        "expert_intermediate_size": moe.expert_intermediate_size or cfg.intermediate_size,
        "moe_layers": [i for i, kind in enumerate(cfg.ffn_types()) if kind == "moe"],
        "dense_layers": sorted(moe.dense_layers),
        "router_activation": moe.router_activation,
        "capacity_factor": moe.capacity_factor,
    }}


register(FfnKind(
    name="moe",
    summary="Mixture-of-Experts: fp32 router, top-k routed SwiGLU experts, optional shared expert",
    build=_build,
    tensor_parallel=_tensor_parallel,
    tp_split_dim=lambda name: None,  # replicated under TP (above)
    activations=moe_saved,
    export_code=Path(__file__).parent / "hf" / "moe.py",
    inactive_params=_inactive_params,
    upcycled_from=_upcycled_from,
    info=_info,
    plan_note=lambda cfg: "MoE: balanced routing assumed; routed experts compute in fp32 even under bf16 autocast",
    expert_parallel=True,
))

__all__ = ["Experts", "MoE", "Router", "Routing", "moe_saved", "routed_expert_fraction"]
