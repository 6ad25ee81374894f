"""The Hugging Face side of each mixer kind: plain torch code that ``sbtrain-export`` pastes into the
exported ``modeling_sbtrain.py`` (users load it without sbtrain, with ``trust_remote_code=True``).

Each file here is importable (for tests and linting), and its text below the line
:data:`EXPORTED_BELOW` is what the exporter copies: ``common.py`` first (shared helpers and the
``EXPORT_MIXERS`` table), ``cache.py`` (the decode cache, a transformers ``Cache``), then the file
named by every registered kind's ``MixerKind.export_code``. A mixer's forward is
``forward(x, cos, sin, real=None, cache=None)``: ``real`` ``[B,T]`` bool is False at padding tokens
(None: no padding), ``cache`` the layer's ``SbtrainLayerCache`` (None: no decode cache).
A kind's classes register themselves with ``@export_mixer("kind", ...)`` and are built as
``EXPORT_MIXERS[kind](config, kind)`` by the exported decoder layer.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

EXPORTED_BELOW = "# --- exported code below ---"
HERE = Path(__file__).parent


def exported_text(path: Path) -> str:
    """The part of a fragment file the exporter copies."""
    text = path.read_text()
    if EXPORTED_BELOW not in text:
        raise ValueError(f"{path} has no line {EXPORTED_BELOW!r}: the exporter would not know what to copy")
    return text.split(EXPORTED_BELOW, 1)[1].strip("\n") + "\n"


def load_all() -> dict:
    """Import every fragment in this folder (in-package use) and return the filled ``EXPORT_MIXERS``."""
    from sbtrain.models.mixers.hf.common import EXPORT_MIXERS

    for info in pkgutil.iter_modules([str(HERE)]):
        importlib.import_module(f"{__name__}.{info.name}")
    return EXPORT_MIXERS


__all__ = ["EXPORTED_BELOW", "exported_text", "load_all"]
