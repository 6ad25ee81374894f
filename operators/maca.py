"""MetaX (MACA): flash-linear-attention with MetaX-tuned Triton launch configurations. This module
holds the tuning tables and the machinery shared by every op's ``fla_maca`` backend; each backend
lives beside the op it serves (``operators/gla/maca.py``).

MACA's Triton backend (named ``maca``) runs 64-lane warps, twice NVIDIA's 32, so fla's
autotune lists, written for NVIDIA, launch twice the threads per program they intend
(``num_warps=8`` is 512 threads on MetaX) and spend registers and shared memory on block
shapes tuned for another cache. ``fla_maca`` (``ops.gla`` and ``ops.gla_step``, platform
``maca``) calls the same fla kernels as the CUDA ``fla`` backend, after restricting the
autotune lists of fla's kernels to the MetaX table below: block sizes (``BK``/``BV``) and
warp counts (``num_warps``, in 64-lane warps) and pipeline stages no larger than the table's.

Where fla offers a knob, and where it does not (fla >= 0.2; read in fla's source):
- ``chunk_gla``'s public API takes no block sizes; its kernels choose ``BK``/``BV``/``num_warps``
  by ``triton.autotune`` over lists fixed at import. Those lists are the knob: we filter each
  ``Autotuner.configs`` (kept originals, so a new table re-filters) and clear its cache.
- The chunk size ``BT`` is 64 inside ``chunk_gla`` with no public argument: not tunable here.
- Kernels launched without autotune (``fused_recurrent_gla`` picks ``BK, BV = min(K, 64),
  min(V, 64)`` in Python; some helpers pass fixed ``num_warps``) cannot be reached; the
  ``gla_step`` row applies only to whatever its modules autotune.
If a table leaves a kernel no configuration, that kernel keeps fla's list (logged).

Under ``TRITON_INTERPRET=1`` (CI without a GPU) ``fla_maca`` also takes CPU tensors, like
``fla``, but only in a process whose platform is ``maca`` (``SBTRAIN_PLATFORM=maca``): that is
the MetaX walk exercised on a CPU box, and elsewhere ``fla`` stays the CPU choice. The
interpreter runs each autotuned kernel's first candidate left after the MetaX filter.

The defaults are a starting point derived from the warp arithmetic (half NVIDIA's warp
counts, 64-wide blocks, two stages), not measurements: no MetaX device was available when
they were written. Edit them per recipe (``operators.maca.gla.num_warps=2``) or with
:func:`set_tuning`, and measure with ``sbtrain-bench``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping

import torch

from operators.platform import detect_platform
from operators.triton_interpreter import install_shims, interpreter_enabled

log = logging.getLogger("sbtrain.operators")

TUNING_KNOBS = ("block_k", "block_v", "num_warps", "num_stages")
# Triton meta-parameter each block knob bounds, as fla names them in its autotune configs.
BLOCK_META = {"BK": "block_k", "BV": "block_v"}
# Per op: upper bounds for fla's autotune candidates on MetaX (warps of 64 lanes), and the fla modules
# whose autotuned kernels serve it (missing ones, in other fla versions, are skipped). Each op's
# folder fills both with :func:`register_tuning` beside its ``fla_maca`` backend (``operators/gla/maca.py``).
DEFAULT_MACA_TUNING: dict[str, dict[str, int]] = {}
FLA_MODULES: dict[str, tuple[str, ...]] = {}


def register_tuning(op: str, defaults: Mapping[str, int], fla_modules: tuple[str, ...]) -> None:
    """Declare an op's MetaX limits (every knob of :data:`TUNING_KNOBS`) and the fla modules they filter."""
    if set(defaults) != set(TUNING_KNOBS):
        raise ValueError(f"MetaX tuning of {op!r} must set exactly {TUNING_KNOBS}, got {sorted(defaults)}")
    DEFAULT_MACA_TUNING[op] = dict(defaults)
    FLA_MODULES[op] = tuple(fla_modules)

_user_tuning: dict[str, dict[str, int]] = {}
_applied: dict[str, dict[str, int]] = {}  # op -> limits last applied to fla's kernels


