"""Op registry: one pure-PyTorch reference per op plus optional faster backends.

A backend declares the platforms it runs on, ``is_available()`` (cached; may import lazily),
a cheap per-call ``accepts(*args, **kwargs)`` returning ``None`` or the reason it declines,
and a priority. A call goes to the highest-priority backend that is available and accepts;
the reference takes whatever nobody else does.

The walk is tiered by platform (``PLATFORM_CHAIN``): on MACA the MetaX backends come first,
then the CUDA-alike ones, then (for CPU tensors) the CPU ones, then the reference; every backend
passed over is logged with its reason ("fla not importable", "tensor on cpu", ...). The walk
is :func:`select_backend`, a function of the platform, the device type and (optionally) the
availability of each backend, so the MetaX path can be tested on a CPU box.

Forcing: ``SBTRAIN_OPS=op:backend,...`` (environment) and :func:`set_overrides` (the recipe's
``operators.overrides`` table; the environment wins per op) force a backend: if it is
unavailable or declines the call, that is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from operators.platform import PLATFORM_CHAIN, PLATFORMS, detect_platform

log = logging.getLogger("sbtrain.operators")

REFERENCE = "reference"
BACKEND_ALIASES = {"naive": REFERENCE}  # names users reach for; the registry's name is "reference"

# True only while a profiler window is open (sbtrain.trainer.observability.ProfilerCallback):
# calls are then wrapped in a ``sbtrain::<op>[<backend>]`` profiler range. Off, the dispatch
# pays one global read instead of entering and leaving a record_function per call.
PROFILING = False


def set_profiling(on: bool) -> None:
    """Name the chosen backend of every op call in profiler traces (on) or not (off)."""
    global PROFILING
    PROFILING = bool(on)


@torch.compiler.assume_constant_result
def _process_platform() -> str:
    """:func:`detect_platform`, a constant of the trace under ``torch.compile``: dynamo would trace
    through its cache into the probe (environment, CUDA runtime, a log call: a graph break)."""
    return detect_platform()


def _always() -> bool:
    return True


def _accept_all(*args, **kwargs) -> str | None:
    return None


@dataclass
class Backend:
    name: str
    fn: Callable
    priority: int = 0
    platforms: tuple = PLATFORMS
    is_available: Callable[[], bool] = _always
    accepts: Callable[..., str | None] = _accept_all
    _available: bool | None = field(default=None, repr=False)
    unavailable_reason: str | None = field(default=None, repr=False)

    def available(self) -> bool:
        if self._available is None:
            available, reason = self._probe()
            if torch.compiler.is_compiling():
                return available  # no cache write in a trace (see prepare_for_compile)
            self._available, self.unavailable_reason = available, reason
            if not available:
                log.debug("backend %s unavailable: %s", self.name, reason)
        return self._available

    def _probe(self) -> tuple[bool, str | None]:
        try:
            if self.is_available():
                return True, None
            return False, "is_available() is False (no device or missing package)"
        except ImportError as exc:  # an optional package missing means unavailable
            return False, f"{exc.name or exc} not importable"
        except Exception as exc:  # noqa: BLE001 - any probe failure means unavailable
            return False, f"{type(exc).__name__}: {exc}"


@dataclass
class Selection:
    """The outcome of a walk: the chosen backend, the backends passed over (name, reason) in
    the order tried, and who forced the choice (``None``: nobody)."""

    backend: Backend
    skipped: list = field(default_factory=list)
    forced_by: str | None = None


def _forced_backends() -> dict[str, str]:
    spec = os.environ.get("SBTRAIN_OPS", "").strip()
    forced: dict[str, str] = {}
    if not spec:
        return forced
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"SBTRAIN_OPS entry {item!r} must look like op:backend (e.g. gla:chunked)")
        op, backend = (s.strip() for s in item.split(":", 1))
        forced[op] = backend
    return forced


_RECIPE_OVERRIDES: dict[str, str] = {}


def set_overrides(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """Install the recipe's ``{op: backend}`` table (replacing the previous one, which is
    returned so a caller can restore it). Every op and backend name is checked now: an unknown
    one raises ValueError naming the choices. ``naive`` is accepted for ``reference``."""
    table = {}
    for op_name, backend in (overrides or {}).items():
        op = OPS.get(op_name)
        if op is None:
            raise ValueError(f"operators.overrides: op {op_name!r} is unknown; ops: {', '.join(sorted(OPS))}")
        name = BACKEND_ALIASES.get(backend, backend)
        if name not in op.backends:
            raise ValueError(
                f"operators.overrides: op {op_name!r} has no backend {backend!r}; "
                f"backends: {', '.join(sorted(op.backends))} (or 'naive' for reference)"
            )
        table[op_name] = name
    previous = dict(_RECIPE_OVERRIDES)
    _RECIPE_OVERRIDES.clear()
    _RECIPE_OVERRIDES.update(table)
    for op in OPS.values():
        op._logged.clear()  # a new table may change choices: log them again
    return previous


def get_overrides() -> dict[str, str]:
    return dict(_RECIPE_OVERRIDES)


def _forced_backend(op_name: str) -> tuple[str, str] | None:
    """``(backend, source)`` forced for this op, the environment before the recipe."""
    env = _forced_backends().get(op_name)
    if env is not None:
        return BACKEND_ALIASES.get(env, env), "SBTRAIN_OPS"
    if op_name in _RECIPE_OVERRIDES:
        return _RECIPE_OVERRIDES[op_name], "operators.overrides"
    return None


def _walk_order(op: Op, platform: str, call_platform: str) -> list[Backend]:
    """Non-reference backends in the order tried: tier by tier along the call platform's chain
    (MACA: MetaX, then CUDA-alike), by priority inside a tier. For CPU tensors in a GPU process
    the device backends come first, only to be logged as passed over ("tensor on cpu")."""
    candidates = [b for b in op.backends.values() if b.name != REFERENCE]
    order: list[Backend] = []
    if call_platform != platform:
        device_only = [b for b in candidates if not set(b.platforms) & set(PLATFORM_CHAIN[call_platform])
                       and set(b.platforms) & set(PLATFORM_CHAIN[platform])]
        order += sorted(device_only, key=lambda b: -b.priority)
    for tier in PLATFORM_CHAIN[call_platform]:
        seen = {b.name for b in order}
        order += sorted((b for b in candidates if tier in b.platforms and b.name not in seen), key=lambda b: -b.priority)
    return order


def _platform_reason(backend: Backend, call_platform: str, device_type: str, platform: str) -> str | None:
    if not set(backend.platforms) & set(PLATFORM_CHAIN[call_platform]):
        if device_type == "cpu" and platform != "cpu":
            return f"tensor on cpu (the {platform} backend needs a {platform} device)"
        return f"runs on {', '.join(backend.platforms)}, not on {call_platform}"
    return None


def _walk_plan(op: Op, platform: str, call_platform: str, device_type: str) -> list:
    """``[(backend, platform reason or None)]`` in walk order, cached per op (every call walks it)."""
    key = (platform, call_platform, device_type == "cpu")
    plan = op._plans.get(key)
    if plan is None:
        plan = [(b, _platform_reason(b, call_platform, device_type, platform))
                for b in _walk_order(op, platform, call_platform)]
        if not torch.compiler.is_compiling():  # no cache write in a trace (see prepare_for_compile)
            op._plans[key] = plan
    return plan


def _why_not(backend: Backend, platform_reason: str | None, available: Mapping[str, bool | str] | None) -> str | None:
    """Why ``backend`` cannot take this call (before ``accepts``), or None."""
    if platform_reason:
        return platform_reason
    verdict = (available or {}).get(backend.name)
    if verdict is None:
        return None if backend.available() else backend.unavailable_reason
    if isinstance(verdict, str):
        return verdict
    return None if verdict else "marked unavailable"


def select_backend(
    op: Op,
    *,
    platform: str,
    device_type: str = "cuda",
    available: Mapping[str, bool | str] | None = None,
    args: tuple | None = (),
    kwargs: dict | None = None,
) -> Selection:
    """Walk ``op``'s backends for a call on ``device_type`` tensors in a ``platform`` process.

    ``available`` overrides the real probe per backend (True, False or the reason it is
    missing); ``args=None`` skips the per-call ``accepts`` checks (a static answer: what a
    call that every backend accepts would get). ``kwargs`` are the call's keyword arguments.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is unknown; use one of {', '.join(PLATFORMS)}")
    kwargs = kwargs or {}
    call_platform = "cpu" if device_type == "cpu" else platform

    def declines(backend: Backend, platform_reason: str | None) -> str | None:
        reason = _why_not(backend, platform_reason, available)
        if reason is None and args is not None:
            reason = backend.accepts(*args, **kwargs)
        return reason

    forced = _forced_backend(op.name)
    if forced is not None:
        name, source = forced
        backend = op.backends.get(name)
        if backend is None:
            raise ValueError(
                f"{source} forces {op.name}:{name}, but op {op.name!r} has no such "
                f"backend; known: {', '.join(sorted(op.backends))}"
            )
        if name != REFERENCE:
            reason = _why_not(backend, _platform_reason(backend, call_platform, device_type, platform), available)
            if reason:
                raise RuntimeError(
                    f"{source} forces {op.name}:{name}, which is not available on platform "
                    f"{call_platform!r} ({reason}); remove it from {source} or install what it needs"
                )
            reason = backend.accepts(*args, **kwargs) if args is not None else None
            if reason:
                raise RuntimeError(f"{source} forces {op.name}:{name}, which declines this call: {reason}")
        return Selection(backend, forced_by=source)
    skipped = []
    for backend, platform_reason in _walk_plan(op, platform, call_platform, device_type):
        reason = declines(backend, platform_reason)
        if reason is None:
            return Selection(backend, skipped)
        skipped.append((backend.name, reason))
    return Selection(op.backends[REFERENCE], skipped)


