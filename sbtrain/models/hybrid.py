"""The 76B's intra-layer parallel hybrid mixer: a softmax branch (full or sliding-window, with
learned sink tokens, RoPE) beside a key-tied linear branch (sigmoid feature map, no RoPE,
log-decay ``-softplus(k_pre)``) on the same input.

Merge: ``o_proj(beta_s * RMSNorm(softmax_out) + beta_l * RMSNorm(linear_out))`` with per-head
RMSNorms and per-channel betas (init ``beta_init``). With ``share_branch_projections=False``
the linear branch has its own ``linear_{q,k,v,o}_proj`` and the two o_proj outputs are averaged.
"""

from __future__ import annotations

import torch
from torch import nn

from sbtrain.config.model import ModelConfig
from sbtrain.models.attention import MixerInputs, make_qkvo, project_qkv, softmax_core
from sbtrain.models.layers import RMSNorm, feature_map, local_tensor
from sbtrain.models.linear_attention import key_tied_log_decay, linear_core


class HybridAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.head_dim = hd = cfg.resolved_head_dim
        self.window = window
        self.shared = cfg.hybrid.share_branch_projections
        self.feature_map = cfg.hybrid.feature_map
        self.beta_init = cfg.hybrid.beta_init
        make_qkvo(self, cfg, **kw)
        if not self.shared:
            make_qkvo(self, cfg, prefix="linear_", **kw)
        S, hkv = cfg.hybrid.num_sink_tokens, cfg.num_key_value_heads
        if S:
            self.sink_k = nn.Parameter(torch.empty(S, hkv, hd, **kw))
            self.sink_v = nn.Parameter(torch.empty(S, hkv, hd, **kw))
        else:
            self.register_parameter("sink_k", None)
            self.register_parameter("sink_v", None)
        self.attn_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)
        self.linear_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)
        channels = cfg.num_attention_heads * hd
        self.beta_attn = nn.Parameter(torch.full((channels,), self.beta_init, **kw))
        self.beta_linear = nn.Parameter(torch.full((channels,), self.beta_init, **kw))

    def init_specs(self, std: float) -> dict:
        """Init of the parameters outside nn.Linear / RMSNorm, by name (read by
        :func:`sbtrain.models.build.init_weights`, which draws each from its own seed)."""
        specs = {"beta_attn": ("const", self.beta_init), "beta_linear": ("const", self.beta_init)}
        if self.sink_k is not None:
            specs.update(sink_k=("normal", std), sink_v=("normal", std))
        return specs

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        # Under tensor parallelism sinks (by KV head) and betas (by channel) are sharded DTensors:
        # this rank uses its slice, matching its heads of q/k/v.
        sink_k, sink_v = local_tensor(self.sink_k), local_tensor(self.sink_v)
        beta_attn, beta_linear = local_tensor(self.beta_attn), local_tensor(self.beta_linear)
        q_pre, k_pre, v = project_qkv(self, x, self.head_dim)
        attn = softmax_core(
            inputs.rotary(q_pre), inputs.rotary(k_pre), v,
            window=self.window, inputs=inputs, sink_k=sink_k, sink_v=sink_v,
        )
        if not self.shared:
            q_pre, k_pre, v = project_qkv(self, x, self.head_dim, prefix="linear_")
        g = key_tied_log_decay(k_pre)
        lin = linear_core(feature_map(q_pre, self.feature_map), feature_map(k_pre, self.feature_map), v, g, inputs)
        attn = beta_attn * self.attn_norm(attn).flatten(2)
        lin = beta_linear * self.linear_norm(lin).flatten(2)
        if self.shared:
            return self.o_proj(attn + lin)
        return 0.5 * (self.o_proj(attn) + self.linear_o_proj(lin))
