"""Standalone Hugging Face modeling code of an exported sbtrain model (plain PyTorch).

Copied into every exported folder next to ``configuration_sbtrain.py`` and loaded with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. It imports only torch
and transformers (users load it without sbtrain) and mirrors sbtrain's forward exactly, with
the same tensor names, so the safetensors load without renaming:

- ``full`` / ``swa``: softmax attention with RoPE (rotate-half), SWA sees W past tokens + the
  current one (``config.sliding_window`` is HF's W + 1);
- ``gla``: ReLU (configurable) feature map, no RoPE, low-rank per-key-dim log-decay
  ``logsigmoid(gk_proj(x)) / gate_normalizer`` per KV head, per-head ``g_norm`` before o_proj;
- ``hybrid_full`` / ``hybrid_swa``: a softmax branch with learned sinks beside a key-tied linear
  branch (``g = -softplus(k_pre)``, sigmoid feature map), merged with per-head norms and betas;
- FFN: SwiGLU, or MoE (fp32 router, top-k, optional shared expert, experts ``[E, Din, Dout]``).

Linear attention runs in a chunked form whose exponents are all <= 0 (stable in fp32).
There is no decode cache yet: ``use_cache`` is False and ``generate()`` recomputes the whole
sequence at every step (O(T^2) work for T generated tokens; correct, not fast).
Padding is not supported: an ``attention_mask`` with zeros is an error.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sbtrain import SbtrainConfig

try:  # transformers >= 5: these skip tensors already loaded from the checkpoint
    from transformers import initialization as hf_init
except ImportError:  # transformers 4.x initialises before loading, so plain torch init is right
    hf_init = nn.init

GLA_CHUNK = 64


class SbtrainRMSNorm(nn.Module):
    """HF RMSNorm numerics: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SbtrainMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


