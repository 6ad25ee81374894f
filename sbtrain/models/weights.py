"""The sbtrain *weights directory*: a model's weights and its exact config, nothing else.

Written by ``sbtrain-convert`` (a converted Transformer) and read by ``trainer.init_from`` and
``sbtrain-export``::

    <dir>/config.yaml                        the ModelConfig (every key; loads with to_model_config)
    <dir>/model.safetensors                  one file, or HF-style shards:
    <dir>/model-00001-of-00003.safetensors     ...
    <dir>/model.safetensors.index.json       {"metadata": {...}, "weight_map": {name: file}}
    <dir>/tokenizer/                         optional: the tokenizer the model was trained with
    <dir>/provenance.json                    optional: where the weights came from
    <dir>/weights_manifest.json              size + sha256 of every other file, written last

Tensor names are the model's state-dict names (HF's: ``model.layers.{i}.self_attn.q_proj.weight``);
expert weights are ``[E, Din, Dout]``. safetensors only: loading never unpickles anything.
Shards are written as they fill, so a caller that streams tensors (conversion) holds at most
one shard in memory besides what it is computing.

Damage is named, never loaded: the manifest is checked before a directory is read (a truncated or
overwritten file is an error naming it; a directory written before manifests existed gets a
warning), a file safetensors cannot parse is an error naming it, and every loaded float tensor
must be finite (a NaN start would otherwise surface much later as a "diverged" run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sbtrain.config.model import ConfigError, ModelConfig

CONFIG = "config.yaml"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MANIFEST = "weights_manifest.json"
FIX = "re-run the conversion (sbtrain-convert ... overwrite=true) or copy the directory again"
CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # isfinite runs on each

log = logging.getLogger("sbtrain.weights")
# Directories verified in this process, with the (name, size, mtime) of their files then: the
# hashes are not recomputed by every reader (load_config, load_into, iter_weights) of one load.
_VERIFIED: dict[str, tuple] = {}
_WARNED: set[str] = set()


# Config fields that change how a model is trained, not what its weights mean.
TRAINING_TIME_FIELDS = ("document_masking", "name", "spike")


class WeightsError(ConfigError):
    """A weights directory that is missing, incomplete or for another model (a ConfigError: the
    CLIs report it as bad input, exit 2)."""


def save_config(cfg: ModelConfig, directory: str | os.PathLike) -> Path:
    path = Path(directory) / CONFIG
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def load_config(directory: str | os.PathLike) -> ModelConfig:
    from sbtrain.models.build import to_model_config

    path = Path(directory) / CONFIG
    if not path.is_file():
        raise WeightsError(f"{directory} is not an sbtrain weights directory: {CONFIG} is missing")
    verify_weights(directory)  # the config is in the manifest too, and this is the first file a run reads
    return to_model_config(OmegaConf.load(path))


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (weights manifests and checkpoint manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Write ``weights_manifest.json``: size and sha256 of every file under ``directory``. Called
    last by every writer (again after a caller adds files, e.g. the converter's tokenizer)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def verify_weights(directory: str | os.PathLike) -> None:
    """Check every file the manifest lists (present, same size, same sha256); WeightsError names the
    first damaged one. No manifest: a warning for an sbtrain directory (written before manifests),
    nothing for a Hugging Face folder (which never has one)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if (directory / CONFIG).is_file() and str(directory) not in _WARNED:
            _WARNED.add(str(directory))
            log.warning("%s has no %s (written by an older sbtrain): its files cannot be checked for damage; "
                        "re-run the conversion to add one", directory, MANIFEST)
        return
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{manifest} is unreadable ({exc}); {FIX}") from exc
    paths = [manifest, *(directory / name for name in entries)]
    signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (str(p),) for p in paths)
    if _VERIFIED.get(str(directory.resolve())) == signature:
        return
    for name, entry in entries.items():
        file = directory / name
        if not file.is_file():
            raise WeightsError(f"{file} is missing ({MANIFEST} lists it); {FIX}")
        size = file.stat().st_size
        if size != entry["size"]:
            raise WeightsError(f"{file} has {size} bytes, {MANIFEST} says {entry['size']}: the file is truncated or "
                               f"was not copied completely; {FIX}")
        if file_sha256(file) != entry["sha256"]:
            raise WeightsError(f"{file} does not match its sha256 in {MANIFEST}: the file is corrupt; {FIX}")
    _VERIFIED[str(directory.resolve())] = signature


