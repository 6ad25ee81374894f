"""W8ASpike (docs/DESIGN_NOTES.md §5): int8 weights and spike activations, as a fake-quant path inside sbtrain.

Weights: symmetric int8, one scale per output channel and per group of ``group_size`` (128)
consecutive input channels (the last group of a row may be shorter: ``d_in`` need not be a
multiple of 128). ``codes = round(w / scale)``, dequantized exactly as ``codes * scale`` (one fp32
multiply). Two scale methods:

- ``absmax``: ``scale = absmax(group) / 127``, so every code lies in [-127, 127] by construction;
- ``mse``: a clipping search over ``MSE_CLIP_STEPS`` ratios from 1.0 down to ``MSE_MIN_CLIP`` of
  the group's absmax, ``scale = ratio * absmax / 127``, keeping the ratio of least squared error
  (ties keep the larger ratio). A ratio < 1 makes ``round(w / scale)`` exceed 127 for the largest
  entries, so the codes are CLAMPED to [-128, 127] and the entries that needed the clamp are
  counted (the public code computes such scales elsewhere and forgets the clamp: a 128 wraps to
  -128 in int8). Ratio 1.0 is a candidate, so ``mse`` never has a larger group error than ``absmax``.

Which weights (:func:`quantized_weight_names`): the linear layers the spiking hooks cover
(``sbtrain.models.spiking``): attention q/k/v/o (and the 76B's ``linear_`` branch copies), both
Linears of the GLA gate ``gk_proj``, gate/up/down of the dense FFN and of the shared expert, and
the routed experts' grouped ``[E, Din, Dout]`` tensors (quantized in the Linear orientation
``[E, Dout, Din]``: per expert and output channel, groups along Din). The fp32 MoE router, the
embeddings, lm_head, norms, biases, sinks and betas keep their dtype.

:func:`apply_w8aspike` replaces those weights *in place* by their dequantized values and switches
spiking on (``model.spike.mode=eval``), so the model in eval mode computes ``V_th * (W_q s)``;
:func:`validation_loss` is the Trainer's evaluation (sum of token losses / target tokens) and
:func:`loss_change` compares a model before and after :func:`apply_w8aspike`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from sbtrain.config.model import ConfigError
from sbtrain.models.ffn.moe import Experts
from sbtrain.models.spiking import apply_spiking

GROUP_SIZE = 128
SCALE_METHODS = ("absmax", "mse")
MSE_CLIP_STEPS = 100
MSE_MIN_CLIP = 0.5
INT8_MAX = 127
# The last component of a quantized nn.Linear's module name (``linear_`` prefixes stripped);
# the Linears inside ``gk_proj`` are matched by their parent's name.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class W8AError(ConfigError):
    """A W8ASpike setting that cannot work (method, group size, k)."""


def check_settings(method: str, group_size: int = GROUP_SIZE, k: float | None = 3.0) -> None:
    if method not in SCALE_METHODS:
        raise W8AError(f"w8a.method={method!r} is unknown; use one of {SCALE_METHODS} "
                       "(absmax: scale = absmax/127; mse: clipping search, codes clamped to [-128, 127])")
    if int(group_size) < 1:
        raise W8AError(f"w8a.group_size={group_size} must be >= 1 (the design uses 128)")
    if k is not None and not k > 0:
        raise W8AError(f"w8a.k={k} must be positive (V_th = mean(|x|) / k; default 3)")


@dataclass
class QuantizedWeight:
    """int8 ``codes [..., d_out, d_in]``, fp32 ``scales [..., d_out, n_groups]`` and error figures."""

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    clipped: int  # entries whose round(w / scale) fell outside the code range before the clamp
    max_abs_error: float
    rel_error: float  # ||W_q - W||_F / ||W||_F

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.group_size, dtype)

    def report(self) -> dict:
        return {"shape": list(self.codes.shape), "groups": self.scales.shape[-1], "clipped": self.clipped,
                "max_abs_error": self.max_abs_error, "rel_error": self.rel_error}


def num_groups(d_in: int, group_size: int = GROUP_SIZE) -> int:
    return -(-d_in // group_size)


def expand_scales(scales: torch.Tensor, d_in: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``[..., G]`` -> ``[..., d_in]``: every input channel gets its group's scale."""
    return scales.repeat_interleave(group_size, dim=-1)[..., :d_in]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale`` in fp32 (one rounding), then cast to ``dtype``; the exported modeling code
    repeats exactly this so its weights are bit-identical to the fake-quant model's."""
    return (codes.float() * expand_scales(scales.float(), codes.shape[-1], group_size)).to(dtype)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero group has scale 0: divide by 1 there (its codes are 0 either way)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _search_mse_scale(groups: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Per group, the scale ``ratio * absmax / 127`` of least squared error after the [-128, 127] clamp."""
    best_scale = absmax / INT8_MAX
    best_error = torch.full_like(absmax, float("inf"))
    for ratio in torch.linspace(1.0, MSE_MIN_CLIP, MSE_CLIP_STEPS).tolist():
        scale = absmax * ratio / INT8_MAX
        codes = torch.round(groups / _safe(scale)).clamp(-INT8_MAX - 1, INT8_MAX)
        error = (codes * scale - groups).pow(2).sum(-1, keepdim=True)
        better = error < best_error  # strict: a tie keeps the earlier (larger) ratio
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, method: str = "absmax", group_size: int = GROUP_SIZE) -> QuantizedWeight:
    """Quantize ``weight [..., d_out, d_in]`` (a Linear's orientation) per output channel and group."""
    check_settings(method, group_size, None)
    w = weight.detach().float()
    d_in = w.shape[-1]
    G = num_groups(d_in, group_size)
    # Zero padding of the last group changes neither its absmax nor any squared error.
    padded = torch.nn.functional.pad(w, (0, G * group_size - d_in))
    groups = padded.reshape(*w.shape[:-1], G, group_size)
    absmax = groups.abs().amax(-1, keepdim=True)
    scale = absmax / INT8_MAX if method == "absmax" else _search_mse_scale(groups, absmax)
    raw = torch.round(groups / _safe(scale))
    low = -INT8_MAX if method == "absmax" else -INT8_MAX - 1
    clipped = int(((raw < low) | (raw > INT8_MAX)).sum())
    codes = raw.clamp(low, INT8_MAX).to(torch.int8).reshape(*w.shape[:-1], G * group_size)[..., :d_in].contiguous()
    scales = scale.squeeze(-1).contiguous()
    diff = dequantize(codes, scales, group_size) - w
    norm = w.norm().item()
    return QuantizedWeight(codes, scales, group_size, clipped, diff.abs().max().item() if diff.numel() else 0.0,
                           diff.norm().item() / norm if norm > 0 else 0.0)


def quantized_weight_names(model: nn.Module) -> dict[str, bool]:
    """``{parameter name: stored transposed}`` of every weight W8ASpike quantizes (see the module
    docstring); routed experts are stored ``[E, Din, Dout]``, i.e. transposed."""
    names: dict[str, bool] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear):
            last = parts[-1].removeprefix("linear_")
            if last in QUANTIZED_LINEARS or (len(parts) > 1 and parts[-2] == "gk_proj"):
                names[f"{name}.weight"] = False
        elif isinstance(module, Experts):
            names.update({f"{name}.{w}": True for w in EXPERT_WEIGHTS})
    return names


def linear_view(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight in Linear orientation ``[..., d_out, d_in]`` (a view)."""
    return tensor.transpose(-1, -2) if transposed else tensor


def quantize_model(model: nn.Module, method: str = "absmax",
                   group_size: int = GROUP_SIZE) -> dict[str, QuantizedWeight]:
    """``{parameter name: QuantizedWeight in Linear orientation}`` for :func:`quantized_weight_names`."""
    check_settings(method, group_size, None)
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: quantize_weight(linear_view(params[name], transposed), method, group_size)
            for name, transposed in quantized_weight_names(model).items()}


def summarize(quantized: dict[str, QuantizedWeight], method: str, group_size: int) -> dict:
    """Per-layer report plus totals (clipped codes, the worst max-abs and relative error)."""
    layers = {name: q.report() for name, q in quantized.items()}
    return {
        "method": method,
        "group_size": group_size,
        "layers": layers,
        "clipped": sum(q.clipped for q in quantized.values()),
        "codes": sum(q.codes.numel() for q in quantized.values()),
        "max_abs_error": max((q.max_abs_error for q in quantized.values()), default=0.0),
        "max_rel_error": max((q.rel_error for q in quantized.values()), default=0.0),
    }


@torch.no_grad()
def apply_w8aspike(model: nn.Module, method: str = "absmax", k: float = 3.0, spike: bool = True,
                   spike_down_proj: bool = False, group_size: int = GROUP_SIZE) -> dict:
    """Fake-quantize ``model`` IN PLACE: every weight of :func:`quantized_weight_names` becomes
    ``codes * scale`` (cast to its dtype) and, with ``spike``, spiking is switched on in eval mode
    with threshold divisor ``k`` (``spike=False``: W8 only, spiking off). Returns the report of
    :func:`summarize` with the spike settings added."""
    check_settings(method, group_size, k if spike else None)
    quantized = quantize_model(model, method, group_size)
    params = dict(model.named_parameters(remove_duplicate=False))
    transposed = quantized_weight_names(model)
    for name, q in quantized.items():
        param = params[name]
        param.copy_(linear_view(q.dequantize(param.dtype), transposed[name]))
    current = model.config.spike
    model.config.spike = (replace(current, mode="eval", k=float(k), spike_down_proj=bool(spike_down_proj)) if spike
                          else replace(current, mode="off"))
    apply_spiking(model)  # re-install the hooks: the spiked module set depends on spike_down_proj
    report = summarize(quantized, method, group_size)
    report["spike"] = {"mode": model.config.spike.mode, "k": float(k) if spike else None,
                       "spike_down_proj": bool(spike_down_proj) if spike else None}
    return report


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[dict]) -> float:
    """Mean token loss over ``batches`` (dicts of input_ids / labels), as ``Trainer.evaluate``
    computes it: the sum of token losses over the number of target tokens, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    device = next(model.parameters()).device
    for batch in batches:
        out = model(**{key: value.to(device) for key, value in batch.items()})
        loss_sum += out.loss_sum.double().cpu()
        tokens += out.num_tokens.double().cpu()
    model.train(was_training)
    return (loss_sum / tokens.clamp(min=1)).item()


def loss_change(model: nn.Module, batches: Iterable[dict], **w8a) -> dict:
    """Validation loss before and after :func:`apply_w8aspike` (``model`` is modified in place)."""
    batches = list(batches)
    before = validation_loss(model, batches)
    report = apply_w8aspike(model, **w8a)
    after = validation_loss(model, batches)
    return {"loss_before": before, "loss_after": after, "loss_change": after - before, "report": report}


__all__ = ["GROUP_SIZE", "SCALE_METHODS", "QuantizedWeight", "W8AError", "apply_w8aspike", "check_settings",
           "dequantize", "expand_scales", "linear_view", "loss_change", "num_groups", "quantize_model",
           "quantize_weight", "quantized_weight_names", "summarize", "validation_loss"]
