"""Hugging Face config of an exported sbtrain model (``model_type="sbtrain"``).

Copied verbatim into every exported folder and loaded with ``trust_remote_code=True``: it
imports only transformers, never sbtrain, so the folder works where sbtrain is not installed.

Names follow sbtrain's ``ModelConfig`` except where HF has a standard name:
``num_hidden_layers`` (sbtrain ``num_layers``), ``tie_word_embeddings`` (``tie_embeddings``),
``layer_kinds`` (the expanded ``layer_pattern``, one kind per layer; HF reserves ``layer_types``
  for its own attention kinds) and ``sliding_window``,
which is HF's convention, W past tokens + the current one = sbtrain's ``sliding_window + 1``.
``gla``, ``hybrid`` and ``moe`` are the sbtrain sub-configs as plain dicts.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class SbtrainConfig(PretrainedConfig):
    model_type = "sbtrain"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int = 768,
        rms_norm_eps: float = 1e-6,
        rope_base: float = 1_000_000.0,
        rope_yarn: dict | None = None,
        attention_bias: bool = True,
        tie_word_embeddings: bool = False,
        sliding_window: int = 513,
        layer_kinds: list[str] | None = None,
        ffn_kinds: list[str] | None = None,
        gla: dict | None = None,
        hybrid: dict | None = None,
        moe: dict | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_base = rope_base
        # YaRN scaling (factor, original_max_position, beta_fast, beta_slow, attention_factor); factor 1: off
        self.rope_yarn = dict(rope_yarn or {"factor": 1.0})
        self.attention_bias = attention_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.sliding_window = sliding_window
        self.layer_kinds = list(layer_kinds) if layer_kinds is not None else ["full"] * num_hidden_layers
        self.gla = dict(gla or {"gate_rank": 16, "gate_normalizer": 16.0, "feature_map": "relu"})
        self.hybrid = dict(hybrid or {"share_branch_projections": True, "num_sink_tokens": 0, "beta_init": 0.5,
                                      "feature_map": "sigmoid"})
        self.moe = dict(moe or {"num_experts": 0})
        # One FFN kind per layer; configs written before ffn_kinds existed derive it from moe.
        self.ffn_kinds = list(ffn_kinds) if ffn_kinds is not None else [
            "moe" if self.is_moe_layer(i) else "dense" for i in range(num_hidden_layers)]
        self.initializer_range = initializer_range
        # As HF models: forward returns a decode cache (SbtrainCache) unless use_cache=False.
        self.use_cache = use_cache
        # The kinds themselves are checked by the modeling code, which knows the mixers it carries.
        if len(self.layer_kinds) != num_hidden_layers or not all(isinstance(k, str) for k in self.layer_kinds):
            raise ValueError(f"layer_kinds={self.layer_kinds} must name one mixer kind for each of the "
                             f"{num_hidden_layers} layers")
        if len(self.ffn_kinds) != num_hidden_layers or not all(isinstance(k, str) for k in self.ffn_kinds):
            raise ValueError(f"ffn_kinds={self.ffn_kinds} must name one FFN kind for each of the "
                             f"{num_hidden_layers} layers")
        if sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} counts the current token (HF convention), so it must "
                             "be >= 1")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, index: int) -> bool:
        return int(self.moe.get("num_experts", 0)) > 0 and index not in set(self.moe.get("dense_layers", []))


__all__ = ["SbtrainConfig"]
