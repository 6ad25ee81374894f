"""Spiking activations on a model's linear inputs (``model.spike``, docs/DESIGN_NOTES.md §5).

:func:`apply_spiking` registers a forward pre-hook on every module named in
``model.spike.targets`` (matched by the last component of the module name, ignoring the
``linear_`` prefix of the 76B's separate branch projections) and, with ``spike_down_proj``, on
every ``down_proj``. The hook replaces the module's first input by ``ops.spike(x, k, max_count)``
(``V_th * round(x / V_th)``, straight-through gradient), so the mixers and FFNs need no edits.

Modes (read at call time from the config, so ``model.config.spike.mode`` can be switched after
construction as long as it was not ``off`` at build time, or call :func:`apply_spiking` again):

- ``off``   no hooks are installed;
- ``eval``  spiking only while the module is in eval mode (post-hoc, inference only);
- ``train`` spiking in train mode too: spike-aware training with STE gradients.

What is covered:

- q/k/v read the same input; each projection spikes it itself. The op is deterministic and per
  token, so this equals spiking once and sharing the result (it costs 3 small elementwise ops).
- ``gk_proj`` (the GLA low-rank gate, a Sequential) spikes its input x; the rank-16 bottleneck
  between its two Linears is not spiked.
- ``gate_proj`` / ``up_proj`` / ``down_proj`` cover the dense FFN and the MoE shared expert
  (an MLP of nn.Linear).
- MoE: ``router`` spikes the router input (the router then computes in fp32 as before);
  ``experts`` spikes the rows entering the routed experts' grouped gate/up GEMMs (per row = per
  token, so this matches spiking the MoE input). The routed experts' down-projection input is
  inside ``Experts.forward`` and is NOT spiked, even with ``spike_down_proj``.
- lm_head and the embeddings are never spiked.

Limits: under tensor parallelism the inputs of row-parallel layers (o_proj, down_proj) are
channel-sharded when the hook runs, so V_th would be a per-shard mean: spiking is exact only
without TP (or with TP for q/k/v/gate/up only). ``recorder`` (optional) receives
``(module_name, counts)`` for every spiked call, for statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from operators.spike import spike
from sbtrain.config.model import SpikeConfig

HANDLES_ATTR = "_spike_hook_handles"
HOOKS_ATTR = "_spike_hooks"


def spiked_module_names(model: nn.Module, cfg: SpikeConfig) -> list[str]:
    """Names of the modules whose input :func:`apply_spiking` spikes under ``cfg``."""
    wanted = set(cfg.targets) | ({"down_proj"} if cfg.spike_down_proj else set())
    names = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last.removeprefix("linear_") in wanted:
            names.append(name)
    return names


class SpikeInput:
    """Forward pre-hook: spike the first positional input of the module it is registered on."""

    def __init__(self, name: str, cfg: SpikeConfig, recorder: Callable[[str, torch.Tensor], None] | None = None):
        self.name = name
        self.cfg = cfg
        self.recorder = recorder
        self.enabled = True  # False before model.spike.train_from_step (see set_spiking_step)

    def active(self, module: nn.Module) -> bool:
        mode = self.cfg.mode
        return self.enabled and (mode == "train" or (mode == "eval" and not module.training))

    def __call__(self, module: nn.Module, args: tuple):
        if not args or not self.active(module):
            return None
        x, rest = args[0], args[1:]
        if self.recorder is None:
            return (spike(x, self.cfg.k, self.cfg.max_count), *rest)
        out, counts = spike(x, self.cfg.k, self.cfg.max_count, return_counts=True)
        self.recorder(self.name, counts)
        return (out, *rest)


def remove_spiking(model: nn.Module) -> None:
    """Remove the hooks a previous :func:`apply_spiking` installed."""
    for handle in getattr(model, HANDLES_ATTR, []):
        handle.remove()
    setattr(model, HANDLES_ATTR, [])
    setattr(model, HOOKS_ATTR, [])


def set_spiking_step(model: nn.Module, step: int) -> bool:
    """Turn the hooks on from ``model.spike.train_from_step`` (the trainer calls this before every
    step and evaluation, on every rank, so a resumed run spikes exactly where the original did).
    Returns whether spiking is on."""
    hooks = getattr(model, HOOKS_ATTR, [])
    enabled = all(step >= hook.cfg.train_from_step for hook in hooks)
    for hook in hooks:
        hook.enabled = enabled
    return enabled and bool(hooks)


def apply_spiking(
    model: nn.Module,
    cfg: SpikeConfig | None = None,
    recorder: Callable[[str, torch.Tensor], None] | None = None,
) -> list[str]:
    """Install (or re-install) the spiking hooks; returns the names of the spiked modules.

    ``cfg`` defaults to ``model.config.spike``; mode ``off`` installs nothing."""
    cfg = cfg if cfg is not None else model.config.spike
    remove_spiking(model)
    if cfg.mode == "off":
        return []
    names = spiked_module_names(model, cfg)
    modules = dict(model.named_modules())
    hooks = [SpikeInput(name, cfg, recorder) for name in names]
    handles = [modules[name].register_forward_pre_hook(hook) for name, hook in zip(names, hooks)]
    setattr(model, HANDLES_ATTR, handles)
    setattr(model, HOOKS_ATTR, hooks)
    return names


__all__ = ["SpikeInput", "apply_spiking", "remove_spiking", "set_spiking_step", "spiked_module_names"]
