"""What every backend calling flash-linear-attention's Triton kernels shares: where they run (CUDA;
CPU tensors under ``TRITON_INTERPRET=1``), the availability check, fla's layout keyword and the
device / dtype checks. Used by ``operators/gla/fla_backend.py`` and ``operators/gated_delta/fla_backend.py``."""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from operators.triton_interpreter import install_shims, interpreter_enabled

# Read once: fla's kernels are compiled or interpreted depending on TRITON_INTERPRET when fla
# is imported, so a later change of the variable could not take effect anyway.
CPU_VIA_INTERPRETER = interpreter_enabled()
PLATFORMS = ("cuda", "cpu") if CPU_VIA_INTERPRETER else ("cuda",)


def fla_available(module: str = "fla") -> bool:
    """A CUDA device (or the interpreter) and an importable fla ``module`` (ImportError -> unavailable)."""
    if not (torch.cuda.is_available() or CPU_VIA_INTERPRETER):
        return False
    importlib.import_module(module)
    if CPU_VIA_INTERPRETER:
        install_shims()  # before any fla kernel runs
    return True


@functools.cache
def layout_kwargs(fn) -> tuple:
    """``(("head_first", False),)`` if this fla version still takes head_first, else ()."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    return (("head_first", False),) if "head_first" in params else ()


def decline_device(q: torch.Tensor) -> str | None:
    """Why fla cannot take ``q``'s device / dtype here, or None."""
    if q.device.type == "cpu" and CPU_VIA_INTERPRETER:
        if q.dtype == torch.bfloat16:
            return "bf16 under the Triton interpreter: its bf16 tl.dot is wrong (a Triton limitation)"
    elif q.device.type != "cuda":
        return f"fla runs on CUDA tensors only (CPU ones under TRITON_INTERPRET=1), got {q.device.type}"
    return None


__all__ = ["CPU_VIA_INTERPRETER", "PLATFORMS", "decline_device", "fla_available", "layout_kwargs"]
