"""Per-document index arrays (train/valid split, epoch permutations) computed once and memory-mapped.

A dataset of 50M documents made every rank hold several int64 copies of per-document arrays at open
time (lengths, the split permutation, sorted train ids, each epoch's order): gigabytes per rank, times
8 ranks a node. Here they are built once per node (an ``fcntl`` lock: the first process builds, the
others wait) into ``.npy`` files written atomically (a temporary folder / file, then ``os.replace``),
and every rank ``np.load(mmap_mode="r")``s them: the page cache holds one copy per node. Two nodes on a
shared file system that race build identical bytes, so the loser's rename is simply dropped.

The arrays are exactly those of the in-memory formulas they replace (``rng.permutation(n)`` equals an
in-place ``rng.shuffle`` of ``arange(n)`` whatever the integer dtype, which numpy guarantees by the
shuffle drawing the same numbers for the same length), so loader states written before stay valid.

Where: ``$SBTRAIN_INDEX_CACHE/<hash of the dataset path>`` if set, else ``<dataset>/index_cache``, or
``~/.cache/sbtrain/index/<hash>`` when the dataset folder is read-only. The key of every file holds the
manifest fingerprint, document count and ``.idx`` size, so a rebuilt dataset never reads stale arrays.
Datasets below :data:`MMAP_MIN_DOCUMENTS` documents compute the same arrays in memory (no files).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
from collections.abc import Callable, Iterator

import numpy as np

CACHE_VERSION = 1
MMAP_MIN_DOCUMENTS = 1 << 16  # below this the arrays are a few hundred KB: not worth files
CHUNK = 1 << 22  # elements per pass of the chunked loops (32 MB of int64 at most)


def index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def cache_dir(dataset_dir: str) -> str:
    tag = hashlib.sha256(os.path.abspath(dataset_dir).encode()).hexdigest()[:16]
    env = os.environ.get("SBTRAIN_INDEX_CACHE")
    if env:
        return os.path.join(env, tag)
    beside = os.path.join(dataset_dir, "index_cache")
    with contextlib.suppress(OSError):
        os.makedirs(beside, exist_ok=True)
    if os.access(beside, os.W_OK):
        return beside
    return os.path.join(os.path.expanduser("~/.cache/sbtrain/index"), tag)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _lock(path: str):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        except OSError:  # a file system without flock (some Lustre mounts): each process may build; rename is atomic
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(final: str, build: Callable[[str], None]) -> None:
    """Make ``final`` (a file or folder) by ``build(tmp)`` unless it exists; atomic and built once per node."""
    if os.path.exists(final):
        return
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with _lock(final + ".lock"):
        if os.path.exists(final):  # another process built it while this one waited
            return
        tmp = f"{final}.tmp.{socket.gethostname()}.{os.getpid()}"
        try:
            build(tmp)
            os.replace(tmp, final)
            # Safe to drop: whoever opens a lock from now on finds ``final`` once it holds it.
            os.unlink(final + ".lock")
        except OSError:
            if not os.path.exists(final):  # a rename lost to another node's identical copy is fine
                raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.unlink(tmp)


def _alloc(path: str | None, n: int, dtype) -> np.ndarray:
    """An array in memory (``path`` None) or a fresh ``.npy`` file mapped read-write."""
    if path is None:
        return np.empty(n, dtype=dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))


def _shuffled_arange(path: str | None, n: int, seed: list[int]) -> np.ndarray:
    """``default_rng(seed).permutation(n)`` without an int64 array in memory: shuffled in place (in the file)."""
    out = _alloc(path, n, index_dtype(n))
    for c in range(0, n, CHUNK):
        out[c:c + CHUNK] = np.arange(c, min(c + CHUNK, n), dtype=out.dtype)
    np.random.default_rng(seed).shuffle(out.view(np.ndarray))  # same draws as permutation(n)
    return out


def _where(mask: np.ndarray, value: bool, out: np.ndarray) -> None:
    """``out[:] = np.flatnonzero(mask == value)`` in chunks."""
    at = 0
    for c in range(0, mask.size, CHUNK):
        ids = np.flatnonzero(mask[c:c + CHUNK] == value) + c
        out[at:at + ids.size] = ids
        at += ids.size
    assert at == out.size


def _idx_chunks(idx_path: str, n: int, which: str) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, values)`` chunks of the .idx's sequence lengths (int32) or document indices (int64), read with
    plain file reads: a pass over the mmap would map every page of it into this process (RSS of a rank)."""
    with open(idx_path, "rb") as f:
        head = f.read(34)  # magic (9), version (8), dtype code (1), sequence count (8), document count (8)
        version, n_seq, n_doc = struct.unpack("<Q", head[9:17])[0], *struct.unpack("<QQ", head[18:34])
        if head[:9] != b"MMIDIDX\x00\x00" or version != 1 or n_seq != n:
            raise ValueError(f"{idx_path}: not a version-1 megatron index of {n} sequences")
        dtype, offset, count = ((np.int32, 34, n) if which == "lengths" else (np.int64, 34 + 12 * n, n_doc))
        f.seek(offset)
        for c in range(0, count, CHUNK):
            yield c, np.fromfile(f, dtype=dtype, count=min(CHUNK, count - c))


