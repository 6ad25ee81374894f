"""Platform probe: cpu, cuda or maca (MetaX), decided with torch alone.

MACA presents its devices as ``cuda`` and maps ``nccl`` to MCCL, so it cannot be told apart
by device type. We look at the torch version string (``2.8.0+metax...``), the device name
(``MetaX C500``, ``MXC...``) and the environment (``MACA_PATH`` / ``MACA_HOME``, set by the
MACA SDK), then choose operators per platform; device types are never forked.
``SBTRAIN_PLATFORM=cpu|cuda|maca`` overrides the probe (e.g. to exercise the MetaX selection
path on a CPU box, or when a vendor build hides every clue).

The probe itself is :func:`probe_platform`, a pure function of its inputs so every branch can
be tested without the hardware; :func:`detect_platform` feeds it the real process state once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping

import torch

PLATFORMS = ("cpu", "cuda", "maca")
# Backends a call on each platform may use, most specific first: MACA runs the CUDA-alike
# backends (same device type, same APIs) after its own, never the other way round.
PLATFORM_CHAIN = {"cpu": ("cpu",), "cuda": ("cuda",), "maca": ("maca", "cuda")}
MACA_VERSION_MARKS = ("metax", "maca")
MACA_DEVICE_MARKS = ("metax", "mxc")
MACA_ENV_VARS = ("MACA_PATH", "MACA_HOME")
log = logging.getLogger("sbtrain.operators")


def _cuda_device_name() -> str:
    try:
        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - any failure means "no name to look at"
        return ""


def maca_evidence(
    torch_version: str, env: Mapping[str, str], device_name: Callable[[], str] = _cuda_device_name
) -> str | None:
    """Why this looks like a MetaX box (the first clue found), or ``None``.

    The device name is asked last: it initialises the device runtime, the other clues are free.
    """
    version = torch_version.lower()
    for mark in MACA_VERSION_MARKS:
        if mark in version:
            return f"torch version {torch_version!r} contains {mark!r}"
    for var in MACA_ENV_VARS:
        if env.get(var):
            return f"{var}={env[var]} is set"
    name = device_name() or ""
    for mark in MACA_DEVICE_MARKS:
        if mark in name.lower():
            return f"device name {name!r} contains {mark!r}"
    return None


def probe_platform(
    *,
    torch_version: str,
    cuda_available: bool,
    env: Mapping[str, str],
    device_name: Callable[[], str] = _cuda_device_name,
) -> tuple[str, str]:
    """``(platform, why)`` from the given process state; raises ValueError on a bad override."""
    forced = env.get("SBTRAIN_PLATFORM", "").strip().lower()
    if forced:
        if forced not in PLATFORMS:
            raise ValueError(
                f"SBTRAIN_PLATFORM={forced!r} is not a platform; use one of {', '.join(PLATFORMS)}"
            )
        return forced, f"SBTRAIN_PLATFORM={forced}"
    if not cuda_available:
        return "cpu", "torch sees no cuda device"
    evidence = maca_evidence(torch_version, env, device_name)
    if evidence:
        return "maca", evidence
    return "cuda", "cuda device without MetaX clues (version string, MACA_PATH/MACA_HOME, device name)"


@functools.cache
def detect_platform() -> str:
    """The platform this process runs on; ``SBTRAIN_PLATFORM`` overrides the probe (cached:
    tests that change the environment call ``detect_platform.cache_clear()``)."""
    platform, why = probe_platform(
        torch_version=torch.__version__, cuda_available=torch.cuda.is_available(), env=os.environ
    )
    log.info("sbtrain platform: %s (%s; torch %s)", platform, why, torch.__version__)
    return platform


def platform_of(tensor: torch.Tensor) -> str:
    """The platform a call on ``tensor`` runs on (a CPU tensor on a GPU box is ``cpu``)."""
    return "cpu" if tensor.device.type == "cpu" else detect_platform()


def default_device(platform: str | None = None) -> torch.device:
    platform = platform or detect_platform()
    return torch.device("cpu" if platform == "cpu" else "cuda")


def communication_backend(platform: str | None = None, device_type: str | None = None) -> str:
    """torch.distributed backend name: ``gloo`` on CPU (and for CPU tensors on any box);
    ``nccl`` on CUDA and on MACA, whose torch build routes ``nccl`` to MCCL."""
    platform = platform or detect_platform()
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is unknown; use one of {', '.join(PLATFORMS)}")
    return "gloo" if platform == "cpu" or device_type == "cpu" else "nccl"


def process_group_backend(platform: str | None = None, device_type: str | None = None) -> str:
    """The backend string a job's process group starts with. On an accelerator both halves:
    ``cpu:gloo,cuda:nccl`` routes each collective by its tensors' device, so the odd host-side
    reduction (a checkpoint planner's, a statistic left on the CPU) works instead of failing in
    NCCL at run time; the training loop itself keeps its tensors on the device (NCCL's path)."""
    backend = communication_backend(platform, device_type)
    return "gloo" if backend == "gloo" else f"cpu:gloo,cuda:{backend}"
