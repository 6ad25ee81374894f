"""Standalone Hugging Face modeling code of an exported sbtrain model (plain PyTorch).

Copied into every exported folder next to ``configuration_sbtrain.py`` and loaded with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. It imports only torch
and transformers (users load it without sbtrain) and mirrors sbtrain's forward exactly, with
the same tensor names, so the safetensors load without renaming:

- mixers: every registered layer kind's HF code, pasted between the "sbtrain mixers" markers at
  export (``sbtrain/models/mixers/hf/``: softmax attention with RoPE, GLA, the 76B's hybrid, ...),
  built by kind from ``EXPORT_MIXERS``;
- FFN: SwiGLU, or MoE (fp32 router, top-k, optional shared expert, experts ``[E, Din, Dout]``).

Decode cache: :class:`SbtrainCache` (a transformers ``Cache``, from ``sbtrain/models/mixers/hf/cache.py``),
as sbtrain's own decode: a constant-size recurrent state per GLA / Gated DeltaNet layer, a ring of
the last W keys/values per sliding-window layer, every key/value of a full-attention layer, and
both for the 76B's hybrid layers. ``use_cache`` defaults to True: the forward creates the cache,
returns it as ``cache`` (transformers 5; ``past_key_values`` is the older name, accepted as an
argument too) and continues it when it is passed back; ``generate()`` decodes one token per step.
Padding: ``attention_mask`` zeros (left padding for ``generate()``) mark tokens that change
nothing: softmax attention never sees their keys, linear layers neither write nor decay their
state for them, and each row's positions count its real tokens only (the first one is 0). Only
the last T columns of ``attention_mask`` are read; the cache remembers the earlier ones. MoE with
``capacity_factor`` is the exception: padding tokens take expert capacity, as in sbtrain.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sbtrain import SbtrainConfig

try:  # transformers >= 5: these skip tensors already loaded from the checkpoint
    from transformers import initialization as hf_init
except ImportError:  # transformers 4.x initialises before loading, so plain torch init is right
    hf_init = nn.init

# --- sbtrain mixers: begin ---
# In the package this imports the mixers' HF code; ``sbtrain-export`` replaces the lines from "begin"
# to "end" with that code's text (``sbtrain/models/mixers/hf/``), so the export needs no sbtrain.
from sbtrain.models.mixers.hf import load_all
from sbtrain.models.mixers.hf.cache import SbtrainCache, position_ids_from
from sbtrain.models.mixers.hf.common import SbtrainRMSNorm, rotary_cos_sin

EXPORT_MIXERS = load_all()
# --- sbtrain mixers: end ---


class SbtrainMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        if kind not in EXPORT_MIXERS:
            raise ValueError(f"layer {index} is of kind {kind!r}, which this modeling code does not have; it "
                             f"has {sorted(EXPORT_MIXERS)} (export again with the sbtrain that trained the model)")
        self.input_layernorm = SbtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EXPORT_MIXERS[kind](config, kind)
        self.post_attention_layernorm = SbtrainRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(index):
            self.mlp = SbtrainMoE(config)
        else:
            self.mlp = SbtrainMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, real=None, cache=None) -> torch.Tensor:
        """``real``: ``[B,T]`` bool, False at padding (None: none); ``cache``: this layer's SbtrainLayerCache."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, real, cache)
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
        elif hasattr(module, "init_own_weights"):  # a mixer's parameters outside Linear / RMSNorm
            module.init_own_weights(hf_init, std)
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

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, real=None,
                cache: SbtrainCache | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B,T,d]``; ``real`` ``[B,T]`` bool marks real tokens (None: no padding);
        ``cache`` is read and extended by every layer."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if position_ids is None:
            start = None if cache is None else cache.next_position
            position_ids = position_ids_from(start, real, B, T, x.device)
        cos, sin = rotary_cos_sin(position_ids.expand(B, T), self.config.head_dim, self.config.rope_base,
                                  getattr(self.config, "rope_yarn", None))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, real, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(real, B, T, x.device)
        return self.norm(x)


def real_tokens(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``[B,T]`` bool, True where the T new tokens are real rather than padding (None: no padding).
    HF's ``attention_mask`` spans the cached columns too; only its last T columns are read."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} must be 2-D [batch={batch}, "
                         f"columns >= {length} new tokens] of 1 (token) and 0 (padding)")
    real = attention_mask[:, -length:].bool()
    return None if bool(real.all()) else real


# The output field that carries the cache: ``cache`` in transformers 5, ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SbtrainForCausalLM(SbtrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SbtrainConfig):
        super().__init__(config)
        self.model = SbtrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not build a DynamicCache: the forward creates its own SbtrainCache and returns it."""
        return False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        if past_key_values is not None:  # the name transformers 4 uses
            if cache is not None:
                raise ValueError("pass the cache once, as cache= or as past_key_values= (its older name), not both")
            cache = past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if cache is not None and not isinstance(cache, SbtrainCache):
            raise TypeError(f"cache is a {type(cache).__name__}; an sbtrain model decodes with the SbtrainCache its "
                            "forward returns (leave cache unset for a new one)")
        if cache is None and use_cache:
            cache = SbtrainCache(self.config.num_hidden_layers)
        if cache is not None:
            cache.check_batch(B)
        real = real_tokens(attention_mask, B, T)
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, real=real,
                            cache=cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # HF convention: labels[:, t] is the token at t, so predict t + 1 from t; mean over targets.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


__all__ = ["SbtrainCache", "SbtrainForCausalLM", "SbtrainModel", "SbtrainPreTrainedModel"]