def _build_split(folder: str | None, idx_path: str, n: int, n_valid: int,
                 split_seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    at = (lambda name: os.path.join(folder, name)) if folder is not None else (lambda name: None)
    if folder is not None:
        os.makedirs(folder)
    # Old formula: perm = default_rng([split_seed, n]).permutation(n); valid = sort(perm[:n_valid]); train = the rest.
    perm = _shuffled_arange(at("perm.npy"), n, [split_seed, n])
    mask = np.zeros(n, dtype=bool)  # 1 byte a document, only while building
    for c in range(0, n_valid, CHUNK):
        mask[perm[c:min(c + CHUNK, n_valid)]] = True
    del perm  # unmapped before the next files are written: the builder's peak RSS stays one array's size
    if folder is not None:
        os.unlink(os.path.join(folder, "perm.npy"))
    dtype = index_dtype(n)
    valid, train = _alloc(at("valid_ids.npy"), n_valid, dtype), _alloc(at("train_ids.npy"), n - n_valid, dtype)
    _where(mask, True, valid)
    _where(mask, False, train)
    total = valid_tokens = 0
    for c, lengths in _idx_chunks(idx_path, n, "lengths"):
        total += int(lengths.sum(dtype=np.int64))
        valid_tokens += int(lengths[mask[c:c + lengths.size]].sum(dtype=np.int64))
    # One sequence per document: document_indices == arange(n + 1) (a count check alone misses an empty
    # document next to a two-sequence one).
    one_per_doc = all(np.array_equal(v, np.arange(c, c + v.size)) for c, v in _idx_chunks(idx_path, n, "documents"))
    meta = {"documents": n, "one_sequence_per_document": bool(one_per_doc), "valid_tokens": valid_tokens,
            "train_tokens": total - valid_tokens}
    if folder is not None:
        for a in (valid, train):
            a.flush()
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f)
    return valid, train, meta


class DocumentIndex:
    """The split of one dataset (``valid_ids``, ``train_ids``: sorted document ids) and its epoch orders."""

    def __init__(self, dataset_dir: str, fingerprint: str, n: int, n_valid: int, split_seed: int):
        idx_path = os.path.join(dataset_dir, "data.idx")
        self.folder = None
        if n >= MMAP_MIN_DOCUMENTS:
            idx_size = os.path.getsize(idx_path)
            self.folder = cache_dir(dataset_dir)
            self.key = _key(fingerprint, n, idx_size, n_valid, split_seed)
            split = os.path.join(self.folder, f"split-{self.key}")
            _cached(split, lambda tmp: _build_split(tmp, idx_path, n, n_valid, split_seed))
            self.valid_ids = np.load(os.path.join(split, "valid_ids.npy"), mmap_mode="r")
            self.train_ids = np.load(os.path.join(split, "train_ids.npy"), mmap_mode="r")
            with open(os.path.join(split, "meta.json")) as f:
                self.meta = json.load(f)
        else:
            self.valid_ids, self.train_ids, self.meta = _build_split(None, idx_path, n, n_valid, split_seed)

    def epoch_order(self, seed: int, d: int, epoch: int) -> np.ndarray:
        """``train_ids[default_rng([seed, d, epoch]).permutation(len(train_ids))]``, memory-mapped when large."""
        if self.folder is None:
            return self._order(None, seed, d, epoch)
        path = os.path.join(self.folder, f"order-{self.key}-{_key(seed, d, epoch)}.npy")
        _cached(path, lambda tmp: self._order(tmp, seed, d, epoch))
        return np.load(path, mmap_mode="r")

    def _order(self, tmp: str | None, seed: int, d: int, epoch: int) -> np.ndarray:
        n = self.train_ids.size
        out = _shuffled_arange(tmp, n, [seed, d, epoch])  # tmp: renamed to its final name by _cached
        # A map of its own: the pages the gather touches leave this process's RSS with it, not with self.train_ids.
        train = self.train_ids if tmp is None else np.load(self.train_ids.filename, mmap_mode="r")
        for c in range(0, n, CHUNK):  # gather in place: each chunk is read before it is overwritten
            out[c:c + CHUNK] = train[np.asarray(out[c:c + CHUNK])]
        if tmp is not None:
            out.flush()
        return out
