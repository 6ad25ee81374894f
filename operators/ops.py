"""The op table: ``from operators import ops; ops.gla(q, k, v, g)``.

Each op is defined (:func:`operators.registry.define_op`) beside its reference, and each faster
backend registers itself on import of its module, next to the op it serves:

- one folder per sequence-mixing op (``operators/<op>/``: ``op.py`` defines the op objects, the
  reference beside the backends, ``__init__`` imports them); folders are discovered here, so a new
  op is one folder and no line elsewhere;
- the small dense ops live in flat modules (``elementwise.py``, ``cross_entropy.py``,
  ``grouped_mm.py``, ``spike.py``) with their backends (``fast_elementwise.py``,
  ``chunked_cross_entropy.py``) imported below.

``ops.<name>`` reads the registry (:data:`operators.registry.OPS`), so it works for every op.
"""

from __future__ import annotations

import importlib
import pkgutil

from operators import chunked_cross_entropy as _chunked_ce  # noqa: F401  backend "chunked" (memory-bounded CE)
from operators import fast_elementwise as _fast_elementwise  # noqa: F401  backend "torch_grouped_mm"
from operators.cross_entropy import linear_cross_entropy
from operators.elementwise import rms_norm, rotary, swiglu
from operators.grouped_mm import grouped_mm
from operators.registry import OPS
from operators.spike import spike


def _discover_op_folders() -> None:
    import operators

    for info in pkgutil.iter_modules(operators.__path__):
        if info.ispkg:
            importlib.import_module(f"operators.{info.name}")


_discover_op_folders()
from operators.attention import attention
from operators.gla import gla, gla_step


def __getattr__(name: str):
    """``ops.<name>`` for ops defined by discovered folders."""
    try:
        return OPS[name]
    except KeyError:
        raise AttributeError(f"operators.ops has no op {name!r}; defined: {sorted(OPS)}") from None


__all__ = ["attention", "gla", "gla_step", "grouped_mm", "linear_cross_entropy", "rms_norm", "rotary", "spike",
           "swiglu"]
