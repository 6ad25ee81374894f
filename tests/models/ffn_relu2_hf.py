"""HF side of the test-only FFN kind ``relu2`` (tests/models/test_ffn_registry.py), in the form every
kind's fragment takes: imports for linting, then the code the exporter pastes."""

from __future__ import annotations

import torch
from torch import nn

from sbtrain.models.mixers.hf.common import export_ffn


# --- exported code below ---
@export_ffn("relu2")
class SbtrainReLU2FFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())