FEATURE_MAPS = {"relu": F.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"feature map {kind!r} is unknown; use one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[kind](x)


def rope_inv_freq(dim: int, base: float, yarn: dict, device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale: plain RoPE (HF's formula), or YaRN when
    ``yarn["factor"] > 1`` (HF's rope_type yarn: NTK-by-parts ramp between beta_fast and beta_slow
    rotations over the original context, cos/sin scaled by 0.1 ln(factor) + 1 unless given)."""
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    factor = float(yarn.get("factor", 1.0))
    if factor == 1.0:
        return plain, 1.0
    original = yarn["original_max_position"]

    def rotations_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(rotations_dim(yarn.get("beta_fast", 32.0))), 0)
    high = min(math.ceil(rotations_dim(yarn.get("beta_slow", 1.0))), dim - 1)
    high = high + 0.001 if low == high else high
    keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    scale = yarn.get("attention_factor")
    return plain / factor * (1 - keep) + plain * keep, float(scale if scale is not None else 0.1 * math.log(factor) + 1)


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, base: float,
                   yarn: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin ``[B,T,D]`` (rotate-half layout)."""
    inv_freq, scale = rope_inv_freq(dim, base, yarn or {}, position_ids.device)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def softmax_attention(q, k, v, window: int | None, sink_k=None, sink_v=None) -> torch.Tensor:
    """Causal attention by explicit scores: q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]``; ``window`` = W past
    keys + the current one; sinks ``[S,Hkv,D]`` are visible to every query. fp32 math."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    pos = torch.arange(T, device=q.device)
    mask = pos.unsqueeze(0) <= pos.unsqueeze(1)  # [query, key]
    if window is not None:
        mask &= pos.unsqueeze(1) - pos.unsqueeze(0) <= window
    if sink_k is not None:
        S = sink_k.shape[0]
        k = torch.cat([sink_k.unsqueeze(0).expand(B, S, Hkv, D).to(k.dtype), k], dim=1)
        v = torch.cat([sink_v.unsqueeze(0).expand(B, S, Hkv, D).to(v.dtype), v], dim=1)
        mask = torch.cat([mask.new_ones(T, S), mask], dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    rep = Hq // Hkv
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(rep, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * D**-0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def gated_linear_attention(q, k, v, g, chunk: int = GLA_CHUNK) -> torch.Tensor:
    """``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t / sqrt(D)`` per KV head (GQA:
    query head h reads KV head ``h // (Hq / Hkv)``), evaluated chunk by chunk: every decay factor
    is exp of a difference of cumulative log-decays with the later one first, so it is <= 1."""
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(B, T, Hkv, Hq // Hkv, Dk) * Dk**-0.5
    k, v, g = k.to(acc), v.to(acc), g.to(acc)
    state = q.new_zeros(B, Hkv, Dk, Dv, dtype=acc)
    outputs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        qc, kc, vc = qg[:, start:end], k[:, start:end], v[:, start:end]
        cum = g[:, start:end].cumsum(1)  # [B,C,Hkv,Dk]: decay from the chunk start through token t
        inter = torch.einsum("bthgk,bhkv->bthgv", qc * cum.exp().unsqueeze(3), state)
        C = end - start
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # [t, s]: s <= t
        diff = (cum.unsqueeze(2) - cum.unsqueeze(1)).masked_fill(~causal[None, :, :, None, None], float("-inf"))
        scores = torch.einsum("bthgk,btshk->btshg", qc, diff.exp() * kc.unsqueeze(1))
        intra = torch.einsum("btshg,bshv->bthgv", scores, vc)
        outputs.append(inter + intra)
        last = cum[:, -1]  # [B,Hkv,Dk]
        carried = kc * (last.unsqueeze(1) - cum).exp()
        state = state * last.exp().unsqueeze(-1) + torch.einsum("bshk,bshv->bhkv", carried, vc)
    return torch.cat(outputs, dim=1).reshape(B, T, Hq, Dv).to(q.dtype)


def make_qkvo(module: nn.Module, config: SbtrainConfig, prefix: str = "") -> None:
    d, hd = config.hidden_size, config.head_dim
    hq, hkv, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
    setattr(module, f"{prefix}q_proj", nn.Linear(d, hq * hd, bias=bias))
    setattr(module, f"{prefix}k_proj", nn.Linear(d, hkv * hd, bias=bias))
    setattr(module, f"{prefix}v_proj", nn.Linear(d, hkv * hd, bias=bias))
    setattr(module, f"{prefix}o_proj", nn.Linear(hq * hd, d, bias=False))


def project_qkv(module: nn.Module, x: torch.Tensor, head_dim: int, prefix: str = ""):
    B, T, _ = x.shape
    q = getattr(module, f"{prefix}q_proj")(x).view(B, T, -1, head_dim)
    k = getattr(module, f"{prefix}k_proj")(x).view(B, T, -1, head_dim)
    v = getattr(module, f"{prefix}v_proj")(x).view(B, T, -1, head_dim)
    return q, k, v


def window_of(kind: str, config: SbtrainConfig) -> int | None:
    return config.sliding_window - 1 if kind.endswith("swa") else None  # HF's window counts the current token


class SbtrainSoftmaxAttention(nn.Module):
    def __init__(self, config: SbtrainConfig, kind: str):
        super().__init__()
        self.head_dim, self.window = config.head_dim, window_of(kind, config)
        make_qkvo(self, config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = project_qkv(self, x, self.head_dim)
        o = softmax_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, self.window)
        return self.o_proj(o.flatten(2))


class SbtrainGatedLinearAttention(nn.Module):
    def __init__(self, config: SbtrainConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.feature_map = config.gla.get("feature_map", "relu")
        self.gate_normalizer = float(config.gla.get("gate_normalizer", 16.0))
        make_qkvo(self, config)
        rank = int(config.gla.get("gate_rank", 16))
        self.gk_proj = nn.Sequential(
            nn.Linear(config.hidden_size, rank, bias=False),
            nn.Linear(rank, config.num_key_value_heads * config.head_dim, bias=True),
        )
        self.g_norm = SbtrainRMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project_qkv(self, x, self.head_dim)
        q, k = feature_map(q, self.feature_map), feature_map(k, self.feature_map)
        g = F.logsigmoid(self.gk_proj(x).float()).view(B, T, -1, self.head_dim) / self.gate_normalizer
        o = gated_linear_attention(q, k, v, g)
        return self.o_proj(self.g_norm(o).flatten(2))


class SbtrainHybridAttention(nn.Module):
    def __init__(self, config: SbtrainConfig, kind: str):
        super().__init__()
        hd = self.head_dim = config.head_dim
        self.window = window_of(kind, config)
        hybrid = config.hybrid
        self.shared = bool(hybrid.get("share_branch_projections", True))
        self.feature_map = hybrid.get("feature_map", "sigmoid")
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
        beta = float(hybrid.get("beta_init", 0.5))
        self.beta_attn = nn.Parameter(torch.full((channels,), beta))
        self.beta_linear = nn.Parameter(torch.full((channels,), beta))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_pre, k_pre, v = project_qkv(self, x, self.head_dim)
        attn = softmax_attention(apply_rotary(q_pre, cos, sin), apply_rotary(k_pre, cos, sin), v, self.window,
                                 self.sink_k, self.sink_v)
        if not self.shared:
            q_pre, k_pre, v = project_qkv(self, x, self.head_dim, prefix="linear_")
        g = -F.softplus(k_pre.float())  # log(1 - sigmoid(k_pre)), the key-tied decay, computed stably
        fm = self.feature_map
        lin = gated_linear_attention(feature_map(q_pre, fm), feature_map(k_pre, fm), v, g)
        attn = self.beta_attn * self.attn_norm(attn).flatten(2)
        lin = self.beta_linear * self.linear_norm(lin).flatten(2)
        if self.shared:
            return self.o_proj(attn + lin)
        return 0.5 * (self.o_proj(attn) + self.linear_o_proj(lin))


class SbtrainRouter(nn.Module):
    def __init__(self, config: SbtrainConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(int(config.moe["num_experts"]), config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(int(config.moe["num_experts"]), dtype=torch.float32))


class SbtrainExperts(nn.Module):
    """E SwiGLU experts stored ``[E, Din, Dout]`` (the transpose of an nn.Linear weight)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.up_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, intermediate_size, hidden_size))


class SbtrainMoE(nn.Module):
    """fp32 router and top-k; dropless, or each expert keeps its first ``ceil(cf * N * k / E)``
    assignments in token order when ``capacity_factor`` is set (as sbtrain does)."""

    def __init__(self, config: SbtrainConfig):
        super().__init__()
        self.cfg = moe = config.moe
        size = moe.get("expert_intermediate_size") or config.intermediate_size
        self.router = SbtrainRouter(config)
        self.experts = SbtrainExperts(int(moe["num_experts"]), config.hidden_size, size)
        shared = int(moe.get("num_shared_experts", 0))
        self.shared_expert = SbtrainMLP(config.hidden_size, size * shared) if shared else None

    # Hooks for variants (the W8ASpike export spikes these inputs and dequantizes the experts).
    def router_input(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def expert_input(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def expert_matrix(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The ``[E, Din, Dout]`` weight ``name`` (gate_proj / up_proj / down_proj)."""
        return getattr(self.experts, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, shape = self.cfg, x.shape
        flat = x.reshape(-1, shape[-1])
        N, E, k = flat.shape[0], int(cfg["num_experts"]), int(cfg.get("top_k", 1))
        logits = self.router_input(flat).float() @ self.router.weight.float().t()
        scores = logits.softmax(-1) if cfg.get("router_activation", "softmax") == "softmax" else torch.sigmoid(logits)
        select = scores + self.router.expert_bias if cfg.get("aux_free_balancing") else scores
        chosen = select.topk(k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if cfg.get("norm_topk_prob"):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        expert_ids = chosen.flatten()
        order = torch.argsort(expert_ids, stable=True)
        token_of = order // k
        counts = torch.bincount(expert_ids, minlength=E)
        if cfg.get("capacity_factor") is not None:
            cap = math.ceil(cfg["capacity_factor"] * N * k / E)
            starts = torch.cumsum(counts, 0) - counts
            keep = torch.arange(order.numel(), device=x.device) - starts[expert_ids[order]] < cap
            order, token_of, counts = order[keep], token_of[keep], counts.clamp(max=cap)
        rows = self.expert_input(flat[token_of])
        gate, up, down = (self.expert_matrix(name, x.dtype) for name in ("gate_proj", "up_proj", "down_proj"))
        outputs, start = [], 0
        for e, count in enumerate(counts.tolist()):
            xe = rows[start:start + count]
            outputs.append((F.silu(xe @ gate[e]) * (xe @ up[e])) @ down[e])
            start += count
        y_sorted = torch.cat(outputs) if outputs else rows
        combine = torch.promote_types(y_sorted.dtype, torch.float32)
        w = weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(flat).index_add(0, token_of, (y_sorted.to(combine) * w.to(combine)).to(flat.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)


class SbtrainDecoderLayer(nn.Module):
    def __init__(self, config: SbtrainConfig, index: int):
        super().__init__()
        kind = config.layer_kinds[index]
        self.input_layernorm = SbtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        if kind in ("full", "swa"):
            self.self_attn = SbtrainSoftmaxAttention(config, kind)
        elif kind == "gla":
            self.self_attn = SbtrainGatedLinearAttention(config)
        else:
            self.self_attn = SbtrainHybridAttention(config, kind)
        self.post_attention_layernorm = SbtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(index):
            self.mlp = SbtrainMoE(config)
        else:
            self.mlp = SbtrainMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class SbtrainPreTrainedModel(PreTrainedModel):
    config_class = SbtrainConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["SbtrainDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Only reached for tensors a checkpoint lacks; sbtrain's init (normal(std), ones, betas)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            hf_init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, SbtrainRMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, SbtrainHybridAttention):
            for p in (module.sink_k, module.sink_v):
                if p is not None:
                    hf_init.normal_(p, std=std)
            beta = float(self.config.hybrid.get("beta_init", 0.5))
            hf_init.constant_(module.beta_attn, beta)
            hf_init.constant_(module.beta_linear, beta)
        elif isinstance(module, SbtrainRouter):
            hf_init.normal_(module.weight, std=std)
            hf_init.zeros_(module.expert_bias)
        elif isinstance(module, SbtrainExperts):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                hf_init.normal_(p, std=std)


class SbtrainModel(SbtrainPreTrainedModel):
    """``model.*``: embeddings, decoder layers, final norm."""

    def __init__(self, config: SbtrainConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SbtrainDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SbtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        cos, sin = rotary_cos_sin(position_ids.expand(B, T), self.config.head_dim, self.config.rope_base,
                                  getattr(self.config, "rope_yarn", None))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class SbtrainForCausalLM(SbtrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SbtrainConfig):
        super().__init__(config)
        self.model = SbtrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("the sbtrain export does not support padding (attention_mask has zeros); "
                             "run unpadded prompts one at a time or batch prompts of equal length")
        if past_key_values is not None or use_cache:
            raise ValueError("the sbtrain export has no decode cache yet; call with use_cache=False "
                             "(generation_config.json sets it)")
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # HF convention: labels[:, t] is the token at t, so predict t + 1 from t; mean over targets.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


__all__ = ["SbtrainForCausalLM", "SbtrainModel", "SbtrainPreTrainedModel"]
