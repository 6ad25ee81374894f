"""HF side of ``hybrid_full`` / ``hybrid_swa``: a softmax branch with learned sinks beside a key-tied
linear branch (``g = -softplus(k_pre)``, sigmoid feature map), merged with per-head norms and betas.
With a decode cache the layer keeps both branches' states: the softmax branch's keys/values (all, or a
ring of W) and the linear branch's recurrent state; the sinks are parameters, never cached."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sbtrain.models.mixers.hf.attention import cached_softmax_attention
from sbtrain.models.mixers.hf.common import (
    SbtrainRMSNorm,
    apply_rotary,
    export_mixer,
    feature_map,
    hf_window,
    make_qkvo,
    project_qkv,
)
from sbtrain.models.mixers.hf.gla import cached_linear_attention

# --- exported code below ---


@export_mixer("hybrid_full", "hybrid_swa")
class SbtrainHybridAttention(nn.Module):
    def __init__(self, config, kind: str):
        super().__init__()
        hd = self.head_dim = config.head_dim
        self.window = hf_window(config, kind == "hybrid_swa")
        hybrid = config.hybrid
        self.shared = bool(hybrid.get("share_branch_projections", True))
        self.feature_map = hybrid.get("feature_map", "sigmoid")
        self.beta_init = float(hybrid.get("beta_init", 0.5))
        make_qkvo(self, config)
        if not self.shared:
            make_qkvo(self, config, prefix="linear_")
        sinks = int(hybrid.get("num_sink_tokens", 0))
        if sinks:
            self.sink_k = nn.Parameter(torch.zeros(sinks, config.num_key_value_heads, hd))
            self.sink_v = nn.Parameter(torch.zeros(sinks, config.num_key_value_heads, hd))
        else:
            self.sink_k = self.sink_v = None
        self.attn_norm = SbtrainRMSNorm(hd, config.rms_norm_eps)
        self.linear_norm = SbtrainRMSNorm(hd, config.rms_norm_eps)
        channels = config.num_attention_heads * hd
        self.beta_attn = nn.Parameter(torch.full((channels,), self.beta_init))
        self.beta_linear = nn.Parameter(torch.full((channels,), self.beta_init))

    def init_own_weights(self, init, std: float) -> None:
        """Init of the parameters outside nn.Linear / RMSNorm (``_init_weights`` calls it)."""
        for p in (self.sink_k, self.sink_v):
            if p is not None:
                init.normal_(p, std=std)
        init.constant_(self.beta_attn, self.beta_init)
        init.constant_(self.beta_linear, self.beta_init)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, real=None, cache=None) -> torch.Tensor:
        q_pre, k_pre, v = project_qkv(self, x, self.head_dim)
        attn = cached_softmax_attention(apply_rotary(q_pre, cos, sin), apply_rotary(k_pre, cos, sin), v, self.window,
                                        real, cache, self.sink_k, self.sink_v)
        if not self.shared:
            q_pre, k_pre, v = project_qkv(self, x, self.head_dim, prefix="linear_")
        g = -F.softplus(k_pre.float())  # log(1 - sigmoid(k_pre)), the key-tied decay, computed stably
        fm = self.feature_map
        lin = cached_linear_attention(feature_map(q_pre, fm), feature_map(k_pre, fm), v, g, real, cache)
        attn = self.beta_attn * self.attn_norm(attn).flatten(2)
        lin = self.beta_linear * self.linear_norm(lin).flatten(2)
        if self.shared:
            return self.o_proj(attn + lin)
        return 0.5 * (self.o_proj(attn) + self.linear_o_proj(lin))
