"""FFN kinds: the channel-mixing half of a decoder block, one module per kind, each declaring
everything about itself in an :class:`FfnKind` (``registry.py``). A new kind is one module here, its
HF-side code in ``hf/``, and its name on the registration line below."""

from sbtrain.models.ffn import dense, moe  # noqa: F401  one module per kind (dense first: moe's shared expert)
from sbtrain.models.ffn.registry import FFNS, FfnKind, ffn_kind, layer_ffns, register

__all__ = ["FFNS", "FfnKind", "ffn_kind", "layer_ffns", "register"]
