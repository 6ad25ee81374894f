"""HF side of ``gated_delta``: Gated DeltaNet with the delta rule evaluated token by token (fp32), from
the layer's cached state when there is one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.models.mixers.hf.common import SbtrainRMSNorm, export_mixer, make_qkvo, padding_neutral, project_qkv

# --- exported code below ---


def gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t / sqrt(Dk)``
    per KV head (GQA: query head h reads KV head ``h // (Hq / Hkv)``); q/k unit vectors, g/beta
    [B,T,Hkv]; from ``initial_state`` ``[B,Hkv,Dk,Dv]`` (None: zeros). Returns ``(o, final state)``."""
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(B, T, Hkv, Hq // Hkv, Dk) * Dk**-0.5
    k, v, g, beta = k.to(acc), v.to(acc), g.to(acc), beta.to(acc)
    state = q.new_zeros(B, Hkv, Dk, Dv, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        state = state * g[:, t].exp()[..., None, None]
        read = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        delta = beta[:, t, :, None] * (v[:, t] - read)
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhgk,bhkv->bhgv", qg[:, t], state))
    return torch.stack(outputs, dim=1).reshape(B, T, Hq, Dv).to(q.dtype), state


@export_mixer("gated_delta")
class SbtrainGatedDeltaNet(nn.Module):
    def __init__(self, config, kind: str = "gated_delta"):
        super().__init__()
        self.head_dim = hd = config.head_dim
        hkv = config.num_key_value_heads
        make_qkvo(self, config)
        self.a_proj = nn.Linear(config.hidden_size, hkv, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, hkv, bias=False)
        self.A_log = nn.Parameter(torch.zeros(hkv))
        self.dt_bias = nn.Parameter(torch.zeros(hkv))
        self.g_norm = SbtrainRMSNorm(hd, config.rms_norm_eps)

    def init_own_weights(self, init, std: float) -> None:
        init.zeros_(self.A_log)
        init.constant_(self.dt_bias, -4.600166)  # softplus^-1(0.01), as sbtrain initialises it

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, real=None, cache=None) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        q = F.normalize(F.silu(q).float(), dim=-1).to(v.dtype)
        k = F.normalize(F.silu(k).float(), dim=-1).to(v.dtype)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        g, beta = padding_neutral(real, g, beta)  # a padding token neither decays nor writes the state
        o, state = gated_delta_rule(q, k, v, g, beta, None if cache is None else cache.state)
        if cache is not None:
            cache.state = state
        return self.o_proj(self.g_norm(o).flatten(2))
