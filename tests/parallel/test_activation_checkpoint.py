"""Activation checkpointing wraps the blocks it should, and the wrapped model computes the same."""

import pytest
import torch
from torch import nn

from parallel.activation_checkpoint import apply_activation_checkpointing


def _blocks():
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))


@pytest.mark.parametrize("mode, wrapped", [("none", 0), ("selective", 2), ("full", 4)])
def test_modes_wrap_blocks_and_keep_gradients(mode, wrapped):
    ref, blocks = _blocks(), _blocks()
    assert apply_activation_checkpointing(blocks, mode) == wrapped
    assert sum(type(b).__name__ == "CheckpointWrapper" for b in blocks) == wrapped
    x = torch.randn(3, 8)
    for model in (ref, blocks):
        y = x
        for b in model:
            y = b(y)
        y.sum().backward()
    for p_ref, p in zip(ref.parameters(), blocks.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="mode 'some' is unknown; use one of"):
        apply_activation_checkpointing(_blocks(), "some")
