"""Atomic, verifiable checkpoints on torch.distributed.checkpoint (DCP).

Layout of ``<dir>``::

    step_00000010/           one checkpoint: DCP shards (tensors only), state.json (everything
        __0_0.distcp          that is not a tensor: step, loader state, RNG states, optimizer
        .metadata             hyperparameters), meta.json (config, git revision), and
        state.json            manifest.json (size + sha256 of every other file), written last
        meta.json
        manifest.json
    latest                   name of the newest good checkpoint, replaced atomically

Integrity is split across ranks: after ``dcp.save`` each rank hashes the files it wrote (its own
``__<rank>_<n>.distcp``; rank 0 also .metadata, state.json, meta.json), the digests are gathered
on the save's group and rank 0 writes the manifest. On load each rank checks every file's size but
hashes only its share (a shard file: the rank that wrote it; the rest balanced by size), and the
verdict is all-gathered, so every rank loads, skips or raises on the same checkpoint together.

A checkpoint is written into ``.step_XXXXXXXX.tmp`` and renamed when complete, so a crash at
any moment leaves the previous checkpoint intact; ``latest`` is updated after the rename. On
load, a checkpoint whose manifest is missing or does not match its files is skipped with a
warning and the previous good one is used. Non-tensor values never go through DCP, which would
pickle them: they are JSON, so loading a checkpoint never unpickles anything.

``async_save=True``: ``save`` snapshots the tensors to CPU on the calling (main) thread and
writes them in a background thread while training goes on; the next ``save`` (and ``wait``)
first waits for it and re-raises its error. Every collective of that thread (the checkpoint's
barriers and DCP's plan exchange) runs on the checkpoint's own gloo group, never on a group the
training loop uses: collectives issued from two threads on one process group are matched in
whatever order each rank happens to issue them, which deadlocks or mixes up payloads, and on a
GPU job the default group is NCCL anyway while the snapshot is on the CPU. The snapshot of a
DTensor (FSDP2 / TP shards) stays a DTensor with the same mesh and placements, so the sharded
layout is written as usual; DCP plans it from the mesh coordinates alone, which needs no
collective on the mesh's groups.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from sbtrain.models.weights import file_sha256
from sbtrain.trainer.checkpoint_tree import SEP, CheckpointError, _jsonable, flatten, snapshot, unflatten

__all__ = ["SEP", "CheckpointError", "Checkpointer", "async_group", "flatten", "snapshot", "unflatten", "verify", "verify_together"]

log = logging.getLogger("sbtrain.checkpoint")
STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # FileSystemWriter: __<rank>_<n>.distcp


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


ASYNC_THREAD_NAME = "sbtrain-async-checkpoint"
# (default group, the async saves' gloo group over the same ranks): one per process, not one per
# Checkpointer (a staged run builds one per stage), re-created if the default group was replaced.
_ASYNC_GROUP: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None


def async_group() -> dist.ProcessGroup | None:
    """The group of every collective in an asynchronous save (None without torch.distributed).

    Created by a collective call on the first asynchronous save: every rank saves at the same
    steps (the trainer agrees on when), from the main thread, before its background thread starts.
    Its timeout is c10d's default, which the trainer sets to ``parallel.collective_timeout_s``."""
    global _ASYNC_GROUP
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _ASYNC_GROUP is None or _ASYNC_GROUP[0] is not world:
        _ASYNC_GROUP = (world, dist.new_group(backend="gloo"))
    return _ASYNC_GROUP[1]


def _sha256(path: Path) -> str:
    """One file's sha256 (the weights' manifest uses the same); a module function so tests can count
    which files each rank hashes."""
    return file_sha256(path)


def _fsync_tree(path: Path) -> None:
    """The manifest and the directory entry (each rank synced the files it wrote)."""
    with open(path / "manifest.json", "rb") as f:
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_owner(name: str) -> int | None:
    """The rank whose DCP writer wrote ``name`` (``__<rank>_<n>.distcp``), None for other files."""
    match = SHARD_FILE.match(name)
    return int(match.group(1)) if match else None


