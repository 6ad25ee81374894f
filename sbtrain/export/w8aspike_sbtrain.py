"""Standalone Hugging Face modeling code of a W8ASpike export: int8 weights + spike activations.

Copied into a ``format=w8aspike`` export beside ``modeling_sbtrain.py`` and
``configuration_sbtrain.py``; imports only torch, transformers and those two files, never sbtrain.
``config.json`` carries two extra dicts:

- ``w8aspike``: ``{"group_size": 128, "method": "absmax"|"mse", "quantized": {name: transposed}}``.
  For every listed weight the safetensors hold ``<name>_int8`` (int8 codes, Linear orientation
  ``[..., d_out, d_in]``) and ``<name>_scale`` (fp32 ``[..., d_out, ceil(d_in / group_size)]``),
  one scale per output channel and group of consecutive input channels; the weight is
  ``codes * scale`` in fp32, cast to the activation dtype at each call (the codes stay int8 in
  memory). ``transposed`` marks the routed experts, used as ``[E, Din, Dout]``.
- ``spike``: sbtrain's ``model.spike`` (``mode`` off|eval|train, ``k``, ``max_count``, ``targets``,
  ``spike_down_proj``). The input x of every targeted module is replaced by
  ``V_th * round(x / V_th)`` with ``V_th = mean(|x|) / k`` per token (fp32, clamped to
  ``[-max_count, max_count]`` when set), so a linear layer computes ``V_th * (W s)``; mode ``eval``
  spikes only in eval mode (``from_pretrained`` returns the model in eval mode). MoE: ``router``
  spikes the router input, ``experts`` the rows entering the routed experts' gate/up (their
  down-projection input is never spiked); ``gk_proj`` spikes the GLA gate input only.

Decoding goes through :class:`SbtrainForCausalLM`'s forward and its ``SbtrainCache`` unchanged: the
quantized Linears and the spike hooks act on each token alone (``V_th`` is per token), so cached
decoding and padded batches behave as in the ``hf`` format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_sbtrain import SbtrainConfig
from .modeling_sbtrain import SbtrainForCausalLM, SbtrainMoE

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def spike(x: torch.Tensor, k: float, max_count: int | None = None) -> torch.Tensor:
    """``V_th * round(x / V_th)`` per token (last dim), ``V_th = mean(|x|) / k``, in at least fp32."""
    compute = torch.promote_types(x.dtype, torch.float32)
    v_th = x.to(compute).abs().mean(-1, keepdim=True) / k
    safe = torch.where(v_th > 0, v_th, torch.ones_like(v_th))  # an all-zero token: counts 0
    counts = torch.round(x.to(compute) / safe)
    if max_count is not None:
        counts = counts.clamp(-max_count, max_count)
    return (v_th * counts).to(x.dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` in fp32 (each input channel takes its group's scale), then ``dtype``."""
    expanded = scales.float().repeat_interleave(group_size, dim=-1)[..., : codes.shape[-1]]
    return (codes.float() * expanded).to(dtype)


class W8ALinear(nn.Module):
    """A Linear whose weight is int8 codes and per-group fp32 scales (``weight_int8``, ``weight_scale``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        self.group_size = group_size
        groups = math.ceil(in_features / group_size)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight_int8, self.weight_scale, self.group_size, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class W8AExperts(nn.Module):
    """Routed experts as ``<w>_int8 [E, Dout, Din]`` + ``<w>_scale`` for w in gate/up/down."""

    def __init__(self, experts: nn.Module, group_size: int):
        super().__init__()
        self.group_size = group_size
        for name in EXPERT_WEIGHTS:
            E, d_in, d_out = getattr(experts, name).shape
            self.register_buffer(f"{name}_int8", torch.zeros(E, d_out, d_in, dtype=torch.int8))
            # fp32 explicitly: from_pretrained sets the default dtype to the checkpoint's, and loading
            # casts into the buffer's dtype; bf16 scales would change every dequantized weight.
            self.register_buffer(f"{name}_scale", torch.zeros(E, d_out, math.ceil(d_in / group_size),
                                                              dtype=torch.float32))

    def matrix(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized ``[E, Din, Dout]`` tensor."""
        codes, scales = getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale")
        return dequantize(codes, scales, self.group_size, dtype).transpose(-1, -2)


