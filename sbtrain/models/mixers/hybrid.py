"""The 76B's intra-layer parallel hybrid mixer: a softmax branch (full or sliding-window, with
learned sink tokens, RoPE) beside a key-tied linear branch (sigmoid feature map, no RoPE,
log-decay ``-softplus(k_pre)``) on the same input.

Merge: ``o_proj(beta_s * RMSNorm(softmax_out) + beta_l * RMSNorm(linear_out))`` with per-head
RMSNorms and per-channel betas (init ``beta_init``). With ``share_branch_projections=False``
the linear branch has its own ``linear_{q,k,v,o}_proj`` and the two o_proj outputs are averaged.

Layer kinds ``hybrid_full`` and ``hybrid_swa`` (the softmax branch's reach). Each branch keeps its
own context-parallel form and decode cache; FLOPs, MACs and cache bytes are the two branches'
sums. HF import: both branches start from the teacher's q/k/v/o (the separate ``linear_*``
projections copy them too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from sbtrain.config.model import ModelConfig
from sbtrain.models.layers import RMSNorm, feature_map, local_tensor
from sbtrain.models.mixers.attention import (
    halo_of,
    kv_cache_bytes,
    softmax_core,
    softmax_flops,
    softmax_macs,
    window_of,
)
from sbtrain.models.mixers.base import MixerInputs, make_qkvo, project_qkv
from sbtrain.models.mixers.gla import (
    gla_core_saved,
    gla_flops,
    gla_macs,
    gla_state_bytes,
    key_tied_log_decay,
    linear_core,
)
from sbtrain.models.mixers.registry import MixerKind, register
from sbtrain.models.mixers.saved_bytes import FP32, Shapes, lin_in, rms_saved, rotary_per_layer, sdpa_core
from sbtrain.models.tp_styles import ShardParameters, head_norm_style, qkvo_plan, shard_mixer


class HybridAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, device=None, dtype=None):
        super().__init__()
        self.mixer_kind = "hybrid_full" if window is None else "hybrid_swa"
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

    def decay_probe(self):
        """(module, its output -> decay alpha in (0, 1)) for the training statistics: alpha = 1 - sigmoid(k_pre)."""
        return (self.k_proj if self.shared else self.linear_k_proj), lambda out: torch.sigmoid(-out.float())

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


# -- what the rest of the framework needs to know about the hybrid -------------------------------
def _activations(windowed: bool):
    def saved(s: Shapes, cfg: ModelConfig) -> tuple[int, int]:
        N, hq, hkv, D, a = s.N, s.hq, s.hkv, s.D, s.a
        window = s.window if windowed else None
        shared = cfg.hybrid.share_branch_projections
        attn, out_copy, work = sdpa_core(s, window, halo_of(s, window))  # with the learned sinks
        total = lin_in(s, 3 if shared else 6, s.d) + rotary_per_layer(s) + attn
        total += N * hkv * D * FP32  # k_pre.float(), saved by softplus (the decay)
        total += N * (hq + hkv) * D * a  # sigmoid(q), sigmoid(k): Sigmoid saves its output
        core, gla_work = gla_core_saved(s)
        total += core
        # attn_norm: in fp32 its input is the attention output already kept (the kernel's output,
        # or the reshaped copy of the windowed path, counted here); in bf16 a fresh fp32 copy.
        attn_x = out_copy if a == FP32 else N * hq * D * FP32
        total += attn_x + N * hq * FP32 + N * hq * D * a
        total += rms_saved(N * hq * D, N * hq, a)  # linear_norm on the GLA output
        total += 2 * N * hq * D * FP32  # beta * norm(.): each saves the fp32 norm output
        total += lin_in(s, 1, hq * D) * (1 if shared else 2)  # o_proj input(s)
        return total, max(work, gla_work)
    return saved


def _tensor_parallel(mixer: HybridAttention, tp_mesh, residual) -> None:
    plan = qkvo_plan(residual)
    if not mixer.shared:
        plan.update(qkvo_plan(residual, prefix="linear_"))
    plan["attn_norm"] = head_norm_style()
    plan["linear_norm"] = head_norm_style()
    shard_mixer(mixer, tp_mesh, residual, plan)
    # Sinks by KV head, betas by channel, matching this rank's heads of q/k/v.
    parallelize_module(mixer, tp_mesh, ShardParameters({"sink_k": 1, "sink_v": 1, "beta_attn": 0, "beta_linear": 0}))


def _hf_source(name: str) -> str:
    """The separate linear branch starts from the teacher's q/k/v/o too."""
    return name.removeprefix("linear_")


def _info(cfg: ModelConfig) -> dict:
    shared = cfg.hybrid.share_branch_projections
    return {"share_branch_projections": shared,
            "branch_projections": "shared: one q/k/v/o read by both branches" if shared
            else "separate: each branch has its own q/k/v/o, o outputs averaged"}


for _name, _windowed in (("hybrid_full", False), ("hybrid_swa", True)):
    register(MixerKind(
        name=_name,
        summary=("intra-layer hybrid: " + ("full" if not _windowed else "sliding-window")
                 + " softmax attention with sinks beside a key-tied linear branch"),
        build=lambda cfg, device=None, dtype=None, _w=_windowed: HybridAttention(
            cfg, window_of(cfg, _w), device=device, dtype=dtype),
        flops_per_token=lambda cfg, T, _w=_windowed: softmax_flops(cfg, T, window_of(cfg, _w)) + gla_flops(cfg, T),
        core_macs_per_token=lambda cfg, T, _w=_windowed: (
            softmax_macs(cfg, T, window_of(cfg, _w), cfg.hybrid.num_sink_tokens) + gla_macs(cfg, T)),
        decode_cache_bytes=lambda cfg, T, b, _w=_windowed: (
            kv_cache_bytes(cfg, T, b, window_of(cfg, _w)) + gla_state_bytes(cfg, T, b)),
        tensor_parallel=_tensor_parallel,
        export_code=Path(__file__).parent / "hf" / "hybrid.py",
        uses_rope=True,
        attends_all=not _windowed,
        hf_source=_hf_source,
        info=_info,
        activations=_activations(_windowed),
    ))
