"""Typed schema of a model (``model=NAME`` in every sbtrain command).

The dataclasses are stored in Hydra's ConfigStore as ``model/model_schema``; every
``recipes/model/NAME.yaml`` starts with ``defaults: [model_schema, _self_]``, so a key that is
not declared here (a typo in a yaml or in an override) is an error, not a silent default.

Layer pattern: ``layer_pattern`` lists the mixer kind of each layer; a shorter list is a
period repeated to fill ``num_layers`` (its length must divide ``num_layers``), so the 7B's
``[gla, swa]`` means gla at even layers, swa at odd ones. The kinds are whatever the mixer
registry holds (``sbtrain/models/mixers/``: ``full``, ``swa``, ``gla``, ``hybrid_full``,
``hybrid_swa``, ``gated_delta``, ...); each mixer module registers its name here
(:func:`register_layer_kind`), so this layer never lists them. The names are checked as soon as
the registry is loaded (any command that builds a model loads it first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

# name -> one-line summary, filled by the mixer modules (sbtrain.models.mixers.registry.register)
LAYER_KINDS: dict[str, str] = {}
ROUTER_ACTIVATIONS = ("softmax", "sigmoid")
FEATURE_MAPS = ("relu", "sigmoid", "identity")
SPIKE_MODES = ("off", "eval", "train")
# Modules whose input is spiked, by the last component of their name (``linear_`` prefixes of the
# 76B's separate branch projections are ignored): attention q/k/v/o, the GLA low-rank gate, the
# FFN gate/up (dense and shared expert), the MoE router and the routed experts' gate/up input.
SPIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj", "gate_proj", "up_proj", "router", "experts")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the value and the fix."""


def register_layer_kind(name: str, summary: str) -> None:
    """Make ``name`` a valid ``model.layer_pattern`` entry (called by the mixer registry)."""
    LAYER_KINDS[name] = summary


# FFN kinds (``sbtrain/models/ffn/``) register here with the divisibility their tensor-parallel plan
# needs, so a layout is checked before a model is built.
FFN_KINDS: dict[str, str] = {}
FFN_TP_CHECKS: dict[str, object] = {}


def register_ffn_kind(name: str, summary: str, tp_check) -> None:
    """Make ``name`` an FFN kind ``ModelConfig.ffn_types`` may give (called by the FFN registry)."""
    FFN_KINDS[name] = summary
    FFN_TP_CHECKS[name] = tp_check


@dataclass
class GLAConfig:
    """The 7B's gated linear attention layer."""

    gate_rank: int = 16  # low-rank gate: hidden -> gate_rank -> num_key_value_heads * head_dim
    gate_normalizer: float = 16.0  # log-decay g = logsigmoid(gate) / gate_normalizer
    feature_map: str = "relu"  # applied to q and k


@dataclass
class HybridConfig:
    """The 76B's intra-layer parallel hybrid mixer (layer kinds hybrid_full / hybrid_swa)."""

    # True: one q/k/v/o shared by both branches; False: each branch has its own, o outputs averaged.
    share_branch_projections: bool = True
    num_sink_tokens: int = 128  # learned key/value pairs per layer, softmax branch only, no RoPE
    beta_init: float = 0.5  # per-channel branch weights beta_s, beta_l
    feature_map: str = "sigmoid"  # linear branch q/k; the decay is tied to k: g = log(1 - sigmoid(k_pre))


@dataclass
class MoEConfig:
    """Mixture-of-Experts FFN. ``num_experts = 0`` means every layer has a dense FFN."""

    num_experts: int = 0  # routed experts
    top_k: int = 1
    num_shared_experts: int = 0  # always-on experts, one dense MLP of num_shared * expert size
    expert_intermediate_size: int | None = None  # None: the dense intermediate_size
    dense_layers: list[int] = field(default_factory=list)  # layers that keep a dense FFN
    router_activation: str = "softmax"  # softmax | sigmoid, computed in fp32
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1
    aux_loss_coef: float = 0.01  # Switch-style load-balancing loss
    z_loss_coef: float = 0.0  # router z-loss: mean(logsumexp(logits)^2)
    aux_free_balancing: bool = False  # per-expert bias added to the scores for selection only
    aux_free_update_rate: float = 1e-3  # bias step per update_expert_bias() call
    capacity_factor: float | None = None  # None: dropless; else tokens over capacity are dropped


