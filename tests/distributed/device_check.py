"""Catch, on the CPU, the collectives that would fail on a GPU: every tensor handed to a
collective must live on the model's device.

On a CPU test box every tensor is a CPU tensor, so "is it on the model's device?" alone can
never fail there. :class:`HostTensorTracker` makes the GPU's distinction visible: a tensor
created by a factory without an explicit ``device=`` (``torch.tensor(x)``, ``torch.zeros(n)``),
or by ``.cpu()`` / ``torch.from_numpy``, is a *host* tensor, and so is anything computed from host
tensors alone. ``.to(device)`` / ``.to(other_tensor)`` yields a device tensor again. On a GPU a
host tensor is a CPU tensor, which an NCCL group rejects at run time; here
:class:`CollectiveDeviceCheck` sees every c10d collective at dispatch (``dist.*`` calls, FSDP2's
reduce-scatters and DTensor's functional collectives alike) and records any tensor argument that is
a host tensor or sits on another device than the model's.

Limits: ``.to("cpu")`` is indistinguishable from ``.to(model_device)`` on a CPU box (both are
``torch.device("cpu")``), so it counts as a device move; only collectives on the calling thread
are seen (the trainer's and FSDP's run there).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.from_numpy,
}
TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy}
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


def _tensors(obj) -> list[torch.Tensor]:
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


def _to_names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a target device (a device, a string, or a tensor)."""
    if "device" in kwargs or "other" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


class HostTensorTracker(TorchFunctionMode):
    """Marks the tensors that would be host (CPU) tensors on a GPU box (see the module doc)."""

    MARK = "_sbtrain_host_tensor"  # an attribute on the tensor's Python object (seen at dispatch too)

    def is_host(self, t: torch.Tensor) -> bool:
        return getattr(t, self.MARK, False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            host = kwargs.get("device") is None
        elif func in TO_HOST:
            host = True
        elif func is torch.Tensor.to:
            if _to_names_device(args, kwargs):
                # A move to a device. On the CPU box it returns the same (marked) object when it
                # is already there; on a GPU it would be a new device tensor: unmark it.
                for t in _tensors(out):
                    if self.is_host(t):
                        delattr(t, self.MARK)
                return out
            host = any(self.is_host(t) for t in _tensors(args[:1]))
        else:
            inputs = _tensors((args, kwargs))
            host = bool(inputs) and all(self.is_host(t) for t in inputs)
        if host:
            for t in _tensors(out):
                setattr(t, self.MARK, True)
        return out


class CollectiveDeviceCheck(TorchDispatchMode):
    """Records ``(op, reason)`` for every collective given a tensor off ``device`` or a host tensor."""

    def __init__(self, device: torch.device, tracker: HostTensorTracker):
        super().__init__()
        self.device, self.tracker = torch.device(device), tracker
        self.violations: list[tuple[str, str]] = []
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in COLLECTIVE_NAMESPACES:
            name = str(func)
            self.seen.append(name)
            for t in _tensors((args, kwargs)):
                if t.device != self.device:
                    self.violations.append((name, f"tensor on {t.device}, model on {self.device}"))
                elif self.tracker.is_host(t):
                    reason = (f"host tensor {tuple(t.shape)} {t.dtype} (created without a device, or by "
                              ".cpu()): a CPU tensor on a GPU box")
                    self.violations.append((name, reason))
        return func(*args, **kwargs)


class collectives_on_device:  # a context manager, named like one
    """``with collectives_on_device(dev) as check: ...``; then ``check.violations``."""

    def __init__(self, device: torch.device):
        self.tracker = HostTensorTracker()
        self.check = CollectiveDeviceCheck(device, self.tracker)

    def __enter__(self) -> CollectiveDeviceCheck:
        self.tracker.__enter__()
        self.check.__enter__()
        return self.check

    def __exit__(self, *exc):
        self.check.__exit__(*exc)
        self.tracker.__exit__(*exc)
        return False
