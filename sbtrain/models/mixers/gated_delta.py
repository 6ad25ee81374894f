"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024; the linear mixer of Qwen3-Next), layer kind
``gated_delta``.

Per KV head a state ``S [Dk, Dv]`` follows the gated delta rule (``operators/gated_delta``)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t / sqrt(Dk)

- q/k/v/o: Qwen2's shapes (copied from the teacher on conversion), q and k through SiLU and an L2
  norm per head (the delta rule needs unit keys), no RoPE;
- decay ``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` and write strength
  ``beta = sigmoid(b_proj(x))``, one scalar per KV head and token (Mamba-2 style);
- a per-head RMSNorm on the output before o_proj.
Left out against Qwen3-Next: the short causal convolution on q/k/v and the output gate.

Context parallelism: the generic affine-state form (``ContextParallel.recurrent``). Tensor
parallelism: whole heads per rank (a/b projections and A_log/dt_bias by KV head). Decode: one
fp32 state ``[Hkv, Dk, Dv]`` per layer. Everything else about the kind is declared below.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from operators import ops
from sbtrain.config.model import ModelConfig
from sbtrain.models.layers import RMSNorm, local_tensor
from sbtrain.models.mixers.base import MixerInputs, make_qkvo, project_qkv
from sbtrain.models.mixers.registry import MixerKind, register
from sbtrain.models.mixers.saved_bytes import FP32, Shapes, cp_linear_extra, gla_core, lin_in, rms_saved
from sbtrain.models.tp_styles import ShardParameters, head_norm_style, qkvo_plan, shard_mixer

CHUNK = 64  # operators/gated_delta/chunked.py
A_INIT = 1.0  # exp(A_log) at init
DT_INIT = 0.01  # softplus(dt_bias) at init: a per-token decay of about exp(-0.01)


def delta_core(q, k, v, g, beta, inputs: MixerInputs) -> torch.Tensor:
    """``ops.gated_delta`` over a sequence, ``ops.gated_delta_step`` for one decode token, or the
    context-parallel form; with a cache the final state is kept."""
    cache = inputs.cache
    if inputs.context_parallel is not None:
        return inputs.context_parallel.recurrent(ops.gated_delta, q, k, v, g, beta)
    if cache is not None and cache.state is not None:
        if q.shape[1] != 1:
            raise ValueError(f"decode takes one token at a time after prefill, got {q.shape[1]}")
        o, cache.state = ops.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
        return o.unsqueeze(1)
    o, final = ops.gated_delta(q, k, v, g, beta, output_final_state=cache is not None, cu_seqlens=inputs.cu_seqlens)
    if cache is not None:
        cache.state = final
    return o


class GatedDeltaNet(nn.Module):
    mixer_kind = "gated_delta"

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.head_dim = hd = cfg.resolved_head_dim
        hkv = cfg.num_key_value_heads
        make_qkvo(self, cfg, **kw)
        self.a_proj = nn.Linear(cfg.hidden_size, hkv, bias=False, **kw)
        self.b_proj = nn.Linear(cfg.hidden_size, hkv, bias=False, **kw)
        self.A_log = nn.Parameter(torch.empty(hkv, **kw))
        self.dt_bias = nn.Parameter(torch.empty(hkv, **kw))
        self.g_norm = RMSNorm(hd, cfg.rms_norm_eps, **kw)

    def init_specs(self, std: float) -> dict:
        """A = 1 and softplus(dt_bias) = 0.01 at init (read by :func:`sbtrain.models.build.init_weights`)."""
        return {"A_log": ("const", math.log(A_INIT)), "dt_bias": ("const", math.log(math.expm1(DT_INIT)))}

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 log-decay ``g <= 0`` and write strength ``beta`` ``[B,T,Hkv]``."""
        A_log, dt_bias = local_tensor(self.A_log), local_tensor(self.dt_bias)  # this rank's heads under TP
        g = -A_log.float().exp() * F.softplus(self.a_proj(x).float() + dt_bias.float())
        return g, torch.sigmoid(self.b_proj(x).float())

    def decay_probe(self):
        """(module, its output -> decay in (0, 1)) for the training statistics."""
        def decay(a):
            A_log, dt_bias = local_tensor(self.A_log), local_tensor(self.dt_bias)
            return torch.exp(-A_log.float().exp() * F.softplus(a.float() + dt_bias.float()))
        return self.a_proj, decay

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        q = F.normalize(F.silu(q).float(), dim=-1).to(v.dtype)
        k = F.normalize(F.silu(k).float(), dim=-1).to(v.dtype)
        g, beta = self.gates(x)
        o = delta_core(q, k, v, g, beta, inputs)
        return self.o_proj(self.g_norm(o).flatten(2))


# -- what the rest of the framework needs to know about Gated DeltaNet --------------------------
def gdn_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the chunked (WY) form, C = 64, per query head: forward MACs
    C·(3·Dk + 2·Dv) (k k^T, the WY solve's products, q k^T, the intra-chunk read) + 3·Dk·Dv (the
    state's read, correction and update); x2 FLOPs, x3 forward + backward."""
    d = cfg.resolved_head_dim
    return 6.0 * cfg.num_attention_heads * (CHUNK * 5 * d + 3 * d * d)


def gdn_macs(cfg: ModelConfig, seq_len: int) -> float:
    """Forward MACs per token of the recurrent form: S^T k and the rank-1 update per KV head, the read per query head."""
    d = cfg.resolved_head_dim
    return float((2 * cfg.num_key_value_heads + cfg.num_attention_heads) * d * d)


def gdn_state_bytes(cfg: ModelConfig, seq_len: int, kv_bytes: int) -> int:
    return cfg.num_key_value_heads * cfg.resolved_head_dim ** 2 * FP32


def _activations(s: Shapes, cfg: ModelConfig) -> tuple[int, int]:
    """An estimate (not checked against autograd like GLA's): the projections' inputs, SiLU and the
    L2 norm on q/k, the fp32 gates, the chunked core (GLA's terms as a proxy), g_norm, o_proj's input."""
    N, hq, hkv, D, a = s.N, s.hq, s.hkv, s.D, s.a
    saved = lin_in(s, 5, s.d)  # q, k, v, a, b read the normed input
    saved += N * (hq + hkv) * D * (a + 2 * FP32)  # SiLU input, its fp32 output and the unit vector
    saved += 4 * N * hkv * FP32  # softplus / sigmoid inputs and outputs
    core, work = gla_core(s, hq, False)
    saved += core + cp_linear_extra(s)
    saved += rms_saved(N * hq * D, N * hq, a)
    saved += lin_in(s, 1, hq * D)
    return saved, work


def _tensor_parallel(mixer: GatedDeltaNet, tp_mesh, residual) -> None:
    plan = qkvo_plan(residual)
    plan["a_proj"] = ColwiseParallel()  # one output per KV head
    plan["b_proj"] = ColwiseParallel()
    plan["g_norm"] = head_norm_style()
    shard_mixer(mixer, tp_mesh, residual, plan)
    parallelize_module(mixer, tp_mesh, ShardParameters({"A_log": 0, "dt_bias": 0}))


register(MixerKind(
    name="gated_delta",
    summary="Gated DeltaNet: scalar decay + delta-rule write, constant-size state (no RoPE)",
    build=lambda cfg, device=None, dtype=None: GatedDeltaNet(cfg, device=device, dtype=dtype),
    flops_per_token=gdn_flops,
    core_macs_per_token=gdn_macs,
    decode_cache_bytes=gdn_state_bytes,
    tensor_parallel=_tensor_parallel,
    export_code=Path(__file__).parent / "hf" / "gated_delta.py",
    activations=_activations,
))

__all__ = ["GatedDeltaNet", "delta_core", "gdn_flops", "gdn_macs", "gdn_state_bytes"]
