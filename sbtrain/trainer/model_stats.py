"""Model statistics during training (``observe.model_stats.every``): what the loss does not show.

Per ``every`` optimizer steps one record of kind ``model_stats`` goes to metrics.jsonl and wandb:

- ``grad_norm``: the L2 norm of each layer's gradient (``layers.N``, plus ``embed_tokens``,
  ``norm``, ``lm_head``), taken when the gradients are final and before clipping
  (``Callback.on_before_optimizer_step``); sharded (DTensor) gradients are reduced per mesh, so
  the figure is the full gradient's. Not available under the DeepSpeed engine (it owns the grads).
- ``gla_decay``: per linear-attention layer, the decay ``alpha = exp(g)`` of every key dimension
  averaged over the step's tokens (``alpha_d``), then over dimensions: ``alpha_mean``,
  ``alpha_std`` (spread across dimensions), and the effective memory length ``1 / (1 - alpha_d)``
  (tokens): ``memory_mean``, ``memory_median``. The gates are *recorded* from the training
  forward itself (a forward hook on ``gk_proj`` — the 76B's key-tied branch: on its k projection,
  ``alpha = 1 - sigmoid(k_pre)``): no extra forward, and hooks exist only during the sampled step.
- ``moe``: per MoE layer, the fraction of routed assignments each expert received (``load``,
  sums to 1), the dropped fraction under a capacity factor (``drop_rate``), and the mean
  per-token entropy of the router's probabilities in nats (``router_entropy``; sigmoid routers:
  of the normalised scores).
- ``spike_rate``: per layer, the fraction of non-zero spike counts over every spiked input of
  that layer (the spiking recorder of ``sbtrain.models.spiking``), when spiking is active in
  training (``model.spike.mode=train``).

Gates, loads, entropies and spike counts are summed over the micro batches of the step and over
the data/context-parallel ranks (one all-reduce), so they describe the global batch; under tensor
parallelism the decay statistics cover rank 0's heads. The collector runs on every rank. Hooks
skip evaluation forwards (module in eval mode, or no grad); activation-checkpoint recomputation
fires them twice, which doubles numerators and denominators alike and leaves every figure as is.
"""

from __future__ import annotations

import math
import re

import torch
from torch.distributed.tensor import DTensor

from sbtrain.models.spiking import SpikeInput
from sbtrain.trainer.callbacks import Callback

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def group_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3``; ``lm_head.weight`` -> ``lm_head``."""
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    match = LAYER.search(name)
    if match:
        return f"layers.{match.group(1)}"
    return name.removeprefix("module.").removeprefix("model.").split(".", 1)[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of each layer's gradient (the full gradient's, also when it is sharded)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else "local"
            groups.setdefault((group_of(name), mesh), []).append(p.grad)
    squares: dict[str, torch.Tensor] = {}
    for (layer, _), grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # a collective: every rank walks the same groups in the same order
        squares[layer] = squares.get(layer, 0.0) + norm.double().cpu() ** 2
    return {layer: math.sqrt(float(sq)) for layer, sq in squares.items()}


class _Sums:
    """Running float64 sums of one layer's statistic, kept on the device (no sync per call)."""

    def __init__(self):
        self.values: torch.Tensor | None = None
        self.count = 0.0

    def add(self, values: torch.Tensor, count: float) -> None:
        values = values.detach().double()
        self.values = values if self.values is None else self.values + values
        self.count += count


