"""HF side of the ``dense`` FFN kind: the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.models.mixers.hf.common import export_ffn


# --- exported code below ---
class SbtrainMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@export_ffn("dense")
class SbtrainDenseFFN(SbtrainMLP):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.intermediate_size)
