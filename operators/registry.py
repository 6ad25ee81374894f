"""Op registry: one pure-PyTorch reference per op plus optional faster backends.

A backend declares the platforms it runs on, ``is_available()`` (cached; may import lazily),
a cheap per-call ``accepts(*args, **kwargs)`` returning ``None`` or the reason it declines,
and a priority. A call goes to the highest-priority backend that is available and accepts;
the reference takes whatever nobody else does. ``SBTRAIN_OPS=op:backend,...`` forces a
backend: if it is unavailable or declines the call, that is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from operators.platform import PLATFORMS, platform_of

log = logging.getLogger("sbtrain.operators")

REFERENCE = "reference"


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

    def available(self) -> bool:
        if self._available is None:
            try:
                self._available = bool(self.is_available())
            except Exception as exc:  # noqa: BLE001 - an import error means unavailable
                log.debug("backend %s unavailable: %s", self.name, exc)
                self._available = False
        return self._available


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


class Op:
    """A dispatching callable; ``ops.gla_chunked(...)`` etc. are instances of this."""

    def __init__(self, name: str, reference: Callable, doc: str = ""):
        self.name = name
        self.backends: dict[str, Backend] = {REFERENCE: Backend(REFERENCE, reference, priority=-1)}
        self.__doc__ = doc or reference.__doc__
        self._logged: set = set()

    def register(self, backend: Backend) -> Backend:
        if backend.name in self.backends:
            raise ValueError(f"op {self.name!r} already has a backend named {backend.name!r}")
        self.backends[backend.name] = backend
        return backend

    @property
    def reference(self) -> Callable:
        return self.backends[REFERENCE].fn

    def _platform(self, args, kwargs) -> str:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return platform_of(value)
        return "cpu"

    def select(self, *args, **kwargs) -> Backend:
        """The backend a call with these arguments would use."""
        platform = self._platform(args, kwargs)
        forced = _forced_backends().get(self.name)
        if forced is not None:
            backend = self.backends.get(forced)
            if backend is None:
                raise ValueError(
                    f"SBTRAIN_OPS forces {self.name}:{forced}, but op {self.name!r} has no such "
                    f"backend; known: {', '.join(sorted(self.backends))}"
                )
            if platform not in backend.platforms or not backend.available():
                raise RuntimeError(
                    f"SBTRAIN_OPS forces {self.name}:{forced}, which is not available on platform "
                    f"{platform!r}; remove it from SBTRAIN_OPS or install what it needs"
                )
            reason = backend.accepts(*args, **kwargs)
            if reason:
                raise RuntimeError(f"SBTRAIN_OPS forces {self.name}:{forced}, which declines this call: {reason}")
            return backend
        for backend in sorted(self.backends.values(), key=lambda b: -b.priority):
            if backend.name == REFERENCE:
                continue
            if platform in backend.platforms and backend.available() and not backend.accepts(*args, **kwargs):
                return backend
        return self.backends[REFERENCE]

    def __call__(self, *args, **kwargs):
        backend = self.select(*args, **kwargs)
        key = (self._platform(args, kwargs), backend.name)
        if key not in self._logged:
            self._logged.add(key)
            log.info("op %s on %s -> backend %s", self.name, key[0], backend.name)
        with torch.profiler.record_function(f"sbtrain::{self.name}[{backend.name}]"):
            return backend.fn(*args, **kwargs)

    def call_backend(self, name: str, *args, **kwargs):
        """Call one backend by name (conformance tests and benchmarks)."""
        return self.backends[name].fn(*args, **kwargs)

    def available_backends(self, platform: str = "cpu") -> list[str]:
        return [b.name for b in self.backends.values() if platform in b.platforms and b.available()]


OPS: dict[str, Op] = {}


def define_op(name: str, reference: Callable) -> Op:
    if name in OPS:
        raise ValueError(f"op {name!r} is defined twice")
    OPS[name] = Op(name, reference)
    return OPS[name]
