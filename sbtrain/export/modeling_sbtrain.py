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

import math  # noqa: F401  (used by the mixers' and FFNs' code pasted below)
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
# In the package this imports the mixers' and FFNs' HF code; ``sbtrain-export`` replaces the lines from
# "begin" to "end" with that code's text (``sbtrain/models/mixers/hf/``, ``sbtrain/models/ffn/hf/``), so the
# export needs no sbtrain.
from sbtrain.models.ffn.hf import load_all as load_ffns
from sbtrain.models.ffn.hf.moe import SbtrainMoE  # noqa: F401  (W8ASpike's variant subclasses it)
from sbtrain.models.mixers.hf import load_all
from sbtrain.models.mixers.hf.cache import SbtrainCache, position_ids_from
from sbtrain.models.mixers.hf.common import SbtrainRMSNorm, rotary_cos_sin

EXPORT_MIXERS = load_all()
EXPORT_FFNS = load_ffns()
# --- sbtrain mixers: end ---


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
        ffn = config.ffn_kinds[index]
        if ffn not in EXPORT_FFNS:
            raise ValueError(f"layer {index} has an FFN of kind {ffn!r}, which this modeling code does not have; it "
                             f"has {sorted(EXPORT_FFNS)} (export again with the sbtrain that trained the model)")
        self.mlp = EXPORT_FFNS[ffn](config)

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
        elif hasattr(module, "init_own_weights"):  # a mixer's or FFN's parameters outside Linear / RMSNorm
            module.init_own_weights(hf_init, std)


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
