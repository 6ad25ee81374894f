"""Activation checkpointing of a model's blocks (model-agnostic: any ``nn.ModuleList``).

``full`` recomputes every block in backward; ``selective`` every other block (half the
recompute for about half the saved activations). Applied after TP/CP and before compile and
FSDP, TorchTitan's order.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from operators.registry import prepare_for_compile

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


def compile_blocks(blocks: nn.ModuleList, **compile_kwargs) -> None:
    """``torch.compile`` each block separately (small graphs, fast compiles, shared code).

    The op registry's caches are filled first, so that tracing its backend walk writes nothing
    (see ``operators.registry.prepare_for_compile`` and docs/COMPILE.md). ``compile_kwargs`` go
    to ``nn.Module.compile`` (the trainer passes none: inductor, default mode)."""
    prepare_for_compile()
    for block in blocks:
        block.compile(**compile_kwargs)
