"""The FFN registry: everything about one feed-forward kind, declared once, by the module of that kind.

An *FFN* is the channel-mixing half of a decoder block (the dense SwiGLU, the Mixture-of-Experts).
Each kind's module in ``sbtrain/models/ffn/`` builds an :class:`FfnKind` and calls :func:`register`;
the rooms that used to ask "is this layer MoE?" read the registry instead, as they read the mixer
registry (``sbtrain/models/mixers/registry.py``) for the other half:

=======================  =======================================================================
what                     who reads it
=======================  =======================================================================
``build``                ``models.model.Block``
``tensor_parallel``      ``models.parallelize.apply_tensor_parallel``
``tp_split_dim``         ``plan.params`` (which dim of a parameter TP shards; checked against the plan)
``inactive_params``      ``models.build.count_parameters`` (active parameters -> MFU FLOPs)
``activations``          ``plan.activations`` (saved bytes and backward workspace of one FFN)
``upcycled_from``        ``convert.hf_import`` (which dense teacher tensor a parameter is built from)
``export_code``          ``export.hf_export`` (the standalone HF modeling code)
``info``                 ``cli.info``
``expert_parallel``      ``CausalLM.moe_layers`` (modules whose ``experts`` EP shards)
=======================  =======================================================================

Which kind a layer gets is ``ModelConfig.ffn_types()``; the names are registered with the config layer
(``sbtrain.config.model.register_ffn_kind``), together with the kind's tensor-parallel divisibility
check, so ``validate_parallel`` can refuse a layout before any model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sbtrain.config.model import ConfigError, ModelConfig, register_ffn_kind


def _nothing(*args) -> dict:
    return {}


def _no_plan_note(cfg: ModelConfig) -> str | None:
    return None


@dataclass(frozen=True)
class FfnKind:
    name: str  # the ``ModelConfig.ffn_types()`` entry
    summary: str  # one line for docs and ``sbtrain-info``
    build: Callable[..., nn.Module]  # build(cfg, device=None, dtype=None); forward(h) -> y, or (y, aux loss)
    # tensor_parallel(ffn, tp_mesh, residual_placement): shard the built FFN in place (its input arrives
    # in ``residual_placement``, its output must leave in it).
    tensor_parallel: Callable
    # tp_split_dim(name relative to ``mlp.``) -> the dim its TP plan shards (None: replicated).
    tp_split_dim: Callable[[str], int | None]
    # activations(shapes, cfg) -> (saved bytes, backward workspace bytes) of one FFN on ``shapes.N`` tokens.
    activations: Callable
    # The HF-side code (``sbtrain/models/ffn/hf/``), pasted into the exported modeling_sbtrain.py; its
    # class registers with ``@export_ffn(name)`` and is built as ``cls(config)``.
    export_code: Path
    # tp_check(cfg, tp) -> None or raise ConfigError: the divisibility its TP plan needs.
    tp_check: Callable[[ModelConfig, int], None] = lambda cfg, tp: None
    # Parameters of a built FFN a token does not use (routed experts it is not sent to).
    inactive_params: Callable[[nn.Module], int] = lambda module: 0
    # upcycled_from(name relative to ``mlp.``) -> (dense teacher name relative to ``mlp.``, "routed" |
    # "shared") for a parameter built from the teacher's dense FFN; None: copied by name or initialised.
    upcycled_from: Callable[[str], tuple[str, str] | None] = lambda name: None
    info: Callable[[ModelConfig], dict] = _nothing
    plan_note: Callable[[ModelConfig], str | None] = _no_plan_note  # an assumption the planner states
    expert_parallel: bool = False  # the built module has ``experts`` that parallel.ep shards


FFNS: dict[str, FfnKind] = {}


def register(kind: FfnKind) -> FfnKind:
    if kind.name in FFNS:
        raise ValueError(f"FFN kind {kind.name!r} is registered twice")
    if not kind.export_code.is_file():
        raise FileNotFoundError(f"FFN kind {kind.name!r}: export code {kind.export_code} is missing")
    FFNS[kind.name] = kind
    register_ffn_kind(kind.name, kind.summary, kind.tp_check)
    return kind


def ffn_kind(name: str) -> FfnKind:
    try:
        return FFNS[name]
    except KeyError:
        raise ConfigError(f"FFN kind {name!r} is not registered; use one of {sorted(FFNS)}") from None


def layer_ffns(cfg: ModelConfig) -> list[FfnKind]:
    """The FFN kind of every layer."""
    return [ffn_kind(name) for name in cfg.ffn_types()]


__all__ = ["FFNS", "FfnKind", "ffn_kind", "layer_ffns", "register"]
