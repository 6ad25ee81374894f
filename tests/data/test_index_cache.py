"""Per-document arrays are built once into memory-mapped files and equal the in-memory formulas of before
(so loader states written by the old code resume unchanged), and a 10M-document index opens on two ranks
with small memory growth (benchmarks/data_index_memory.py measures 50M against the old code)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sbtrain.data import DataError, PackedLoader, index_cache
from sbtrain.data.samples import DocumentSet
from tests.data.test_cursor import dataset  # noqa: F401  (module fixture: 300 documents, no tokenizer)

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("data_index_memory", ROOT / "benchmarks" / "data_index_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _old_arrays(n: int, n_valid: int, split_seed: int, seed: int, d: int, epoch: int):
    """The formulas of sbtrain.data.samples before the cache (int64 arrays on every rank)."""
    perm = np.random.default_rng([split_seed, n]).permutation(n)
    valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    return valid, train, train[np.random.default_rng([seed, d, epoch]).permutation(len(train))]


@pytest.mark.parametrize("threshold", [0, 1 << 30])  # memory-mapped files / in memory
def test_arrays_equal_the_old_formulas(dataset, threshold, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setattr(index_cache, "MMAP_MIN_DOCUMENTS", threshold)
    monkeypatch.setattr(index_cache, "CHUNK", 7)  # many chunks: the chunked loops' seams are exercised
    monkeypatch.setenv("SBTRAIN_INDEX_CACHE", str(tmp_path))
    s = DocumentSet(dataset, valid_fraction=0.1, split_seed=11)
    valid, train, order = _old_arrays(300, 30, 11, seed=5, d=0, epoch=2)
    assert np.array_equal(s.valid_ids, valid) and np.array_equal(s.train_ids, train)
    assert np.array_equal(s.epoch_order(5, 0, 2), order)
    assert s.train_tokens == int(s.lengths[train].sum()) and s.valid_tokens == int(s.lengths[valid].sum())
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    if threshold:
        assert files == []
    else:
        assert isinstance(s.train_ids, np.memmap) and s.train_ids.dtype == np.int32
        assert [f for f in files if not f.startswith("order-")] == ["meta.json", "train_ids.npy", "valid_ids.npy"]
        assert len([f for f in files if f.startswith("order-")]) == 1
        assert not any(".tmp." in str(p) for p in tmp_path.rglob("*"))  # temporaries renamed or removed
        stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}
        again = DocumentSet(dataset, valid_fraction=0.1, split_seed=11)
        again.epoch_order(5, 0, 2)
        assert stamp == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}  # read, not rebuilt


def test_same_stream_with_and_without_files(dataset, monkeypatch, tmp_path):  # noqa: F811
    kw = {"seq_len": 24, "global_batch_size": 4, "micro_batch_size": 2, "seed": 9, "shuffle_window": 5,
          "valid_fraction": 0.05}
    plans = []
    for threshold in (1 << 30, 0):
        monkeypatch.setattr(index_cache, "MMAP_MIN_DOCUMENTS", threshold)
        monkeypatch.setenv("SBTRAIN_INDEX_CACHE", str(tmp_path))
        loader = PackedLoader([dataset], **kw)
        plans.append([loader.sample_plan(i) for i in range(400)])  # past one epoch: two epoch orders
    assert plans[0] == plans[1]
    assert len(list(tmp_path.rglob("order-*.npy"))) == 2


def test_cache_beside_the_dataset_and_its_key(dataset, monkeypatch):  # noqa: F811
    monkeypatch.setattr(index_cache, "MMAP_MIN_DOCUMENTS", 0)
    monkeypatch.delenv("SBTRAIN_INDEX_CACHE", raising=False)
    DocumentSet(dataset, valid_fraction=0.0, split_seed=1)
    DocumentSet(dataset, valid_fraction=0.0, split_seed=2)  # another split: another entry, not a stale read
    assert sorted(p.is_dir() for p in Path(dataset, "index_cache").glob("split-*")) == [True, True]  # no locks left


def test_several_sequences_per_document_refused(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    from sbtrain.data.build import MANIFEST, dataset_prefix

    prefix = dataset_prefix(str(tmp_path))
    b = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    import torch

    # [s0] [s1 s2] [] [s3]: as many document boundaries as sequences, yet not one sequence per document.
    b.add_item(torch.tensor([1, 2])), b.end_document()
    b.add_item(torch.tensor([3])), b.add_item(torch.tensor([4])), b.end_document()
    b.end_document()
    b.add_item(torch.tensor([5])), b.end_document()
    b.finalize(get_idx_path(prefix))
    (tmp_path / MANIFEST).write_text(json.dumps({"fingerprint": "x", "tokenizer": {"eod_id": 0, "sha256": "none"}}))
    for threshold in (0, 1 << 30):
        monkeypatch.setattr(index_cache, "MMAP_MIN_DOCUMENTS", threshold)
        with pytest.raises(DataError, match="several sequences"):
            DocumentSet(str(tmp_path))


def test_ten_million_documents_open_on_two_ranks_in_little_memory(tmp_path):
    bench = _bench()
    written = bench.write_index(str(tmp_path / "big"), 10_000_000)
    assert written["bytes"]["data.idx"] > 190e6  # the .idx alone: 20 bytes a document
    cold = bench.measure(str(tmp_path / "big"), env={"SBTRAIN_INDEX_CACHE": str(tmp_path / "cache")})
    for r in cold:
        assert r["samples_consumed"] == 8
        # Measured: 150-200 MB peak, 0-42 MB private (the builder's mask and chunks). The code before this
        # change measured 460 MB peak and 229 MB private on every rank at 10M documents: both bounds fail it.
        assert r["peak_rss_growth"] < 400 * 2**20, r
        # private memory: 0-42 MB measured quiet, 110 MB once on a loaded box; the old code took 229 MB
        assert r["anon_growth"] < 160 * 2**20, r
    assert os.listdir(tmp_path / "cache")
