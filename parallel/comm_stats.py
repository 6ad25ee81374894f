"""Bytes sent per collective kind, counted at the call site (for benchmarks and tests).

Every distributed form in ``parallel/`` calls :func:`record` next to its collective with the
number of bytes *this rank sends* (its own contribution: an all-gather of an n-byte tensor over
P ranks records n, an all-to-all records the bytes leaving the rank, a P2P send its payload).
Counting at the call site, not from a profiler, keeps the figure backend-independent (gloo,
NCCL and MCCL report nothing comparable).
"""

from __future__ import annotations

from collections import defaultdict

import torch

_SENT: dict[str, int] = defaultdict(int)
_CALLS: dict[str, int] = defaultdict(int)


def record(kind: str, payload: torch.Tensor | int) -> None:
    """Count ``payload`` (a tensor about to be sent, or a byte count) under ``kind``."""
    nbytes = payload.numel() * payload.element_size() if isinstance(payload, torch.Tensor) else int(payload)
    _SENT[kind] += nbytes
    _CALLS[kind] += 1


def snapshot() -> dict[str, dict[str, int]]:
    """``{kind: {"bytes": n, "calls": c}}`` since the last :func:`reset`."""
    return {k: {"bytes": _SENT[k], "calls": _CALLS[k]} for k in sorted(_SENT)}


def reset() -> None:
    _SENT.clear()
    _CALLS.clear()


__all__ = ["record", "reset", "snapshot"]
