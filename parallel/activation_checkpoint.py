"""Activation checkpointing of a model's blocks (model-agnostic: any ``nn.ModuleList``).

``full`` recomputes every block in backward; ``selective`` every other block (half the
recompute for about half the saved activations). Applied after TP/CP and before compile and
FSDP, TorchTitan's order.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

MODES = ("none", "selective", "full")


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> int:
    """Wrap blocks in place; returns how many were wrapped."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is unknown; use one of {MODES}")
    if mode == "none":
        return 0
    wrapped = 0
    for i, block in enumerate(blocks):
        if mode == "full" or i % 2 == 0:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped += 1
    return wrapped


def compile_blocks(blocks: nn.ModuleList) -> None:
    """``torch.compile`` each block separately (small graphs, fast compiles, shared code)."""
    for block in blocks:
        block.compile()
