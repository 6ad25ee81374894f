"""Typed schema of ``sbtrain-convert`` (``recipes/convert.yaml``), stored in Hydra's ConfigStore as
``convert_schema`` so a mistyped key (``windw=4``) is an error, not a silent default.

Every target-side knob is optional: ``None`` means "the target recipe's value"
(``recipes/model/<target>.yaml``); the shapes (vocab, width, depth, heads, FFN) always come from
the HF source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sbtrain.convert.upcycle import UPCYCLE_SCALES


@dataclass
class UpcycleConfig:
    """MoE upcycling (targets with ``moe.num_experts > 0``, e.g. sb76b)."""

    # report: all three expert matrices times (S + k/N)^(-1/3); exact: up and down times c^(1/2), c = 1/(S + k/N)
    scale: str = "report"
    num_experts: int | None = None  # routed experts N
    top_k: int | None = None  # k
    num_shared_experts: int | None = None  # S
    dense_layers: list[int] | None = None  # layers that keep the dense FFN (recipe's, clipped to the depth)


@dataclass
class ConvertConfig:
    from_hf: str = MISSING  # local HF folder: config.json + safetensors (single or sharded), tokenizer optional
    target: str = "sb7b"  # a recipe in recipes/model/ giving layer kinds, window, gates, MoE (sb7b, sb76b, ...)
    out: str = MISSING  # the sbtrain weights directory to write
    overwrite: bool = False  # replace an existing out directory
    layer_pattern: list[str] | None = None  # per-layer kinds (a period repeated); None: the target's
    full_attention_layers: list[int] | None = None  # hybrid targets: layers whose softmax branch is full
    window: int | None = None  # sliding window, W past tokens + current; None: the source's (HF - 1) or target's
    dtype: str | None = None  # expected tensor dtype (float32, bfloat16, float16); None: the source's
    cast: bool = False  # allow converting the source's dtype to `dtype` instead of failing
    init_std: float | None = None  # std of the new parameters; None: the target's init_std
    share_branch_projections: bool | None = None  # hybrid targets: one q/k/v/o for both branches
    num_sink_tokens: int | None = None  # hybrid targets: learned sink key/value pairs per layer
    seed: int = 0  # seed of the random init of new parameters
    max_shard_bytes: int = 4 * 2**30  # output shard size
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)


def register_convert_schema() -> None:
    """Store the schema as ``convert_schema`` (idempotent: ConfigStore overwrites)."""
    ConfigStore.instance().store(name="convert_schema", node=ConvertConfig)


register_convert_schema()

__all__ = ["UPCYCLE_SCALES", "ConvertConfig", "UpcycleConfig", "register_convert_schema"]