def _hash_own(tmp: Path, rank: int) -> dict:
    """Size and sha256 of the files this rank wrote: its own DCP shards, and on rank 0 everything
    else (.metadata, state.json, meta.json). Each rank reads only what it wrote, while it is
    likely still in the page cache, instead of rank 0 re-reading every shard alone."""
    entries = {}
    for f in sorted(tmp.iterdir()):
        owner = _shard_owner(f.name)
        if f.is_file() and (owner == rank or (owner is None and rank == 0)):
            with open(f, "rb") as handle:  # durable before the manifest names it
                os.fsync(handle.fileno())
            entries[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return entries


def _shares(entries: dict, world: int) -> list[set]:
    """Which files each rank hashes on load: a shard file goes to the rank that wrote it (at the
    same world size the one that reads it), the rest to the least loaded rank, biggest first.
    Deterministic: every rank computes the same split from the same manifest."""
    shares, load = [set() for _ in range(world)], [0] * world
    for name, entry in sorted(entries.items(), key=lambda kv: (-kv[1]["size"], kv[0])):
        owner = _shard_owner(name)
        rank = owner if owner is not None and owner < world else min(range(world), key=lambda r: (load[r], r))
        shares[rank].add(name)
        load[rank] += entry["size"]
    return shares


def verify(path: Path, rank: int = 0, world: int = 1) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else the reason it is not.

    With ``world > 1`` this rank checks every file's presence and size but hashes only its share
    (:func:`_shares`); the caller agrees on the result across ranks. The default hashes it all."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    mine = _shares(entries, world)[rank] if world > 1 else set(entries)
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, manifest says {entry['size']}"
        if name in mine and _sha256(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def verify_together(path: Path) -> str | None:
    """:func:`verify` split across the default group's ranks, the verdict agreed by all: every
    rank returns the same reason (the first rank's that found one), so all load or all skip."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify(path)
    try:
        mine: str | None = verify(path, dist.get_rank(), dist.get_world_size())
    except OSError as exc:  # unreadable here: a verdict like any other, never a missed collective
        mine = f"unreadable ({exc})"
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, mine)
    bad = [(r, reason) for r, reason in enumerate(reasons) if reason is not None]
    return None if not bad else f"{bad[0][1]} (found by rank {bad[0][0]})"


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, async_save: bool = False,
                 check_meta: Callable[[Path, dict], None] | None = None):
        """``check_meta(path, meta)`` sees the meta.json of the checkpoint about to be loaded (after
        it verified, before any tensor is read) and raises to refuse it (e.g. another model)."""
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1 (the last good checkpoint is kept)")
        self.dir = Path(directory)
        self.check_meta = check_meta
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, state: dict, meta: dict) -> Path:
        """Write ``state`` (nested dicts of tensors and JSON values) as checkpoint ``step``."""
        self.wait()
        flat = flatten(state)
        tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        # Encoded now: a bad value fails here, and a later change to ``meta`` cannot leak in.
        others = json.dumps({k: _jsonable(v) for k, v in flat.items() if not isinstance(v, torch.Tensor)})
        meta_json = json.dumps({"step": step, **meta}, indent=1, default=str)
        if self.async_save:
            group = async_group()  # a collective call: on the main thread, never in the saver
            tensors = {k: snapshot(v) for k, v in tensors.items()}
            self._pending = threading.Thread(target=self._save_guarded, args=(step, tensors, others, meta_json, group),
                                             name=ASYNC_THREAD_NAME, daemon=True)
            self._pending.start()
        else:
            self._save(step, tensors, others, meta_json, None)  # main thread: the default group is safe
        return self.dir / f"step_{step:08d}"

    def wait(self) -> None:
        """Block until an asynchronous save has finished; re-raise its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"asynchronous checkpoint save failed: {error}") from error

    def _save_guarded(self, *args) -> None:
        try:
            self._save(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self._error = exc

    def _save(self, step: int, tensors: dict, others: str, meta_json: str, group: dist.ProcessGroup | None) -> None:
        """Every collective here is on ``group`` (None: the default group, main thread only)."""
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        if _rank0():
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier(group)
        with warnings.catch_warnings():  # "assuming single process" when no process group: intended
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.save(tensors, checkpoint_id=str(tmp), process_group=group)
        if _rank0():
            (tmp / "state.json").write_text(others)
            (tmp / "meta.json").write_text(meta_json)
        # dcp.save returns after every rank's writes finished, so each rank hashes its own files;
        # rank 0 merges the results (the gather is this step's barrier) into the manifest.
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        try:
            mine: dict | str = _hash_own(tmp, rank)
        except OSError as exc:  # sent, not raised: a rank that skipped the gather would hang the rest
            mine = f"rank {rank} could not hash its files: {exc}"
        parts: list = [mine]
        if dist.is_initialized():
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, mine, group=group)
        errors = [part for part in parts if isinstance(part, str)]
        if errors:  # every rank raises, the temp dir stays, `latest` still names the previous one
            raise CheckpointError(f"checkpoint {tmp}: {errors[0]}")
        if _rank0():
            files = {name: entry for part in parts for name, entry in part.items()}
            for f in sorted(tmp.iterdir()):  # a file no rank claimed (another writer's naming): hash it here
                if f.is_file() and f.name not in files:
                    log.warning("checkpoint %s: %s has no owner rank; hashed by rank 0", tmp, f.name)
                    files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
            (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": dict(sorted(files.items()))},
                                                          indent=1))
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step: move the old copy aside first, then drop it
                trash = self.dir / f".{name}.old"
                shutil.rmtree(trash, ignore_errors=True)
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
            latest_tmp = self.dir / ".latest.tmp"
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, self.dir / "latest")
            self._prune(keep=final)
            log.info("checkpoint saved: %s", final)
        _barrier(group)

    def _prune(self, keep: Path) -> None:
        steps = sorted(self.list(), key=lambda p: p.name)
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def candidates(self) -> list[Path]:
        """Checkpoints to try, newest first: ``latest``, then every step directory."""
        ordered = sorted(self.list(), key=lambda p: p.name, reverse=True)
        latest = self.dir / "latest"
        if latest.is_file():
            named = self.dir / latest.read_text().strip()
            if named in ordered:
                ordered.remove(named)
                ordered.insert(0, named)
        return ordered

    def load(self, state: dict, path: str | os.PathLike | None = None) -> dict | None:
        """Load into ``state`` (same structure as saved; tensors loaded in place) and return the
        checkpoint's meta, or None when there is no checkpoint. With ``path``, only that one."""
        tried = [Path(path)] if path is not None else self.candidates()
        for candidate in tried:
            reason = verify_together(candidate)  # the same verdict on every rank: never a split decision
            if reason is not None:
                if path is not None:
                    raise CheckpointError(f"checkpoint {candidate} is not usable: {reason}")
                log.warning("skipping checkpoint %s: %s; trying the previous one", candidate, reason)
                continue
            if self.check_meta is not None:
                self.check_meta(candidate, json.loads((candidate / "meta.json").read_text()))
            return self._load(candidate, state)
        return None

    def _load(self, path: Path, state: dict) -> dict:
        flat = flatten(state)
        tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        others = json.loads((path / "state.json").read_text())
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        missing = sorted(k for k in flat if k not in saved and k not in others)
        if missing:
            raise CheckpointError(
                f"checkpoint {path} lacks {len(missing)} entries the current run needs (e.g. {missing[:3]}): "
                "is it from another model or config?"
            )
        for key, tensor in tensors.items():
            size = getattr(saved[key], "size", None)
            if size is not None and tuple(size) != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint {path}: {key} has shape {tuple(size)}, this run expects {tuple(tensor.shape)}; "
                    "is it from another model?"
                )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
                dcp.load(tensors, checkpoint_id=str(path))
        except (Exception, CheckpointException) as exc:  # DCP names the mismatch; add what to check
            raise CheckpointError(f"checkpoint {path} does not fit this run ({exc}); is it from another model?") from exc
        flat.update(tensors)
        flat.update({k: others[k] for k in flat if k in others})
        restored = unflatten(flat)
        state.clear()
        state.update(restored)
        meta = json.loads((path / "meta.json").read_text())
        meta["path"] = str(path)
        return meta
