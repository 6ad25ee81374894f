"""Gated linear attention (GLA), layer kind ``gla``: the 7B's linear mixer, and the linear core the
76B's hybrid branch reuses (:func:`linear_core`, :func:`key_tied_log_decay`).

GQA-aware: k, v and the log-decay g have ``num_key_value_heads`` heads and the state is per KV
head, read by all query heads of its group (k/v are never repeated). Context parallelism: LASP-2
state all-gather or a pipelined scan (``parallel/context_parallel/linear.py``). Decode cache: one
fp32 state ``[Hkv, D, D]`` per layer. HF import: q/k/v/o copied from the teacher's attention; the
gate and the output norm are new.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel

from operators import ops
from sbtrain.config.model import ModelConfig
from sbtrain.models.layers import RMSNorm, feature_map
from sbtrain.models.mixers.base import MixerInputs, make_qkvo, project_qkv
from sbtrain.models.mixers.registry import MixerKind, register
from sbtrain.models.mixers.saved_bytes import FP32, GLA_CHUNK, Shapes, cp_linear_extra, gla_core, lin_in, rms_saved
from sbtrain.models.tp_styles import head_norm_style, qkvo_plan, replicate_on_input, shard_mixer


def linear_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, inputs: MixerInputs):
    """``ops.gla`` over a sequence (training, prefill) or ``ops.gla_step`` for one decode token.

    q ``[B,T,Hq,D]``, k/v/g ``[B,T,Hkv,D]``; scale 1/sqrt(D). With a cache, the final state is
    kept: the chunked op fills it at prefill, the recurrent op advances it token by token.
    """
    cache = inputs.cache
    if inputs.context_parallel is not None:
        return inputs.context_parallel.gla(q, k, v, g)
    if cache is not None and cache.state is not None:
        if q.shape[1] != 1:
            raise ValueError(f"decode takes one token at a time after prefill, got {q.shape[1]}")
        o, cache.state = ops.gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], cache.state)
        return o.unsqueeze(1)
    o, final = ops.gla(q, k, v, g, output_final_state=cache is not None, cu_seqlens=inputs.cu_seqlens)
    if cache is not None:
        cache.state = final
    return o


def key_tied_log_decay(k_pre: torch.Tensor) -> torch.Tensor:
    """``log(1 - sigmoid(k_pre)) = -softplus(k_pre)``: the 76B's decay alpha = 1 - k, computed
    stably (never ``log1p(-k)`` of a rounded sigmoid, never ``1 - k`` as a log-decay)."""
    return -F.softplus(k_pre.float())


class GatedLinearAttention(nn.Module):
    """q/k/v/o as in the Transformer, ReLU feature map, no RoPE, low-rank per-key-dim decay
    ``g = logsigmoid(gk_proj(x)) / gate_normalizer``, per-head RMSNorm before o_proj."""

    mixer_kind = "gla"

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.num_kv_heads = cfg.num_key_value_heads
        self.feature_map = cfg.gla.feature_map
        self.gate_normalizer = cfg.gla.gate_normalizer
        kw = {"device": device, "dtype": dtype}
        make_qkvo(self, cfg, **kw)
        self.gk_proj = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.gla.gate_rank, bias=False, **kw),
            nn.Linear(cfg.gla.gate_rank, self.num_kv_heads * self.head_dim, bias=True, **kw),
        )
        self.g_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, **kw)

    def decay_probe(self):
        """(module, its output -> decay alpha in (0, 1)) for the training statistics."""
        return self.gk_proj, lambda out: torch.exp(F.logsigmoid(out.float()) / self.gate_normalizer)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, self.head_dim)  # under tensor parallelism: this rank's heads
        q, k = feature_map(q, self.feature_map), feature_map(k, self.feature_map)
        g = F.logsigmoid(self.gk_proj(x).float()).view(B, T, -1, self.head_dim) / self.gate_normalizer
        o = linear_core(q, k, v, g, inputs)
        return self.o_proj(self.g_norm(o).flatten(2))


# -- what the rest of the framework needs to know about GLA -------------------------------------
def gla_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the chunked GLA core (C = 64): 3·Hq·(2·C·(Dk+Dv) + 4·Dk·Dv)."""
    hd = cfg.resolved_head_dim
    return 3.0 * cfg.num_attention_heads * (2 * GLA_CHUNK * (2 * hd) + 4 * hd * hd)


def gla_macs(cfg: ModelConfig, seq_len: int) -> float:
    """Forward MACs per token of the recurrent form: the state update (per KV head) and its read (per query head)."""
    d = cfg.resolved_head_dim
    return float((cfg.num_key_value_heads + cfg.num_attention_heads) * d * d)


def gla_state_bytes(cfg: ModelConfig, seq_len: int, kv_bytes: int) -> int:
    """One fp32 state ``[Hkv, D, D]``, whatever the context length."""
    return cfg.num_key_value_heads * cfg.resolved_head_dim ** 2 * FP32


def gla_core_saved(s: Shapes) -> tuple[int, int]:
    """(saved, workspace) of the GLA op under context parallelism or not."""
    core, work = gla_core(s, s.hq, s.a == FP32 and s.T % GLA_CHUNK == 0)
    return core + cp_linear_extra(s), work


def _activations(s: Shapes, cfg: ModelConfig) -> tuple[int, int]:
    N, hq, hkv, D, a = s.N, s.hq, s.hkv, s.D, s.a
    saved = lin_in(s, 4, s.d)  # q, k, v and the gate's first stage read the normed input
    saved += N * (hq + hkv) * D * a  # relu(q), relu(k): ReLU saves its output
    saved += lin_in(s, 1, s.gate_rank)  # the gate's second stage input
    saved += 2 * N * hkv * D * FP32  # logsigmoid of the fp32 gate: its input and buffer
    core, work = gla_core_saved(s)
    saved += core
    saved += rms_saved(N * hq * D, N * hq, a)  # g_norm on the GLA output
    saved += lin_in(s, 1, hq * D)  # o_proj input
    return saved, work


def _tensor_parallel(mixer: GatedLinearAttention, tp_mesh, residual) -> None:
    plan = qkvo_plan(residual)
    plan["gk_proj.1"] = ColwiseParallel()  # per KV head, like k
    plan["g_norm"] = head_norm_style()
    shard_mixer(mixer, tp_mesh, residual, plan)
    replicate_on_input(mixer.gk_proj[0], tp_mesh)  # rank gate_rank: replicated


register(MixerKind(
    name="gla",
    summary="gated linear attention: per-key-dim decay, constant-size state (no RoPE)",
    build=lambda cfg, device=None, dtype=None: GatedLinearAttention(cfg, device=device, dtype=dtype),
    flops_per_token=gla_flops,
    core_macs_per_token=gla_macs,
    decode_cache_bytes=gla_state_bytes,
    tensor_parallel=_tensor_parallel,
    export_code=Path(__file__).parent / "hf" / "gla.py",
    activations=_activations,
))

__all__ = ["GatedLinearAttention", "gla_core_saved", "gla_flops", "gla_macs", "gla_state_bytes",
           "key_tied_log_decay", "linear_core"]