class ModelStatsCallback(Callback):
    all_ranks = True  # sharded gradient norms and the statistics' all-reduce are collectives

    def __init__(self, every: int):
        self.every = every
        self.handles: list = []
        self.spike_hooks: list[SpikeInput] = []
        self.decay: dict[str, _Sums] = {}
        self.moe: dict[str, dict] = {}
        self.spikes: dict[str, list] = {}
        self.grad_norms: dict[str, float] = {}
        self.armed = False  # hooks installed for the current step
        self.last: dict | None = None  # the latest record (every rank computes it; rank 0 logs it)

    # -- arming: hooks exist only during a sampled step ------------------------------------------
    def _due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def on_fit_start(self, trainer):
        if self._due(trainer.step + 1):
            self._arm(trainer.model)

    def _arm(self, model: torch.nn.Module) -> None:
        from sbtrain.models.ffn.moe import MoE

        self.decay, self.moe, self.spikes, self.grad_norms = {}, {}, {}, {}
        self.armed = True
        for name, module in model.named_modules():
            layer = group_of(name)
            probe = getattr(module, "decay_probe", None)  # a mixer with a data-dependent decay says where
            if probe is not None:
                source, to_decay = probe()
                self.decay[layer] = _Sums()
                self.handles.append(source.register_forward_hook(self._decay_hook(layer, to_decay)))
            elif isinstance(module, MoE):
                self.moe[layer] = {"counts": _Sums(), "dropped": 0, "entropy": _Sums()}
                self.handles.append(module.register_forward_hook(self._moe_hook(layer)))
                self.handles.append(module.router.register_forward_hook(self._router_hook(layer)))
            for hook in getattr(module, "_forward_pre_hooks", {}).values():
                if isinstance(hook, SpikeInput):
                    self.spikes.setdefault(group_of(hook.name), [0, 0])
                    hook.recorder = self._record_spikes
                    self.spike_hooks.append(hook)

    def _disarm(self) -> None:
        for handle in self.handles:
            handle.remove()
        for hook in self.spike_hooks:
            hook.recorder = None
        self.handles, self.spike_hooks = [], []
        self.armed = False

    # -- hooks ------------------------------------------------------------------------------------
    def _decay_hook(self, layer: str, to_decay):
        def hook(module, args, out):
            if module.training:
                with torch.no_grad():
                    self._add_decay(layer, to_decay(_local(out)))
        return hook

    def _add_decay(self, layer: str, alpha: torch.Tensor) -> None:
        flat = alpha.reshape(-1, alpha.shape[-1])
        self.decay[layer].add(flat.sum(0, dtype=torch.float64), flat.shape[0])

    def _moe_hook(self, layer: str):
        def hook(module, args, out):
            if module.training and module.last_tokens_per_expert is not None:
                self.moe[layer]["counts"].add(module.last_tokens_per_expert, 1)
                self.moe[layer]["dropped"] += module.last_dropped
        return hook

    def _router_hook(self, layer: str):
        def hook(module, args, out):
            if not module.training:
                return
            with torch.no_grad():
                x = _local(args[0]).float()
                w = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight
                logits = x @ w.float().t()
                if module.cfg.router_activation == "softmax":
                    probs = logits.softmax(-1)
                else:
                    scores = torch.sigmoid(logits)
                    probs = scores / scores.sum(-1, keepdim=True)
                self.moe[layer]["entropy"].add(torch.special.entr(probs).sum(), x.shape[0])
        return hook

    def _record_spikes(self, name: str, counts: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return  # an evaluation forward (spike mode eval), not the training step
        sums = self.spikes[group_of(name)]
        sums[0] = sums[0] + (counts != 0).sum()
        sums[1] += counts.numel()

    # -- collection -------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer):
        if self.armed:
            self.grad_norms = layer_grad_norms(trainer.model)

    def on_step_end(self, trainer, metrics):
        if self.armed:
            self._disarm()
            self.last = self._finish(trainer)
            if trainer._rank0:
                trainer.log_record("model_stats", self.last)
        if self._due(trainer.step + 1):
            self._arm(trainer.model)

    def on_fit_end(self, trainer):
        self._disarm()

    def _finish(self, trainer) -> dict:
        """One all-reduce of every sum (same layout on every rank), then the derived figures."""
        parts, layout = [], []
        for layer, sums in self.decay.items():
            if sums.values is not None:
                parts += [sums.values.cpu(), torch.tensor([sums.count], dtype=torch.float64)]
                layout.append(("decay", layer, sums.values.numel()))
        for layer, moe in self.moe.items():
            counts, entropy = moe["counts"].values, moe["entropy"].values
            if counts is not None and entropy is not None:
                parts += [counts.cpu(), torch.tensor([moe["dropped"], float(entropy), moe["entropy"].count],
                                                     dtype=torch.float64)]
                layout.append(("moe", layer, counts.numel()))
        for layer, (nonzero, total) in self.spikes.items():
            parts.append(torch.tensor([float(nonzero), float(total)], dtype=torch.float64))
            layout.append(("spike", layer, 0))
        # Reduced on the model's device (an NCCL group takes no CPU tensors), read back on the host.
        flat = trainer.all_reduce(torch.cat(parts).to(trainer.device)).cpu() if parts else \
            torch.zeros(0, dtype=torch.float64)
        record = {"step": trainer.step, "grad_norm": self.grad_norms, "gla_decay": {}, "moe": {}, "spike_rate": {}}
        at = 0
        for kind, layer, n in layout:
            if kind == "decay":
                alpha_d = flat[at:at + n] / flat[at + n]
                memory = 1.0 / (1.0 - alpha_d).clamp_min(1e-12)
                record["gla_decay"][layer] = {
                    "alpha_mean": float(alpha_d.mean()), "alpha_std": float(alpha_d.std(unbiased=False)),
                    "memory_mean": float(memory.mean()), "memory_median": float(memory.quantile(0.5)),
                }
                at += n + 1
            elif kind == "moe":
                counts, (dropped, entropy, tokens) = flat[at:at + n], flat[at + n:at + n + 3].tolist()
                assigned = float(counts.sum())
                record["moe"][layer] = {
                    "load": (counts / max(assigned, 1.0)).tolist(), "drop_rate": dropped / max(assigned, 1.0),
                    "router_entropy": entropy / max(tokens, 1.0),
                }
                at += n + 3
            else:
                nonzero, total = flat[at:at + 2].tolist()
                if total:
                    record["spike_rate"][layer] = nonzero / total
                at += 2
        return record


__all__ = ["ModelStatsCallback", "group_of", "layer_grad_norms"]
