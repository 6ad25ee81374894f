"""Causal softmax attention (full, sliding window, learned sinks, packed documents): op ``attention``.

Backends: ``reference`` (``reference.py``), ``sdpa`` (``sdpa.py``, torch SDPA with block-local
sliding windows, any device) and ``flash_attn`` (``flash_attn_backend.py``, CUDA).
"""

from operators.attention import flash_attn_backend as _flash  # noqa: F401  backend "flash_attn" (CUDA)
from operators.attention import sdpa as _sdpa  # noqa: F401  backend "sdpa" (any device)
from operators.attention.op import attention

__all__ = ["attention"]
