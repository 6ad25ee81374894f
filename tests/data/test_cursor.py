"""The document cursor across a stage boundary the sequence length does not reveal.

A stage may keep the sequence length (a new LR schedule or CP degree only); sbtrain.trainer.stages then
forces ``new_stage=True``. The reference is the epoch's document permutation: what both stages consumed
must be an exact prefix of it (window by window), with no token twice and none skipped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sbtrain.data import PackedLoader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """300 random documents written straight as an IndexedDataset with a minimal manifest (no tokenizer
    training: the cursor only sees document lengths)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    from sbtrain.data.build import MANIFEST, dataset_prefix

    root = tmp_path_factory.mktemp("cursor_corpus")
    prefix = dataset_prefix(str(root))
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(300):
        doc = np.append(rng.integers(1, 300, rng.integers(4, 60)), 0).astype(np.uint16)  # 0: EOD
        builder.add_document(doc, [doc.size])
    builder.finalize(get_idx_path(prefix))
    manifest = {"fingerprint": "cursor-test", "tokenizer": {"eod_id": 0, "sha256": "none"}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return str(root)


def _take(loader: PackedLoader, steps: int) -> list[list]:
    out = []
    for _ in range(steps):
        out += [loader.sample_plan(i) for i in range(loader.samples_consumed, loader.samples_consumed + loader.G)]
        loader.next_global_batch()
    return out


@pytest.mark.parametrize("new_stage", [True, False])
def test_forced_new_stage_at_the_same_length_continues_from_the_cursor(dataset, new_stage):
    kw = {"seq_len": 32, "global_batch_size": 4, "micro_batch_size": 4, "seed": 5, "shuffle_window": 6}
    first = PackedLoader([dataset], **kw)
    stage1 = _take(first, 4)  # 16 samples: inside the third window of 6
    second = PackedLoader([dataset], **kw)
    second.load_state_dict(first.state_dict(), new_stage=new_stage)
    assert second.stage == (1 if new_stage else 0) and second.total_samples == 16
    stage2 = _take(second, 5)  # 20 more: ends inside a window again
    if not new_stage:  # a plain resume: the same stream as one loader would have produced
        third = PackedLoader([dataset], **kw)
        assert _take(third, 9) == stage1 + stage2
    order = first.sets[0].epoch_order(5, 0, 0)
    lengths = first.sets[0].lengths
    covered = {int(d): np.zeros(lengths[d], dtype=int) for d in order}
    for plan in stage1 + stage2:
        for _, doc, start, end in plan:
            covered[doc][start:end] += 1
    assert max(c.max() for c in covered.values()) == 1  # no token twice
    assert sum(int(c.sum()) for c in covered.values()) == 36 * 33  # every sample from fresh tokens
    # The window being read when stage 2 stopped is a contiguous run of the permutation: everything
    # before it was fully consumed, nothing after it was touched.
    start = second.state_dict()["window_start"]
    _, end = second.packer.pack(start, second.K, second.seq_len)
    (epoch, pos), (end_epoch, end_pos) = start["docs"][0], end["docs"][0]
    assert epoch == end_epoch == 0  # the test stays inside one epoch
    open_docs = {seg[1] for seg in start["pending"]}
    assert all(covered[int(d)].all() for d in order[:pos] if int(d) not in open_docs)
    assert not any(covered[int(d)].any() for d in order[end_pos:])
    assert pos > 10  # the assertions above covered a real prefix
