"""The Hugging Face side of each FFN kind, pasted into the exported ``modeling_sbtrain.py`` after the
mixers' code (``sbtrain/models/mixers/hf/``, whose ``common.py`` holds ``EXPORT_FFNS`` and the
``@export_ffn(kind)`` decorator). Each file's text below ``EXPORTED_BELOW`` is what is copied; an FFN
is built as ``EXPORT_FFNS[kind](config)`` and its forward is ``forward(x) -> y``."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

HERE = Path(__file__).parent


def load_all() -> dict:
    """Import every fragment in this folder (in-package use) and return the filled ``EXPORT_FFNS``."""
    from sbtrain.models.mixers.hf.common import EXPORT_FFNS

    for info in pkgutil.iter_modules([str(HERE)]):
        importlib.import_module(f"{__name__}.{info.name}")
    return EXPORT_FFNS


__all__ = ["load_all"]
