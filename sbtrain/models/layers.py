"""Small building blocks: RMSNorm, the SwiGLU MLP, rotary glue, feature maps, position ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from operators import ops
from operators.elementwise import rotary_cos_sin, yarn_inv_freq


class RMSNorm(nn.Module):
    """HF-style RMSNorm over the last dim (``weight`` initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU FFN with HF's names: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def local_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a tensor-parallel DTensor parameter (a differentiable view), else ``t``.

    Duck-typed on ``to_local`` so the model code needs no torch.distributed import."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The linear-attention feature map applied to q and k."""
    if kind == "relu":
        return F.relu(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "identity":
        return x
    raise ValueError(f"feature map {kind!r} is unknown; use relu, sigmoid or identity")


def default_position_ids(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, device, offset: int = 0):
    """``[B,T]`` positions: ``offset + arange(T)``, restarting at every document start when packed."""
    pos = torch.arange(offset, offset + seq_len, device=device)
    if cu_seqlens is not None:
        # Subtract each token's document start (cu_seqlens are cumulative ends, first entry 0).
        starts = cu_seqlens[:-1].to(device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
        pos = pos - offset - torch.repeat_interleave(starts, lengths, output_size=seq_len)
    return pos.unsqueeze(0).expand(batch, seq_len)


class Rotary:
    """cos/sin for a batch of positions, computed once per forward and shared by all layers."""

    def __init__(self, position_ids: torch.Tensor, head_dim: int, base: float, yarn=None):
        inv_freq, scale = None, 1.0
        if yarn is not None and yarn.factor != 1:  # a YarnConfig (sbtrain.config.model)
            inv_freq, scale = yarn_inv_freq(head_dim, base, yarn.factor, yarn.original_max_position, yarn.beta_fast,
                                            yarn.beta_slow, yarn.attention_factor, position_ids.device)
        self.cos, self.sin = rotary_cos_sin(position_ids, head_dim, base, inv_freq=inv_freq, scale=scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rotary(x, self.cos, self.sin)
