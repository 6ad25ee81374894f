"""Gated linear attention: ops ``gla`` (a sequence) and ``gla_step`` (one decode token).

Backends: ``reference`` (``reference.py``, float64 oracle), ``chunked`` (``chunked.py`` +
``chunk_kernels.py``, plain torch, any device), ``fla`` (``fla_backend.py``, fla's Triton kernels
on CUDA; CPU tensors under ``TRITON_INTERPRET=1``) and ``fla_maca`` (``maca.py``, the same kernels
with MetaX-tuned launch limits).
"""

# The backends import the op objects from ``op`` themselves, so the order here does not matter.
from operators.gla import chunked as _chunked  # noqa: F401  backend "chunked" (any device)
from operators.gla import fla_backend as _fla  # noqa: F401  backend "fla" (CUDA; CPU under the interpreter)
from operators.gla import maca as _maca  # noqa: F401  backend "fla_maca" (MetaX)
from operators.gla.op import gla, gla_step

__all__ = ["gla", "gla_step"]
