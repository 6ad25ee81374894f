"""The gloo test harness: run a function on N local processes in one process group.

    results = run_distributed(fn, 2, arg1, arg2)   # fn(arg1, arg2) on ranks 0 and 1

Workers never come from a plain fork of the caller (a forked child inherits the parent's OpenMP
and autograd threads in an undefined state). The default start method is ``forkserver``: a
clean single-threaded server process imports torch once per session and forks each worker from
there, so a run costs tens of milliseconds instead of one torch import per worker (~3-7 s on
a loaded 2-core CI box). ``start_method="spawn"`` gives a fresh interpreter per worker.
Either way ``fn`` and its arguments must be picklable (``fn`` a module-level function), and a
script that calls this needs the ``if __name__ == "__main__":`` guard.

The harness copies the caller's current environment into each worker (the forkserver was started
earlier), sets MASTER_ADDR / MASTER_PORT (a port the OS reports free), RANK, LOCAL_RANK,
WORLD_SIZE and OMP_NUM_THREADS=1, joins the process group, runs ``fn``, destroys the group and
returns the per-rank results in rank order. A worker's exception is re-raised in the parent as
:class:`DistributedWorkerError` carrying the worker's traceback text; a worker that dies or a run
that outlives ``timeout`` fails too, and the remaining workers are killed, so a test never hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedWorkerError", "free_port", "run_distributed"]


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
_FORKSERVER_PRELOAD = ["torch", "torch.distributed", "parallel.testing"]


def _worker(rank, fn, args, kwargs, env, world_size, backend, addr, port, timeout_s, result_dir):
    # mp.start_processes calls this with the process index first.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    # torch is already imported here, so the env var alone would not shrink its thread pool.
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(*args, **kwargs)
        # A file, not a queue: tensors sent through a torch.multiprocessing queue live in shared
        # memory owned by the sender, which exits right after; a file outlives it.
        torch.save(result, _result_path(result_dir, rank))
    finally:
        dist.destroy_process_group()


def _kill(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(5)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 60.0,
    start_method: str = "forkserver",
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
    if start_method == "forkserver":
        # Only takes effect when the server starts (the first run of the session).
        multiprocessing.set_forkserver_preload(_FORKSERVER_PRELOAD)
    addr, port = "127.0.0.1", free_port()
    with tempfile.TemporaryDirectory(prefix="sbtrain-dist-") as result_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, args, kwargs, dict(os.environ), world_size, backend, addr, port, timeout, result_dir),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                    raise DistributedWorkerError(
                        f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}): ranks {alive} "
                        f"still running after timeout={timeout}s (a collective waiting for a rank that skipped "
                        f"it?); raise timeout= if the work is genuinely that long"
                    )
        except mp.ProcessRaisedException as exc:
            # exc's message is the worker's formatted traceback.
            raise DistributedWorkerError(
                f"rank {exc.error_index} of {world_size} raised in {getattr(fn, '__name__', fn)}:\n{exc}"
            ) from None
        except mp.ProcessExitedException as exc:
            raise DistributedWorkerError(
                f"rank {exc.error_index} of {world_size} died without a Python exception "
                f"(exit code {exc.exit_code}, signal {exc.signal_name}) in {getattr(fn, '__name__', fn)}"
            ) from None
        finally:
            _kill(ctx)
        missing = [r for r in range(world_size) if not os.path.exists(_result_path(result_dir, r))]
        if missing:
            raise DistributedWorkerError(f"ranks {missing} exited cleanly but returned no result (sys.exit in fn?)")
        return [torch.load(_result_path(result_dir, r), weights_only=False) for r in range(world_size)]
