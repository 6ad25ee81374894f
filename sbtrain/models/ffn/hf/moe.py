"""HF side of the ``moe`` FFN kind: fp32 router, top-k, routed experts ``[E, Din, Dout]``, shared expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.models.ffn.hf.dense import SbtrainMLP
from sbtrain.models.mixers.hf.common import export_ffn


# --- exported code below ---
class SbtrainRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(int(config.moe["num_experts"]), config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(int(config.moe["num_experts"]), dtype=torch.float32))

    def init_own_weights(self, init, std: float) -> None:
        init.normal_(self.weight, std=std)
        init.zeros_(self.expert_bias)


class SbtrainExperts(nn.Module):
    """E SwiGLU experts stored ``[E, Din, Dout]`` (the transpose of an nn.Linear weight)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.up_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, intermediate_size, hidden_size))

    def init_own_weights(self, init, std: float) -> None:
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            init.normal_(p, std=std)


@export_ffn("moe")
class SbtrainMoE(nn.Module):
    """fp32 router and top-k; dropless, or each expert keeps its first ``ceil(cf * N * k / E)``
    assignments in token order when ``capacity_factor`` is set (as sbtrain does)."""

    def __init__(self, config):
        super().__init__()
        self.cfg = moe = config.moe
        size = moe.get("expert_intermediate_size") or config.intermediate_size
        self.router = SbtrainRouter(config)
        self.experts = SbtrainExperts(int(moe["num_experts"]), config.hidden_size, size)
        shared = int(moe.get("num_shared_experts", 0))
        self.shared_expert = SbtrainMLP(config.hidden_size, size * shared) if shared else None

    # Hooks for variants (the W8ASpike export spikes these inputs and dequantizes the experts).
    def router_input(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def expert_input(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def expert_matrix(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The ``[E, Din, Dout]`` weight ``name`` (gate_proj / up_proj / down_proj)."""
        return getattr(self.experts, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, shape = self.cfg, x.shape
        flat = x.reshape(-1, shape[-1])
        N, E, k = flat.shape[0], int(cfg["num_experts"]), int(cfg.get("top_k", 1))
        logits = self.router_input(flat).float() @ self.router.weight.float().t()
        scores = logits.softmax(-1) if cfg.get("router_activation", "softmax") == "softmax" else torch.sigmoid(logits)
        select = scores + self.router.expert_bias if cfg.get("aux_free_balancing") else scores
        chosen = select.topk(k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if cfg.get("norm_topk_prob"):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        expert_ids = chosen.flatten()
        order = torch.argsort(expert_ids, stable=True)
        token_of = order // k
        counts = torch.bincount(expert_ids, minlength=E)
        if cfg.get("capacity_factor") is not None:
            cap = math.ceil(cfg["capacity_factor"] * N * k / E)
            starts = torch.cumsum(counts, 0) - counts
            keep = torch.arange(order.numel(), device=x.device) - starts[expert_ids[order]] < cap
            order, token_of, counts = order[keep], token_of[keep], counts.clamp(max=cap)
        rows = self.expert_input(flat[token_of])
        gate, up, down = (self.expert_matrix(name, x.dtype) for name in ("gate_proj", "up_proj", "down_proj"))
        outputs, start = [], 0
        for e, count in enumerate(counts.tolist()):
            xe = rows[start:start + count]
            outputs.append((F.silu(xe @ gate[e]) * (xe @ up[e])) @ down[e])
            start += count
        y_sorted = torch.cat(outputs) if outputs else rows
        combine = torch.promote_types(y_sorted.dtype, torch.float32)
        w = weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(flat).index_add(0, token_of, (y_sorted.to(combine) * w.to(combine)).to(flat.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)
