"""AdamW with parameter groups, and learning-rate schedules as pure functions of the step.

A schedule that is a function of the step needs no state of its own: resuming restores the
step and the learning rate follows exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCHEDULES = ("cosine", "wsd", "constant", "linear")


def no_decay(name: str, param: torch.Tensor, patterns: Iterable[str]) -> bool:
    """Norm weights, biases and other vectors never decay; names matching a pattern neither."""
    return param.ndim < 2 or any(p in name for p in patterns)


def is_new_param(name: str, cfg) -> bool:
    """A parameter that conversion added (gates, branch norms, betas, sinks, router): matched by
    name against ``optim.new_params.patterns``."""
    return any(p in name for p in cfg.new_params.patterns)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over four groups: (body | new) x (decay | no decay). Each group carries its
    ``role`` so that :func:`apply_lr` can give the new parameters their own schedule."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            role = "new" if is_new_param(name, cfg) else "body"
            groups.setdefault((role, no_decay(name, param, cfg.no_decay)), []).append(param)
    order = [("body", False), ("body", True), ("new", False), ("new", True)]
    groups = [
        {"params": groups[key], "weight_decay": 0.0 if key[1] else cfg.weight_decay, "role": key[0]}
        for key in order if groups.get(key)
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        foreach=cfg.foreach,
    )


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    cosine: linear warmup, then cosine from ``lr`` to ``lr * min_lr_ratio``.
    wsd: warmup, stable at ``lr``, then a linear decay over the last ``decay_fraction`` of steps.
    linear: warmup, then linear to ``lr * min_lr_ratio``. constant: warmup, then ``lr``.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return peak + (floor - peak) * progress
    if cfg.schedule == "wsd":
        decay_start = 1.0 - cfg.decay_fraction
        if progress <= decay_start:
            return peak
        return peak + (floor - peak) * (progress - decay_start) / max(cfg.decay_fraction, 1e-12)
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not known; use one of {', '.join(SCHEDULES)}")


def new_params_lr_at(step: int, total_steps: int, cfg) -> float:
    """The new parameters' schedule: the body's shape with their own peak and warmup."""
    new = cfg.new_params
    lr = cfg.lr if new.lr is None else new.lr
    warmup = cfg.warmup_steps if new.warmup_steps is None else new.warmup_steps
    return lr_at(step, total_steps, _Schedule(cfg, lr, warmup))


class _Schedule:
    def __init__(self, cfg, lr: float, warmup_steps: int):
        self.lr, self.warmup_steps = lr, warmup_steps
        self.min_lr_ratio, self.schedule, self.decay_fraction = cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction


def apply_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg) -> float:
    """Set every group's lr for ``step``; returns the body's. During the first
    ``new_params.freeze_body_steps`` steps the body's lr is 0: only the new parameters train."""
    body = 0.0 if step < cfg.new_params.freeze_body_steps else lr_at(step, total_steps, cfg)
    new = new_params_lr_at(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = new if group.get("role") == "new" else body
    return body
