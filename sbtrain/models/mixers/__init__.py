"""Mixer kinds: the sequence-mixing half of a decoder block, one module per kind, each declaring
everything about itself in a :class:`MixerKind` (``registry.py``). A new kind is one module here,
its HF-side code in ``hf/``, and its name on the registration line below."""

from sbtrain.models.mixers import attention, gated_delta, gla, hybrid  # noqa: F401  one module per kind
from sbtrain.models.mixers.registry import MIXERS, MixerKind, kind_of, layer_mixers, mixer_kind, register

__all__ = ["MIXERS", "MixerKind", "kind_of", "layer_mixers", "mixer_kind", "register"]
