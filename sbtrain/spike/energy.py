"""Energy per token of a spiking model from operation counts (45 nm figures, docs/DESIGN_NOTES.md §5).

Per spiked linear layer with fan-in ``d_in`` and fan-out ``d_out`` (the matmul right after the spike):

- spiking side: every spike costs ``d_out`` accumulates (an INT8 add, 0.03 pJ: W8ASpike weights
  are int8, a ternary spike only adds or subtracts a weight), and every output is multiplied once
  by the token's ``V_th`` (``V_th * (W s)``). We count that multiply as one FP16 MAC (1.5 pJ): the
  scale is a float and the multiply-add is the unit the table prices; an FP16 multiply alone would
  cost a little less, so this errs against the spiking side. Spikes per row = ``d_in`` times the
  chosen coding's mean spikes per channel (:mod:`sbtrain.spike.stats`): the coding sets the energy.
- dense baselines: ``d_in * d_out`` MACs at FP16 (1.5 pJ) and at INT8 (0.23 pJ).

Every figure is per token: a layer seeing ``rows_per_token`` rows per token (1 for dense layers,
top_k for routed experts) is scaled by it. The matmuls that are not spiked (lm_head, the second
linear of the GLA low-rank gate, routed experts' down projection, a down_proj left unspiked, the
attention score / value products and the GLA state update and read-out) cost the same on both sides:
they are counted at FP16 MACs, listed separately, and added to both totals in ``with_other``; the
ratios are quoted for the spiked layers alone and with the others.

lm_head (``hidden * vocab``, every position's logits, as in the validation loss), attention and GLA
per token (analytic, averaged over a sequence of ``seq_len`` positions): softmax
attention ``2 * H * d_head * ctx`` MACs (scores and values) with ``ctx`` the mean visible keys
(causal, window W: ``min(t + 1, W + 1)``, plus sink tokens); GLA ``(H_kv + H) * d_head^2`` MACs (the
``k^T v`` state update per KV head, the ``q S`` read-out per query head); elementwise work is ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sbtrain.models.ffn.moe import Experts, Router
from sbtrain.models.mixers import mixer_kind
from sbtrain.models.mixers.attention import mean_context

PJ = {"fp16_mac": 1.5, "int8_mac": 0.23, "int8_add": 0.03}


@dataclass
class SpikedMatmul:
    """One spiked linear layer as the energy model sees it."""

    name: str
    d_in: int
    d_out: int
    rows_per_token: float
    spikes_per_channel: float

    def energy(self) -> dict:
        spikes = self.rows_per_token * self.d_in * self.spikes_per_channel
        macs = self.rows_per_token * self.d_in * self.d_out
        return {**asdict(self), "spikes_per_token": spikes,
                "spike_pj": spikes * self.d_out * PJ["int8_add"] + self.rows_per_token * self.d_out * PJ["fp16_mac"],
                "fp16_pj": macs * PJ["fp16_mac"], "int8_pj": macs * PJ["int8_mac"]}


def fan_out(module: nn.Module) -> int:
    """``d_out`` of the matmul that reads a spiked module's input."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Sequential):  # the GLA low-rank gate: only its first linear reads x
        return fan_out(module[0])
    if isinstance(module, Experts):
        return module.gate_proj.shape[-1] + module.up_proj.shape[-1]  # routed experts: grouped gate and up GEMMs
    if isinstance(module, Router):
        return module.weight.shape[0]  # weight [E, hidden]
    raise ValueError(f"cannot tell the fan-out of a spiked {type(module).__name__}")


class OtherMatmuls:
    """Forward pre-hooks counting the rows of every matmul that is not spiked (MACs per row known)."""

    def __init__(self, model: nn.Module, spiked: list[str]):
        self.rows: dict[str, int] = {}
        self.macs_per_row: dict[str, int] = {}
        self.handles = []
        modules = dict(model.named_modules())
        skip = set(spiked) | {f"{n}.0" for n in spiked if isinstance(modules[n], nn.Sequential)}
        for name, module in modules.items():
            if name in skip:
                if isinstance(module, Experts):  # spiked gate/up; the down projection reads an unspiked input
                    self._watch(f"{name}.down_proj", module, module.down_proj[0].numel())
                continue
            if name.rsplit(".", 1)[-1] == "lm_head":
                continue  # the loss reads lm_head.weight directly (no forward call): see analytic_macs
            if isinstance(module, nn.Linear):
                self._watch(name, module, module.in_features * module.out_features)
            elif isinstance(module, Experts):
                self._watch(name, module, sum(p[0].numel() for p in (module.gate_proj, module.up_proj,
                                                                     module.down_proj)))
            elif isinstance(module, Router):
                self._watch(name, module, module.weight.numel())

    def _watch(self, key: str, module: nn.Module, macs_per_row: int) -> None:
        self.macs_per_row[key] = macs_per_row
        self.rows[key] = 0

        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                self.rows[key] += args[0].numel() // args[0].shape[-1]

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def macs_per_token(self, tokens: int) -> dict[str, float]:
        return {k: self.rows[k] * self.macs_per_row[k] / tokens for k in self.rows if self.rows[k]} if tokens else {}


def analytic_macs(cfg, seq_len: int) -> dict[str, float]:
    """Per-token MACs of lm_head, the attention products and the GLA state work, per layer (module docstring)."""
    out = {"lm_head": float(cfg.hidden_size * cfg.vocab_size)}
    for i, kind in enumerate(cfg.layer_types()):
        out[f"layers.{i}.{kind}"] = float(mixer_kind(kind).core_macs_per_token(cfg, seq_len))  # the kind's own count
    return out


def energy_report(layers: list[SpikedMatmul], other_macs: dict[str, float]) -> dict:
    """Per-layer and total pJ per token, and the ratios of the dense baselines to the spiking side."""
    rows = [layer.energy() for layer in layers]
    spike, fp16, int8 = (sum(r[k] for r in rows) for k in ("spike_pj", "fp16_pj", "int8_pj"))
    other = sum(other_macs.values()) * PJ["fp16_mac"]
    return {
        "pj": dict(PJ),
        "layers": rows,
        "other_macs_per_token": dict(other_macs),
        "spiked_layers": {"spike_pj": spike, "fp16_pj": fp16, "int8_pj": int8,
                          "fp16_over_spike": fp16 / spike if spike else float("inf"),
                          "int8_over_spike": int8 / spike if spike else float("inf")},
        "with_other": {"other_pj": other, "spike_pj": spike + other, "fp16_pj": fp16 + other, "int8_pj": int8 + other,
                       "fp16_over_spike": (fp16 + other) / (spike + other) if spike + other else float("inf"),
                       "int8_over_spike": (int8 + other) / (spike + other) if spike + other else float("inf")},
    }


__all__ = ["PJ", "OtherMatmuls", "SpikedMatmul", "analytic_macs", "energy_report", "fan_out", "mean_context"]
