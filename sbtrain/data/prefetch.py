"""Build the next global batches in a background thread while the training step runs (``data.prefetch``).

:class:`PrefetchLoader` wraps a loader with ``next_global_batch`` / ``state_dict`` / ``load_state_dict``
(:class:`sbtrain.data.loader.PackedLoader`). A daemon thread calls the inner loader's
``next_global_batch`` ahead of training (mmap reads, packing, collation, cu_seqlens: numpy and torch
release the GIL for most of it) and puts ``(micro batches, inner state after them)`` into a queue of
``depth`` batches. Consuming a batch makes its paired state the current one, so :meth:`state_dict`
describes the batches training actually received, never those built ahead: a checkpoint resumes
exactly. :meth:`load_state_dict` stops the thread and drops what it had built before moving the inner
loader. The inner loader is touched only by that thread while it runs (it is not thread-safe).

On CUDA the micro batches are pinned (page-locked) in the thread, so the trainer's host-to-device copy
is a direct DMA and can be asynchronous with ``.to(device, non_blocking=True)``. Pinning starts only
once the main thread has initialised CUDA (the trainer has chosen its device), on that device, so a
rank never creates a context on another rank's GPU.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator

import torch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class PrefetchLoader:
    def __init__(self, loader, depth: int = 2, pin_memory: bool | None = None):
        if int(depth) < 1:
            raise ValueError(f"prefetch depth={depth} must be >= 1 (0 = no prefetch: use the loader itself)")
        self.loader, self.depth = loader, int(depth)
        self.pin_memory = pin_memory  # None: pin when CUDA is initialised in this process
        self._state = loader.state_dict()  # after the batches consumed so far
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- the thread ------------------------------------------------------------------------------
    def _start(self) -> None:
        pin, device = bool(self.pin_memory), None
        if self.pin_memory is None:
            pin = torch.cuda.is_available() and torch.cuda.is_initialized()
        if pin and torch.cuda.is_available():
            device = torch.cuda.current_device()  # the main thread's device: the thread pins on the same one
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop, pin, device),
                                        name="sbtrain-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, q: queue.Queue, stop: threading.Event, pin: bool, device) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            while not stop.is_set():
                micro = self.loader.next_global_batch()
                if pin:
                    micro = [{k: v.pin_memory() for k, v in mb.items()} for mb in micro]
                item = (micro, self.loader.state_dict())
                while not stop.is_set():  # a bounded put that still notices a stop
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 -- any failure (even KeyboardInterrupt) is re-raised by the consumer
            q.put(_Failure(e))

    def _halt(self) -> None:
        """Stop the thread and drop every batch it built ahead (they were not trained on)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblocks a put that is waiting for room
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = self._queue = None

    def close(self) -> None:
        """Stop the thread (it holds a reference to this object, so it is never collected while it runs)."""
        self._halt()

    # ---- what the trainer calls ------------------------------------------------------------------
    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._thread.join()
            self._thread = self._queue = None
            raise item.error
        micro, self._state = item
        return micro

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from self.next_global_batch()

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict, new_stage: bool | None = None) -> None:
        self._halt()  # the inner loader is ahead of the consumed state: discard and rewind it
        self.loader.load_state_dict(state, new_stage=new_stage)
        self._state = self.loader.state_dict()

    # The consumed position, not the thread's (which is up to ``depth`` batches ahead).
    @property
    def samples_consumed(self) -> int:
        return int(self._state["samples_consumed"])

    @property
    def total_samples(self) -> int:
        return int(self._state["total_samples"])

    @property
    def total_tokens(self) -> int:
        return int(self._state["total_tokens"])

    @property
    def stage(self) -> int:
        return int(self._state["stage"])

    def progress(self) -> dict:
        s = self._state
        return {"stage": s["stage"], "samples_consumed": s["samples_consumed"], "total_tokens": s["total_tokens"],
                "datasets": [{"dir": d.dir, "epoch": e, "position": p, "train_documents": len(d.train_ids)}
                             for d, (e, p) in zip(self.loader.sets, s["window_start"]["docs"])]}

    def valid_batches(self, max_samples: int | None = None):
        # Reads only immutable parts of the inner loader (the datasets, seq_len, ranks): safe beside the thread.
        return self.loader.valid_batches(max_samples)

    def __getattr__(self, name: str):
        # Settings (seq_len, G, m, sets, packer, eod_id, fingerprint ...) read through to the inner loader.
        if name.startswith("_") or name in ("loader", "depth", "pin_memory"):
            raise AttributeError(name)
        return getattr(self.loader, name)