@contextmanager
def _open(path: Path):
    """safe_open whose parse errors name the file (safetensors' own do not)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise WeightsError(f"{path} is truncated or corrupt (safetensors: {exc}); {FIX}") from exc


def check_finite(name: str, tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if tensor.dtype in CHECKED_DTYPES and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise WeightsError(f"tensor {name} in {path} holds {bad} non-finite values (NaN/Inf): the file is corrupt or "
                           "the model diverged before it was saved; re-run the conversion or use an earlier checkpoint")
    return tensor


def save_weights(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, directory: str | os.PathLike,
                 max_shard_bytes: int = 4 * 2**30, metadata: dict | None = None) -> Path:
    """Write ``(name, tensor)`` pairs (any iterable, e.g. a generator) and the config into
    ``directory`` atomically: a temporary sibling directory renamed at the end."""
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    seen: set[int] = set()

    def flush() -> None:
        nonlocal size
        name = f"shard-{len(files):05d}.safetensors"
        save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        shards[-1] = {}
        size = 0

    for name, tensor in tensors:
        if name in weight_map or name in shards[-1]:
            raise WeightsError(f"tensor {name!r} given twice")
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        tensor = tensor.detach().contiguous().cpu()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()  # tied weights: safetensors stores no aliases, so write a copy
        seen.add(tensor.data_ptr())
        shards[-1][name] = tensor
        size += nbytes
    if shards[-1] or not files:
        flush()
    if len(files) == 1:
        (tmp / files[0]).rename(tmp / SINGLE)
    else:
        total = len(files)
        renames = {f: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, f in enumerate(files)}
        for old, new in renames.items():
            (tmp / old).rename(tmp / new)
        index = {"metadata": dict(metadata or {}), "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())}}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
    save_config(cfg, tmp)
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def weight_files(directory: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: file}`` of a weights directory (or any HF-style safetensors folder), after
    :func:`verify_weights`."""
    directory = Path(directory)
    verify_weights(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise WeightsError(f"{directory}: shard(s) {missing} named in {INDEX} are missing; copy the complete folder")
        return {name: directory / f for name, f in weight_map.items()}
    if (directory / SINGLE).is_file():
        with _open(directory / SINGLE) as f:
            return {name: directory / SINGLE for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    raise WeightsError(f"{directory} holds no {SINGLE} and no {INDEX}")


def iter_weights(directory: str | os.PathLike, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream tensors file by file (each file opened once, tensors read lazily, each checked finite)."""
    files = weight_files(directory)
    wanted = list(files) if names is None else list(names)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name not in files:
            raise WeightsError(f"{directory}: tensor {name!r} is missing")
        by_file.setdefault(files[name], []).append(name)
    for path, keys in by_file.items():
        with _open(path) as f:
            for key in keys:
                try:
                    tensor = f.get_tensor(key)
                except SafetensorError as exc:
                    raise WeightsError(f"{path}: tensor {key} cannot be read ({exc}); {FIX}") from exc
                yield key, check_finite(key, tensor, path)


# Rows of a box read per file opening: the slice read and the file pages it maps (resident until
# the mapping closes) stay below about this many bytes each, whatever the tensor's size.
READ_BLOCK_BYTES = 64 << 20


def _read_box(path: Path, name: str, target: torch.Tensor, local: torch.Tensor, offset: tuple, directory) -> None:
    """Copy the box ``offset + local.shape`` of tensor ``name`` into ``local``, in row blocks,
    the file opened (mapped) per block."""
    shape = tuple(local.shape)
    with _open(path) as f:
        try:
            theirs = tuple(f.get_slice(name).get_shape())
            if theirs != tuple(target.shape):
                raise WeightsError(f"{directory}: {name} has shape {theirs}, the model {tuple(target.shape)}")
            if local.numel() and not shape:  # a scalar
                local.copy_(check_finite(name, f.get_tensor(name), path))
        except SafetensorError as exc:
            raise WeightsError(f"{path}: tensor {name} cannot be read ({exc}); {FIX}") from exc
    if local.numel() == 0 or not shape:
        return
    rows = max(1, READ_BLOCK_BYTES // (math.prod(theirs[1:]) * 4 or 1))
    tail = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        with _open(path) as f:
            try:
                block = f.get_slice(name)[(slice(offset[0] + r, offset[0] + r + n), *tail)]
            except SafetensorError as exc:
                raise WeightsError(f"{path}: tensor {name} cannot be read ({exc}); {FIX}") from exc
        local[r:r + n].copy_(check_finite(name, block, path))


def load_into(model: torch.nn.Module, directory: str | os.PathLike) -> ModelConfig:
    """Copy a weights directory into ``model`` (same config required; every tensor, exact
    shapes). Returns the directory's config.

    Works on a plain model and on a sharded one (DTensor parameters from FSDP2 / TP / EP): each
    rank reads only the box of every tensor that its shard holds (``safe_open(...).get_slice``,
    from :func:`sbtrain.models.build.local_region`), one tensor at a time, its file mapped only
    while it is read; peak host memory is the shard plus the largest single slice read."""
    from sbtrain.models.build import local_region

    cfg = load_config(directory)
    a, b = OmegaConf.to_container(OmegaConf.structured(cfg)), OmegaConf.to_container(OmegaConf.structured(model.config))
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in TRAINING_TIME_FIELDS}
    if diff:
        raise ConfigError(
            f"weights in {directory} are for another model: config differs in {diff} (theirs, ours); build the model "
            f"from {directory}/{CONFIG} (model=... overrides must match it)"
        )
    state = model.state_dict()
    files = weight_files(directory)
    missing = sorted(set(state) - set(files))
    extra = sorted(set(files) - set(state))
    if missing or extra:
        raise WeightsError(f"{directory} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, target in state.items():
            shape, offset = local_region(target)
            local = target.to_local() if hasattr(target, "to_local") else target
            _read_box(files[name], name, target, local.view(shape) if local.numel() else local, offset, directory)
    return cfg


__all__ = ["MANIFEST", "WeightsError", "iter_weights", "load_config", "load_into", "save_config", "save_weights",
           "verify_weights", "weight_files", "write_manifest"]