class Op:
    """A dispatching callable; ``ops.gla_chunked(...)`` etc. are instances of this."""

    def __init__(self, name: str, reference: Callable, doc: str = ""):
        self.name = name
        self.backends: dict[str, Backend] = {REFERENCE: Backend(REFERENCE, reference, priority=-1)}
        self.__doc__ = doc or reference.__doc__
        self._logged: set = set()
        self._plans: dict = {}  # walk order per (platform, call platform, cpu tensors), see _walk_plan

    def register(self, backend: Backend) -> Backend:
        if backend.name in self.backends:
            raise ValueError(f"op {self.name!r} already has a backend named {backend.name!r}")
        self.backends[backend.name] = backend
        self._plans.clear()
        return backend

    @property
    def reference(self) -> Callable:
        return self.backends[REFERENCE].fn

    def _device_type(self, args, kwargs) -> str:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device.type
        return "cpu"

    def _platform(self, args, kwargs) -> str:
        return "cpu" if self._device_type(args, kwargs) == "cpu" else _process_platform()

    def resolve(self, args: tuple, kwargs: dict) -> Selection:
        """The walk for a real call: this process's platform, the arguments' device."""
        device_type = self._device_type(args, kwargs)
        return select_backend(self, platform=_process_platform(), device_type=device_type, args=args, kwargs=kwargs)

    def select(self, *args, **kwargs) -> Backend:
        """The backend a call with these arguments would use."""
        return self.resolve(args, kwargs).backend

    def __call__(self, *args, **kwargs):
        selection = self.resolve(args, kwargs)
        backend = selection.backend
        if not torch.compiler.is_compiling():
            # Under torch.compile the walk runs once, at trace time: a log call there is a graph
            # break and the ``_logged`` set a guard that the next eager call would invalidate.
            self._log_choice(selection, self._platform(args, kwargs))
        # Compiled: no profiler range (dynamo drops them), and no read of PROFILING, whose guard
        # would recompile every block when a profiler window opens.
        if torch.compiler.is_compiling() or not PROFILING:
            return backend.fn(*args, **kwargs)
        with torch.profiler.record_function(f"sbtrain::{self.name}[{backend.name}]"):
            return backend.fn(*args, **kwargs)

    def _log_choice(self, selection: Selection, platform: str) -> None:
        backend = selection.backend
        key = (platform, backend.name)
        if key not in self._logged:
            self._logged.add(key)
            log.info("op %s on %s -> backend %s", self.name, key[0], backend.name)
            for name, reason in selection.skipped:
                log.info("op %s on %s: skipped %s: %s", self.name, key[0], name, reason)
            if selection.forced_by:
                log.info("op %s on %s: %s forced by %s", self.name, key[0], backend.name, selection.forced_by)

    def call_backend(self, name: str, *args, **kwargs):
        """Call one backend by name (conformance tests and benchmarks)."""
        return self.backends[name].fn(*args, **kwargs)

    def available_backends(self, platform: str = "cpu") -> list[str]:
        """Backends a call on ``platform`` devices could use (MACA: its own and the CUDA-alike)."""
        chain = set(PLATFORM_CHAIN[platform])
        return [b.name for b in self.backends.values() if chain & set(b.platforms) and b.available()]


OPS: dict[str, Op] = {}


def prepare_for_compile(device_types: tuple[str, ...] | None = None) -> None:
    """Fill the caches every call's backend walk reads (walk plans, availability probes) before
    ``torch.compile`` traces model code. The walk is then traced as plain reads: a cache filled
    inside a trace would be a guard that the next call fails (a recompile of every compiled block),
    so the walk never writes them while compiling. ``device_types``: the tensors' device types
    (default: ``cpu`` and this platform's device)."""
    platform = detect_platform()
    for device_type in device_types or (("cpu",) if platform == "cpu" else ("cpu", "cuda")):
        call_platform = "cpu" if device_type == "cpu" else platform
        for op in OPS.values():
            for backend, platform_reason in _walk_plan(op, platform, call_platform, device_type):
                if platform_reason is None:
                    backend.available()


def define_op(name: str, reference: Callable) -> Op:
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    OPS[name] = Op(name, reference)
    return OPS[name]