def merge_tuning(overrides: Mapping[str, Mapping[str, int]] | None = None,
                 base: Mapping[str, Mapping[str, int]] = DEFAULT_MACA_TUNING) -> dict[str, dict[str, int]]:
    """``base`` with ``overrides`` laid over it, knob by knob; unknown ops or knobs and
    non-positive or non-power-of-two values raise ValueError naming the choices."""
    merged = {op: dict(knobs) for op, knobs in base.items()}
    for op, knobs in (overrides or {}).items():
        if op not in merged:
            raise ValueError(f"operators.maca: op {op!r} has no MetaX tuning; tuned ops: {', '.join(sorted(merged))}")
        for knob, value in (knobs or {}).items():
            if knob not in TUNING_KNOBS:
                raise ValueError(f"operators.maca.{op}: knob {knob!r} is unknown; knobs: {', '.join(TUNING_KNOBS)}")
            if value is None:
                continue  # unset in the recipe: keep the default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"operators.maca.{op}.{knob}={value!r} must be a positive power of two (e.g. 32, 64)")
            merged[op][knob] = value
    return merged


def set_tuning(overrides: Mapping[str, Mapping[str, int]] | None) -> dict[str, dict[str, int]]:
    """Install the recipe's ``operators.maca`` table (validated now); returns the previous
    overrides so a caller can restore them. fla's kernels are re-filtered at the next call."""
    merge_tuning(overrides)  # validate before touching anything
    previous = {op: dict(knobs) for op, knobs in _user_tuning.items()}
    _user_tuning.clear()
    _user_tuning.update({op: {k: v for k, v in knobs.items() if v is not None} for op, knobs in (overrides or {}).items()})
    return previous


def tuning(op: str) -> dict[str, int]:
    """The limits the ``fla_maca`` backend of ``op`` applies: defaults merged with the recipe's."""
    return merge_tuning(_user_tuning)[op]


def _is_autotuner(obj) -> bool:
    return isinstance(getattr(obj, "configs", None), list) and hasattr(obj, "fn")


def _fits(config, limits: Mapping[str, int]) -> bool:
    if getattr(config, "num_warps", 1) > limits["num_warps"]:
        return False
    if (getattr(config, "num_stages", 1) or 1) > limits["num_stages"]:
        return False
    meta = getattr(config, "kwargs", {}) or {}
    return all(meta.get(name, 0) <= limits[knob] for name, knob in BLOCK_META.items())


def restrict_autotuned(kernels: Iterable, limits: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """Filter each Triton ``Autotuner``'s candidate configs to those within ``limits``, always
    starting from fla's original list; returns ``(kernel, kept, original)`` per kernel."""
    report = []
    for kernel in kernels:
        if not _is_autotuner(kernel):
            continue
        original = getattr(kernel, "_sbtrain_original_configs", None)
        if original is None:
            original = list(kernel.configs)
            kernel._sbtrain_original_configs = original
        kept = [c for c in original if _fits(c, limits)]
        name = getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
        if not kept:
            log.warning("MetaX tuning %s leaves fla kernel %s no config; keeping fla's %d", limits, name, len(original))
            kept = list(original)
        kernel.configs = kept
        if isinstance(getattr(kernel, "cache", None), dict):
            kernel.cache.clear()  # choices benchmarked under the old list must not survive
        report.append((name, len(kept), len(original)))
    return report


def _apply_tuning(op: str) -> None:
    limits = tuning(op)
    if _applied.get(op) == limits:
        return
    for module_name in FLA_MODULES[op]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            log.debug("fla module %s not in this fla version; nothing to tune there", module_name)
            continue
        for kernel, kept, original in restrict_autotuned(vars(module).values(), limits):
            log.info("MetaX tuning %s: %s.%s keeps %d of %d configs", op, module_name, kernel, kept, original)
    _applied[op] = limits


# Read once, as in operators.gla.fla_backend: fla's kernels are interpreted or not from import on.
CPU_VIA_INTERPRETER = interpreter_enabled()
PLATFORMS = ("maca", "cpu") if CPU_VIA_INTERPRETER else ("maca",)


def _available() -> bool:
    import fla  # noqa: F401  (ImportError -> "fla not importable")

    if CPU_VIA_INTERPRETER:
        install_shims()  # before any fla kernel runs
        return True
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no cuda (MACA) device")
    return True


def _decline_dtype(q) -> str | None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {str(q.dtype).replace('torch.', '')} unsupported by fla's Triton kernels"
    return None


def _decline_cpu(q) -> str | None:
    # Only reached for CPU tensors under the interpreter (otherwise the platform walk stops them).
    if q.device.type == "cpu" and detect_platform() != "maca":
        return "CPU tensors go to fla_maca under the Triton interpreter only when the platform is maca"
    return None
