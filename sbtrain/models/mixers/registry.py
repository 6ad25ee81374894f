"""The mixer registry: everything about one layer kind, declared once, by the module of that kind.

A *mixer* is the sequence-mixing half of a decoder block (softmax attention, gated linear
attention, the 76B's intra-layer hybrid, Gated DeltaNet, ...). Each kind's module in
``sbtrain/models/mixers/`` builds a :class:`MixerKind` and calls :func:`register`; every room that
used to switch on kind strings reads the registry instead:

============================  =====================================================
what                          who reads it
============================  =====================================================
``build``                     ``models.model.Block``
``tensor_parallel``           ``models.parallelize.apply_tensor_parallel``
``flops_per_token``           ``trainer.flops`` (MFU), ``plan``
``core_macs_per_token``       ``spike.energy`` (the dense matmuls are counted by hooks)
``decode_cache_bytes``        ``bench.memory`` (checked against the measured cache)
``uses_rope`` / ``attends_all``  ``plan.memory`` (RoPE tables), ``bench`` (quadratic models)
``hf_source``                 ``convert.hf_import`` (which teacher tensor a parameter copies)
``export_code``                 ``export.hf_export`` (the standalone HF modeling code)
``info``                      ``cli.info``
``activations``               ``plan.activations`` (saved bytes for backward, per block)
============================  =====================================================

Context parallelism is the mixer's own business: its forward reads ``inputs.context_parallel``
and calls the distributed form of its core (``parallel/context_parallel``).

The names are also registered with the config layer (``sbtrain.config.model.register_layer_kind``)
so that ``model.layer_pattern`` is validated against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sbtrain.config.model import ConfigError, ModelConfig, register_layer_kind


def _no_info(cfg: ModelConfig) -> dict:
    return {}


def _same_name(name: str) -> str:
    return name


@dataclass(frozen=True)
class MixerKind:
    name: str  # the ``model.layer_pattern`` entry
    summary: str  # one line for docs and ``sbtrain-info``
    build: Callable[..., nn.Module]  # build(cfg, device=None, dtype=None)
    # Training FLOPs (forward + backward) per token of the sequence-mixing core at context T,
    # beyond the 6 x parameters of the projections (docs/MFU.md).
    flops_per_token: Callable[[ModelConfig, int], float]
    # Forward MACs per token of the core at context T (energy accounting; the projections are
    # dense matmuls counted by hooks in ``sbtrain.spike.energy``).
    core_macs_per_token: Callable[[ModelConfig, int], float]
    # Decode-cache bytes of one layer for one sequence after T tokens, keys/values of
    # ``kv_bytes`` bytes per element (linear states are fp32).
    decode_cache_bytes: Callable[[ModelConfig, int, int], int]
    # tensor_parallel(mixer, tp_mesh, residual_placement): shard the mixer in place.
    tensor_parallel: Callable
    # The HF-side code (``sbtrain/models/mixers/hf/``), pasted into the exported modeling_sbtrain.py;
    # its class registers with ``@export_mixer(name)`` and is built as ``cls(config, name)``.
    export_code: Path
    uses_rope: bool = False
    attends_all: bool = False  # some branch attends over the whole past (time and cache grow with T)
    # The teacher tensor (relative to ``self_attn.``) a parameter is copied from on conversion;
    # a name the teacher lacks is initialised by the module's init rule.
    hf_source: Callable[[str], str] = _same_name
    info: Callable[[ModelConfig], dict] = _no_info
    # activations(shapes, cfg, past) -> (saved bytes, backward workspace bytes) of one mixer, from
    # its normed input to its o_proj input (``sbtrain.plan.activations.Shapes``); None: the planner
    # uses its generic estimate.
    activations: Callable | None = None


MIXERS: dict[str, MixerKind] = {}


def register(kind: MixerKind) -> MixerKind:
    if kind.name in MIXERS:
        raise ValueError(f"mixer kind {kind.name!r} is registered twice")
    if not kind.export_code.is_file():
        raise FileNotFoundError(f"mixer kind {kind.name!r}: export code {kind.export_code} is missing")
    MIXERS[kind.name] = kind
    register_layer_kind(kind.name, kind.summary)
    return kind


def mixer_kind(name: str) -> MixerKind:
    try:
        return MIXERS[name]
    except KeyError:
        raise ConfigError(f"layer kind {name!r} is not a registered mixer; use one of {sorted(MIXERS)}") from None


def layer_mixers(cfg: ModelConfig) -> list[MixerKind]:
    """The mixer kind of every layer."""
    return [mixer_kind(name) for name in cfg.layer_types()]


def kind_of(mixer: nn.Module) -> MixerKind:
    """The registered kind a built mixer module belongs to (its ``mixer_kind`` attribute)."""
    return mixer_kind(mixer.mixer_kind)


__all__ = ["MIXERS", "MixerKind", "kind_of", "layer_mixers", "mixer_kind", "register"]