class W8ASpikeMoE(SbtrainMoE):
    """sbtrain's MoE with the router input and the routed gate/up input spiked (when targeted) and
    the experts' weights dequantized, through SbtrainMoE's hooks; routing, capacity and combine
    are SbtrainMoE's own."""

    spike_router: bool = False
    spike_experts: bool = False
    spike_cfg: dict | None = None

    def _spiked(self, x: torch.Tensor, on: bool) -> torch.Tensor:
        if not on or not spike_active(self.spike_cfg, self.training):
            return x
        return spike(x, float(self.spike_cfg["k"]), self.spike_cfg.get("max_count"))

    def router_input(self, flat: torch.Tensor) -> torch.Tensor:
        return self._spiked(flat, self.spike_router)

    def expert_input(self, rows: torch.Tensor) -> torch.Tensor:
        return self._spiked(rows, self.spike_experts)

    def expert_matrix(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(self.experts, W8AExperts):
            return self.experts.matrix(name, dtype)
        return getattr(self.experts, name).to(dtype)


def spike_active(cfg: dict | None, training: bool) -> bool:
    mode = (cfg or {}).get("mode", "off")
    return mode == "train" or (mode == "eval" and not training)


class SpikeInputHook:
    """Forward pre-hook: spike the first positional input of the module it is registered on."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not spike_active(self.cfg, module.training):
            return None
        return (spike(args[0], float(self.cfg["k"]), self.cfg.get("max_count")), *args[1:])


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def install_w8a(model: nn.Module, quantized: dict, group_size: int) -> None:
    """Swap every quantized Linear for a :class:`W8ALinear` and every quantized expert set for
    :class:`W8AExperts` (fresh int8/scale buffers that ``from_pretrained`` fills)."""
    for name, transposed in quantized.items():
        if transposed:  # "<...>.experts.gate_proj": the experts module holds all three
            path = name.rpartition(".")[0]
            experts = model.get_submodule(path)
            if not isinstance(experts, W8AExperts):
                _replace(model, path, W8AExperts(experts, group_size))
            continue
        path = name.removesuffix(".weight")
        linear = model.get_submodule(path)
        _replace(model, path, W8ALinear(linear.in_features, linear.out_features, linear.bias is not None, group_size))


def install_spiking(model: nn.Module, cfg: dict) -> list[str]:
    """Hooks on the targeted modules (as sbtrain.models.spiking matches them) and the MoE flags."""
    if cfg.get("mode", "off") == "off":
        return []
    wanted = set(cfg.get("targets", [])) | ({"down_proj"} if cfg.get("spike_down_proj") else set())
    names = []
    for name, module in model.named_modules():
        if isinstance(module, W8ASpikeMoE):
            module.spike_cfg = cfg
            module.spike_router, module.spike_experts = "router" in wanted, "experts" in wanted
            continue
        if name.rsplit(".", 1)[-1].removeprefix("linear_") in wanted - {"router", "experts"}:
            module.register_forward_pre_hook(SpikeInputHook(cfg))
            names.append(name)
    return names


class SbtrainW8ASpikeForCausalLM(SbtrainForCausalLM):
    """:class:`SbtrainForCausalLM` with int8 weights (``config.w8aspike``) and spikes (``config.spike``)."""

    def __init__(self, config: SbtrainConfig):
        super().__init__(config)
        quant = dict(getattr(config, "w8aspike", None) or {})
        for name, module in list(self.named_modules()):
            if isinstance(module, SbtrainMoE) and not isinstance(module, W8ASpikeMoE):
                module.__class__ = W8ASpikeMoE  # same state, the spiking forward
        install_w8a(self, dict(quant.get("quantized", {})), int(quant.get("group_size", 128)))
        self.spiked_modules = install_spiking(self, dict(getattr(config, "spike", None) or {}))


__all__ = ["SbtrainW8ASpikeForCausalLM", "W8AExperts", "W8ALinear", "dequantize", "spike"]