@dataclass
class SpikeConfig:
    """Spiking activations (docs/DESIGN_NOTES.md §5, ``sbtrain.models.spiking``): off, at eval only, or trained."""

    mode: str = "off"  # off | eval (only when the model is in eval mode, post hoc) | train (also in training, STE)
    k: float = 3.0  # V_th = mean(|x|) / k per token
    max_count: int | None = None  # clamp spike counts to [-max_count, max_count]; None: no clamp
    targets: list[str] = field(default_factory=lambda: list(SPIKE_TARGETS))
    spike_down_proj: bool = False  # FFN down_proj input (the public code leaves it out)
    # mode=train only: spikes are on from this optimizer step on (the last part of a run, for
    # spike-aware continual pretraining); before it the run trains and evaluates without spikes.
    train_from_step: int = 0


@dataclass
class YarnConfig:
    """YaRN RoPE scaling of the softmax layers (``operators.elementwise.yarn_inv_freq``; HF's
    ``rope_type="yarn"``). ``factor=1``: off (plain RoPE of ``rope_base``). Usually set per stage
    (``stage_plan[i].rope.kind=yarn``), not by hand."""

    factor: float = 1.0  # context extension factor s (frequencies of slow dimensions / s)
    original_max_position: int = 0  # the context length trained at before the scaling (needed when factor > 1)
    beta_fast: float = 32.0  # dimensions turning more often than this over the original context keep their frequency
    beta_slow: float = 1.0  # dimensions turning less often than this are fully interpolated
    attention_factor: float | None = None  # cos/sin scale; null: 0.1 ln(factor) + 1


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int = 768
    rms_norm_eps: float = 1e-6
    rope_base: float = 1_000_000.0
    rope_yarn: YarnConfig = field(default_factory=YarnConfig)  # factor 1: plain RoPE
    attention_bias: bool = True  # bias on q/k/v (never on o), as in Qwen2
    tie_embeddings: bool = False
    sliding_window: int = 512  # W past tokens + the current one (HF's sliding_window is W + 1)
    layer_pattern: list[str] = field(default_factory=lambda: ["full"])
    # The FFN kind of each layer, a period like layer_pattern (sbtrain/models/ffn/: dense, moe, ...);
    # null: moe where model.moe has experts (all layers but moe.dense_layers), dense elsewhere.
    ffn_pattern: list[str] | None = None
    document_masking: bool = False  # reset state / mask attention / restart positions at cu_seqlens
    init_std: float = 0.02
    gla: GLAConfig = field(default_factory=GLAConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def layer_types(self) -> list[str]:
        """The mixer kind of every layer (the pattern expanded to ``num_layers``)."""
        pattern = list(self.layer_pattern)
        return [pattern[i % len(pattern)] for i in range(self.num_layers)]

    def is_moe_layer(self, index: int) -> bool:
        return self.ffn_types()[index] == "moe"

    def ffn_types(self) -> list[str]:
        """The FFN kind of every layer: ``ffn_pattern`` expanded, or by default ``moe`` where
        ``model.moe`` routes experts and ``dense`` elsewhere."""
        if self.ffn_pattern:
            pattern = list(self.ffn_pattern)
            return [pattern[i % len(pattern)] for i in range(self.num_layers)]
        dense = set(self.moe.dense_layers)
        return ["moe" if self.moe.num_experts > 0 and i not in dense else "dense" for i in range(self.num_layers)]

    def validate(self) -> ModelConfig:
        """Raise :class:`ConfigError` naming the first bad value and its fix; return self."""
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_key_value_heads={self.num_key_value_heads}; choose a number of KV heads that divides it"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}; set model.head_dim explicitly or change the head count"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model head_dim={self.resolved_head_dim} must be even for rotary embeddings")
        pattern = list(self.layer_pattern)
        if not pattern or self.num_layers % len(pattern):
            raise ConfigError(
                f"model.layer_pattern has {len(pattern)} entries, which does not divide model.num_layers="
                f"{self.num_layers}; give one entry per layer or a period that divides it"
            )
        for kind in pattern:
            if not isinstance(kind, str) or not kind:
                raise ConfigError(f"model.layer_pattern entry {kind!r} must be a layer kind name")
            if LAYER_KINDS and kind not in LAYER_KINDS:
                raise ConfigError(f"model.layer_pattern entry {kind!r} is not a layer kind; use one of "
                                  f"{sorted(LAYER_KINDS)}")
        if self.ffn_pattern is not None:
            ffns = list(self.ffn_pattern)
            if not ffns or self.num_layers % len(ffns):
                raise ConfigError(f"model.ffn_pattern has {len(ffns)} entries, which does not divide model.num_layers="
                                  f"{self.num_layers}; give one entry per layer, a period that divides it, or null")
            for kind in ffns:
                if FFN_KINDS and kind not in FFN_KINDS:
                    raise ConfigError(f"model.ffn_pattern entry {kind!r} is not an FFN kind; use one of "
                                      f"{sorted(FFN_KINDS)}")
            if "moe" in ffns and not self.moe.num_experts:
                raise ConfigError("model.ffn_pattern has moe layers but model.moe.num_experts=0; set the experts")
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 0 (past tokens seen)")
        if self.gla.feature_map not in FEATURE_MAPS or self.hybrid.feature_map not in FEATURE_MAPS:
            raise ConfigError(f"model.gla.feature_map / model.hybrid.feature_map must be one of {FEATURE_MAPS}")
        if self.gla.gate_rank <= 0 or self.gla.gate_normalizer <= 0:
            raise ConfigError(
                f"model.gla.gate_rank={self.gla.gate_rank} and model.gla.gate_normalizer="
                f"{self.gla.gate_normalizer} must be positive"
            )
        if self.hybrid.num_sink_tokens < 0:
            raise ConfigError(f"model.hybrid.num_sink_tokens={self.hybrid.num_sink_tokens} must be >= 0")
        self._validate_moe()
        self._validate_spike()
        self._validate_yarn()
        return self

    def _validate_yarn(self) -> None:
        y = self.rope_yarn
        if y.factor < 1:
            raise ConfigError(f"model.rope_yarn.factor={y.factor} must be >= 1 (1: plain RoPE)")
        if y.factor == 1:
            return
        if y.original_max_position <= 0:
            raise ConfigError(f"model.rope_yarn.factor={y.factor} needs model.rope_yarn.original_max_position (the "
                              "context length trained at before the scaling, e.g. 8192)")
        if not 0 < y.beta_slow < y.beta_fast:
            raise ConfigError(f"model.rope_yarn.beta_slow={y.beta_slow} and beta_fast={y.beta_fast} need "
                              "0 < beta_slow < beta_fast (defaults 1 and 32)")
        if y.attention_factor is not None and y.attention_factor <= 0:
            raise ConfigError(f"model.rope_yarn.attention_factor={y.attention_factor} must be positive, or null")

    def _validate_spike(self) -> None:
        spike = self.spike
        if spike.mode not in SPIKE_MODES:
            raise ConfigError(f"model.spike.mode={spike.mode!r} is unknown; use one of {SPIKE_MODES}")
        if not spike.k > 0:
            raise ConfigError(f"model.spike.k={spike.k} must be positive (V_th = mean(|x|) / k; default 3)")
        if spike.train_from_step < 0:
            raise ConfigError(f"model.spike.train_from_step={spike.train_from_step} must be >= 0 (0: from the start)")
        if spike.train_from_step and spike.mode != "train":
            raise ConfigError(
                f"model.spike.train_from_step={spike.train_from_step} needs model.spike.mode=train "
                f"(it is {spike.mode!r}); spike-aware training turns on at that step"
            )
        if spike.max_count is not None and spike.max_count < 1:
            raise ConfigError(f"model.spike.max_count={spike.max_count} must be >= 1, or null for no clamp")
        for target in spike.targets:
            if target == "down_proj":
                raise ConfigError("model.spike.targets must not list down_proj; set model.spike.spike_down_proj=true")
            if target not in SPIKE_TARGETS:
                raise ConfigError(f"model.spike.targets entry {target!r} is unknown; use entries of {SPIKE_TARGETS}")

    def _validate_moe(self) -> None:
        moe = self.moe
        if moe.num_experts < 0 or moe.num_shared_experts < 0:
            raise ConfigError(f"model.moe.num_experts={moe.num_experts} / num_shared_experts must be >= 0")
        if moe.num_experts == 0:
            return
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}"
            )
        for index in moe.dense_layers:
            if not 0 <= index < self.num_layers:
                raise ConfigError(
                    f"model.moe.dense_layers contains {index}, outside 0..{self.num_layers - 1} (0-based layer indices)"
                )
        if moe.router_activation not in ROUTER_ACTIVATIONS:
            raise ConfigError(
                f"model.moe.router_activation={moe.router_activation!r} is unknown; use one of {ROUTER_ACTIVATIONS}"
            )
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            raise ConfigError(
                f"model.moe.capacity_factor={moe.capacity_factor} must be positive, or null for dropless routing"
            )
        if moe.expert_intermediate_size is not None and moe.expert_intermediate_size <= 0:
            raise ConfigError(f"model.moe.expert_intermediate_size={moe.expert_intermediate_size} must be positive")


def register_model_schema() -> None:
    """Store the schema as ``model/model_schema`` (idempotent: ConfigStore overwrites)."""
    ConfigStore.instance().store(group="model", name="model_schema", node=ModelConfig)


register_model_schema()
