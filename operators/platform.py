"""Platform probe: cpu, cuda or maca (MetaX), decided with torch alone.

MACA presents its devices as ``cuda`` and maps ``nccl`` to MCCL, so it cannot be told apart
by device type. We look at the torch version string, the device name and the environment,
then choose operators per platform; device types are never forked.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

PLATFORMS = ("cpu", "cuda", "maca")
log = logging.getLogger("sbtrain.operators")


def _looks_like_maca() -> bool:
    version = torch.__version__.lower()
    if "metax" in version or "maca" in version:
        return True
    if os.environ.get("MACA_PATH") or os.environ.get("MACA_HOME"):
        return True
    try:
        name = torch.cuda.get_device_name(0).lower()
    except Exception:  # noqa: BLE001 - any failure means "not a MetaX device"
        return False
    return "metax" in name or "mxc" in name


@functools.cache
def detect_platform() -> str:
    """The platform this process runs on; ``SBTRAIN_PLATFORM`` overrides the probe."""
    forced = os.environ.get("SBTRAIN_PLATFORM", "").strip().lower()
    if forced:
        if forced not in PLATFORMS:
            raise ValueError(
                f"SBTRAIN_PLATFORM={forced!r} is not a platform; use one of {', '.join(PLATFORMS)}"
            )
        platform = forced
    elif torch.cuda.is_available():
        platform = "maca" if _looks_like_maca() else "cuda"
    else:
        platform = "cpu"
    log.info("sbtrain platform: %s (torch %s)", platform, torch.__version__)
    return platform


def platform_of(tensor: torch.Tensor) -> str:
    """The platform a call on ``tensor`` runs on (a CPU tensor on a GPU box is ``cpu``)."""
    return "cpu" if tensor.device.type == "cpu" else detect_platform()


def default_device(platform: str | None = None) -> torch.device:
    platform = platform or detect_platform()
    return torch.device("cpu" if platform == "cpu" else "cuda")


def communication_backend(platform: str | None = None) -> str:
    """torch.distributed backend name: gloo on CPU; nccl on CUDA and on MACA (MCCL behind it)."""
    platform = platform or detect_platform()
    return "gloo" if platform == "cpu" else "nccl"
