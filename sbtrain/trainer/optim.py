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


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if no_decay(name, param, cfg.no_decay) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
