"""The gloo test harness: run a function on N local processes in one process group.

    results = run_distributed(fn, 2, arg1, arg2)   # fn(arg1, arg2) on ranks 0 and 1

Workers never come from a plain fork of the caller (a forked child inherits the parent's OpenMP
and autograd threads in an undefined state). The default start method is ``forkserver``: a
clean single-threaded server process imports torch once per session and forks each worker from
there, so a run costs tens of milliseconds instead of one torch import per worker (~3-7 s on
a loaded 2-core CI box). ``start_method="spawn"`` gives a fresh interpreter per worker.
Either way ``fn`` and its arguments must be picklable (``fn`` a module-level function), and a
script that calls this needs the ``if __name__ == "__main__":`` guard.

Workers are pooled: the first run for a world size starts N processes that join one process
group and then wait for work, so later runs cost a queue round trip instead of process start-up
and group rendezvous (the distributed suite runs dozens of functions). Before each function a
worker takes the caller's current environment (plus MASTER_ADDR / MASTER_PORT, RANK,
LOCAL_RANK, WORLD_SIZE, OMP_NUM_THREADS=1) and resets the state tests commonly change (default
dtype, thread count, RNG seed, comm counters). A function that fails, dies or outlives
``timeout`` is re-raised in the parent as :class:`DistributedWorkerError` with the worker's
traceback text, and the whole pool is killed (its other ranks may be stuck in a collective) and
started afresh by the next run, so a test never hangs and never inherits a broken group.
``reuse=False`` runs on fresh processes that exit afterwards.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing
import os
import queue
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedWorkerError", "WorkerPool", "free_port", "run_distributed", "shutdown_pools"]


class DistributedWorkerError(RuntimeError):
    """A worker raised, died or hung; the message holds its rank and traceback text."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free right now (bind to port 0). Another process could take it
    before rank 0 binds it; the window is milliseconds, and a clash fails loudly, not silently."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _result_path(result_dir: str, rank: int) -> str:
    return os.path.join(result_dir, f"rank{rank}.pt")


# Imported once by the forkserver so that forked workers start with them loaded.
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "tests.distributed.harness"]


def _worker_env(env: dict, rank: int, world_size: int, addr: str, port: int) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    # torch is already imported here, so the env var alone would not shrink its thread pool.
    torch.set_num_threads(1)


def _reset_state() -> None:
    """What one test function may change that the next must not inherit."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from parallel import comm_stats

    comm_stats.reset()


def _pool_worker(rank, world_size, backend, addr, port, timeout_s, env, tasks, results):
    _worker_env(env, rank, world_size, addr, port)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs, env, result_dir = task
            _worker_env(env, rank, world_size, addr, port)
            _reset_state()
            try:
                result = fn(*args, **kwargs)
                # A file, not a queue: tensors sent through a torch.multiprocessing queue live in
                # shared memory owned by the sender; a file is plain bytes.
                torch.save(result, _result_path(result_dir, rank))
                results.put((rank, None))
            except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _name(fn) -> str:
    return getattr(fn, "__name__", repr(fn))


class WorkerPool:
    """N processes in one process group, running one function at a time on every rank."""

    def __init__(self, world_size: int, backend: str = "gloo", start_method: str = "forkserver",
                 group_timeout: float = 600.0):
        if start_method == "forkserver":
            # Only takes effect when the server starts (the first pool of the session).
            multiprocessing.set_forkserver_preload(_FORKSERVER_PRELOAD)
        ctx = multiprocessing.get_context(start_method)
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        addr, port = "127.0.0.1", free_port()
        self.processes = [
            ctx.Process(target=_pool_worker, daemon=True,
                        args=(r, world_size, backend, addr, port, group_timeout, dict(os.environ), self.tasks[r],
                              self.results))
            for r in range(world_size)
        ]
        for p in self.processes:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float) -> list:
        """Run ``fn`` on every rank; on any failure the pool is closed and the error raised."""
        with tempfile.TemporaryDirectory(prefix="sbtrain-dist-") as result_dir:
            for q in self.tasks:
                q.put((fn, args, kwargs, dict(os.environ), result_dir))
            try:
                self._wait(fn, timeout)
            except BaseException:
                self.close(kill=True)
                raise
            return [torch.load(_result_path(result_dir, r), weights_only=False) for r in range(self.world_size)]

    def _wait(self, fn, timeout: float) -> None:
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < self.world_size:
            try:
                rank, error = self.results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(self.processes):
                    if not p.is_alive() and r not in done:
                        code = p.exitcode
                        how = f"signal {-code}" if code is not None and code < 0 else "signal None"
                        raise DistributedWorkerError(
                            f"rank {r} of {self.world_size} died without a Python exception (exit code {code}, "
                            f"{how}) in {_name(fn)}"
                        ) from None
                if time.monotonic() >= deadline:
                    alive = [r for r in range(self.world_size) if r not in done]
                    raise DistributedWorkerError(
                        f"run_distributed({_name(fn)}, world_size={self.world_size}): ranks {alive} still running "
                        f"after timeout={timeout}s (a collective waiting for a rank that skipped it?); raise "
                        f"timeout= if the work is genuinely that long"
                    ) from None
                continue
            if error is not None:
                raise DistributedWorkerError(f"rank {rank} of {self.world_size} raised in {_name(fn)}:\n{error}")
            done.add(rank)

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.processes:
                p.join(5)
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(5)


_POOLS: dict[tuple, WorkerPool] = {}


def _pool(world_size: int, backend: str, start_method: str) -> WorkerPool:
    key = (world_size, backend, start_method)
    pool = _POOLS.get(key)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close(kill=True)
        pool = _POOLS[key] = WorkerPool(world_size, backend, start_method)
    return pool


@atexit.register
def shutdown_pools() -> None:
    """Stop every pooled worker (also registered to run at interpreter exit)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 60.0,
    start_method: str = "forkserver",
    reuse: bool = True,
    **kwargs: Any,
) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` processes; return their results by rank.

    Raises :class:`DistributedWorkerError` if a worker raises (with its traceback), exits
    abnormally, or if the whole run takes longer than ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size={world_size} must be >= 1 (use 2 or 4 on CI)")
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"run_distributed: start_method={start_method!r}; use 'forkserver' or 'spawn' (never fork)")
    if not reuse:
        pool = WorkerPool(world_size, backend, start_method)
        try:
            return pool.run(fn, args, kwargs, timeout)
        finally:
            pool.close()
    return _pool(world_size, backend, start_method).run(fn, args, kwargs, timeout)
