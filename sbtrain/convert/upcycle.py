"""MoE upcycling: every expert (routed and shared) starts as a scaled copy of the dense FFN.

Why a scale: a token's MoE output is ``shared(x) + sum_{e in top-k} p_e(x) * expert_e(x)``. With
copies of the dense FFN ``F`` scaled to ``F_s`` and a softmax router without top-k
renormalisation at uniform probabilities (``p_e = 1/N``, what a router initialised near zero
gives), that is ``(S + k/N) * F_s(x)``: S shared experts, k of N routed ones. The dense output is
kept when ``F_s = c * F`` with ``c = 1 / (S + k/N)``.

- ``exact``: ``F(x) = down(silu(gate x) * up x)`` is linear in ``up`` and in ``down``, so scaling
  each of them by ``c^(1/2)`` (gate unscaled) gives exactly ``c * F``.
- ``report`` (the SpikingBrain report's rule): all three matrices times ``alpha = (S + k/N)^(-1/3)``,
  which would give ``alpha^3 * F = c * F`` if SiLU were homogeneous; it is not
  (``silu(alpha z) != alpha silu(z)``), so the MoE output differs from the dense one by a factor
  ``sigmoid(alpha z) / sigmoid(z)`` on every hidden unit (about 1 +- 2% at alpha = 0.98, S=1, k=1, N=16).

Neither holds for ``norm_topk_prob=True`` (the weights then sum to 1, c would be 1/(S+1)), a
sigmoid router, or once the router has learned: the scale only sets a sensible starting point.
"""

from __future__ import annotations

import torch

from sbtrain.config.model import ConfigError, MoEConfig

UPCYCLE_SCALES = ("report", "exact")


def upcycle_factors(scale: str, num_experts: int, top_k: int, num_shared: int) -> dict[str, float]:
    """Multipliers of the gate / up / down matrices of every expert copy (and the rule's constant)."""
    if num_experts <= 0:
        raise ConfigError(f"upcycling needs num_experts > 0, got {num_experts}")
    mass = num_shared + top_k / num_experts  # S + k/N: the experts' total weight at uniform routing
    if scale == "report":
        alpha = mass ** (-1.0 / 3.0)
        return {"gate": alpha, "up": alpha, "down": alpha, "alpha": alpha, "mass": mass}
    if scale == "exact":
        c = 1.0 / mass
        return {"gate": 1.0, "up": c**0.5, "down": c**0.5, "c": c, "mass": mass}
    raise ConfigError(f"upcycle.scale={scale!r} is unknown; use one of {UPCYCLE_SCALES}")


def _wide(w: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the scaling (bf16 sources), float64 kept."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def routed_expert_weight(dense_weight: torch.Tensor, factor: float, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``[E, Din, Dout]`` copies of an HF Linear weight ``[Dout, Din]`` times ``factor`` (in >= fp32, then cast)."""
    scaled = (_wide(dense_weight).t() * factor).to(dtype)
    return scaled.unsqueeze(0).expand(num_experts, *scaled.shape).contiguous()


def shared_expert_weight(dense_weight: torch.Tensor, factor: float, num_shared: int, which: str,
                         dtype: torch.dtype) -> torch.Tensor:
    """The shared expert is one MLP of ``num_shared`` x the dense width: S copies side by side
    (along the intermediate dim: rows of gate/up, columns of down), so it computes S * F_s."""
    scaled = (_wide(dense_weight) * factor).to(dtype)
    return torch.cat([scaled] * num_shared, dim=1 if which == "down" else 0)


@torch.no_grad()
def upcycle_moe_state(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, moe: MoEConfig, scale: str,
                      router: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of one :class:`sbtrain.models.ffn.moe.MoE` (names relative to it) upcycled from a
    dense SwiGLU FFN given as HF Linear weights; ``router`` is the (random) router weight."""
    dtype = gate.dtype if dtype is None else dtype
    f = upcycle_factors(scale, moe.num_experts, moe.top_k, moe.num_shared_experts)
    dense = {"gate": gate, "up": up, "down": down}
    state = {
        "router.weight": router.to(dtype),
        "router.expert_bias": torch.zeros(moe.num_experts, dtype=torch.float32),
    }
    for which, w in dense.items():
        state[f"experts.{which}_proj"] = routed_expert_weight(w, f[which], moe.num_experts, dtype)
        if moe.num_shared_experts:
            state[f"shared_expert.{which}_proj.weight"] = shared_expert_weight(
                w, f[which], moe.num_shared_experts, which, dtype)
    return state


__all__ = ["UPCYCLE_SCALES", "routed_expert_weight", "shared_expert_weight", "upcycle_factors", "upcycle_moe_state"]
