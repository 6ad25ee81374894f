import json
from collections import Counter

import numpy as np
import pytest
import torch

from sbtrain.data import IGNORE_INDEX, DataError, PackedLoader
from sbtrain.data.samples import materialize


def _global_batches(loaders, steps):
    """Each step's global batch, rebuilt from every rank's micro batches (rank order, then micro order)."""
    out = []
    for _ in range(steps):
        parts = [mb for ld in loaders for mb in ld.next_global_batch()]
        out.append({k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "labels")})
        # cu_seqlens is per micro batch (flattened); keep the per-sample start positions to compare layouts.
        T = loaders[0].seq_len
        out[-1]["starts"] = [sorted(int(x) % T for x in p["cu_seqlens"][:-1] if int(x) // T == b)
                             for p in parts for b in range(p["input_ids"].shape[0])]
    return out


def _loaders(corpus, D, m, **kw):
    base = {"seq_len": 24, "global_batch_size": 8, "weights": [2, 1], "seed": 7, "shuffle_window": 12,
            "document_boundaries": True, **kw}
    return [PackedLoader([corpus["a"], corpus["b"]], micro_batch_size=m, dp_rank=r, dp_size=D, **base)
            for r in range(D)]


@pytest.mark.parametrize("per_domain", [False, True])
def test_resume_with_other_dp_and_micro_batch(corpus, per_domain):
    k, rest = 5, 6
    reference = _global_batches(_loaders(corpus, 1, 8, per_domain_packing=per_domain), k + rest)
    run = _loaders(corpus, 2, 2, per_domain_packing=per_domain)
    first = _global_batches(run, k)
    states = [ld.state_dict() for ld in run]
    assert all(s == states[0] for s in states)  # the state is global: every rank holds the same
    state = json.loads(json.dumps(states[0]))  # and survives a JSON round trip (no pickle needed)
    assert state["samples_consumed"] == k * 8
    for D, m in ((1, 4), (4, 1), (2, 2)):
        resumed = _loaders(corpus, D, m, per_domain_packing=per_domain)
        for ld in resumed:
            ld.load_state_dict(state)
        after = _global_batches(resumed, rest)
        for got, want in zip(first + after, reference):
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
            assert got["starts"] == want["starts"]
    assert not torch.equal(reference[0]["input_ids"], reference[1]["input_ids"])


def test_labels_shift_and_cu_seqlens_follow_eod(corpus):
    (ld,) = _loaders(corpus, 1, 4)
    eod = ld.eod_id
    for mb in ld.next_global_batch():
        x, y, cu = mb["input_ids"], mb["labels"], mb["cu_seqlens"].tolist()
        T = x.shape[1]
        assert torch.equal(x[:, 1:], y[:, :-1]) and cu[-1] == x.numel()
        for b in range(x.shape[0]):
            starts = {c - b * T for c in cu if b * T <= c < (b + 1) * T}
            assert 0 in starts
            # A document starts right after an EOD, and only there.
            assert {p for p in range(1, T) if x[b, p - 1] == eod} == starts - {0}


def _consume(ld, steps, seen):
    """Run ``steps`` global batches on a single-rank loader, checking the tokens against the sample plans."""
    for _ in range(steps):
        plans = [ld.sample_plan(i) for i in range(ld.samples_consumed, ld.samples_consumed + ld.G)]
        (mb,) = ld.next_global_batch()
        full = torch.cat([mb["input_ids"], mb["labels"][:, -1:]], dim=1).numpy()
        assert np.array_equal(full, np.stack([materialize(ld.sets, p) for p in plans]))
        seen.append(plans)


@pytest.mark.parametrize("per_domain", [False, True])  # one dataset: the two modes keep their cursors differently
def test_seq_len_change_continues_from_the_document_cursor(corpus, per_domain):
    K1, K2 = 8, 6
    s1 = PackedLoader([corpus["a"]], seq_len=32, global_batch_size=4, micro_batch_size=4, seed=3, shuffle_window=K1,
                      per_domain_packing=per_domain)
    stage1 = []
    _consume(s1, 7, stage1)  # 28 samples: stops inside the 4th window
    state = s1.state_dict()
    s2 = PackedLoader([corpus["a"]], seq_len=64, global_batch_size=2, micro_batch_size=2, seed=3, shuffle_window=K2,
                      per_domain_packing=per_domain)
    s2.load_state_dict(state)
    assert s2.stage == 1 and s2.samples_consumed == 0 and s2.total_samples == 28
    stage2 = []
    _consume(s2, 5 * K2 // 2, stage2)  # 5 whole windows: what was consumed is a prefix of the document stream
    order = s1.sets[0].epoch_order(3, 0, 0)
    lengths = s1.sets[0].lengths
    covered = {int(d): np.zeros(lengths[d], dtype=int) for d in order}
    for plans in stage1 + stage2:
        for plan in plans:
            for _, doc, start, end in plan:
                covered[doc][start:end] += 1
    assert max(c.max() for c in covered.values()) == 1  # no token seen twice
    full = [bool(covered[int(d)].all()) for d in order]
    some = [bool(covered[int(d)].any()) for d in order]
    j = full.index(False)
    assert j > 0 and all(full[:j]) and not any(some[j + 1:])  # nothing skipped: an exact prefix of the order
    assert covered[int(order[j])].sum() == 0 or covered[int(order[j])][0] == 1  # the open document from its start
    total = 28 * 33 + 5 * K2 * 65
    assert sum(int(c.sum()) for c in covered.values()) == total
    # Inside stage 1, each fully consumed window saw a contiguous run of the permutation.
    rank = {int(d): i for i, d in enumerate(order)}
    flat = [p for plans in stage1 for p in plans]
    for w in range(3):
        ranks = sorted({rank[doc] for plan in flat[w * K1:(w + 1) * K1] for _, doc, _, _ in plan})
        assert ranks == list(range(ranks[0], ranks[-1] + 1))
    # The shuffle did reorder samples (otherwise the window test above proves nothing).
    firsts = [rank[plan[0][1]] for plan in flat[:K1]]
    assert firsts != sorted(firsts)


def test_blend_weights_are_respected(corpus):
    for per_domain in (False, True):
        ld = PackedLoader([corpus["a"], corpus["b"]], seq_len=32, global_batch_size=50, micro_batch_size=50,
                          weights=[3, 1], seed=1, shuffle_window=64, per_domain_packing=per_domain)
        tokens, samples = Counter(), Counter()
        for i in range(400):
            plan = ld.sample_plan(i)
            for d, _, s, e in plan:
                tokens[d] += e - s
            datasets = {d for d, *_ in plan}
            if per_domain:
                assert len(datasets) == 1  # per-domain packing never mixes datasets in one sample
                samples[datasets.pop()] += 1
        share = tokens[0] / (tokens[0] + tokens[1])
        assert abs(share - 0.75) < 0.03, share
        if per_domain:
            assert abs(samples[0] / 400 - 0.75) < 0.03


def test_valid_split_is_fixed_and_disjoint(corpus):
    def loader(D, r, seed):
        return PackedLoader([corpus["a"]], seq_len=16, global_batch_size=4, micro_batch_size=2, dp_rank=r, dp_size=D,
                            seed=seed, shuffle_window=4, valid_fraction=0.1)

    ld = loader(1, 0, 1)
    s = ld.sets[0]
    assert len(s.valid_ids) == 40 and not set(s.valid_ids) & set(s.train_ids)
    assert np.array_equal(s.valid_ids, loader(1, 0, 99).sets[0].valid_ids)  # data.seed does not move the split
    expected = np.concatenate([s.tokens(d, 0, s.lengths[d]) for d in s.valid_ids]).astype(np.int64)
    ranks = [list(loader(2, r, 1).valid_batches()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # every rank runs the same number of validation steps
    rows = [mb for step in zip(*ranks) for mb in step]
    x = torch.cat([mb["input_ids"] for mb in rows])
    y = torch.cat([mb["labels"] for mb in rows])
    stream = torch.cat([x, y[:, -1:]], dim=1).reshape(-1)[: expected.size]
    assert np.array_equal(stream.numpy(), expected)
    n, T = y.shape
    pos = torch.arange(n)[:, None] * (T + 1) + torch.arange(T)[None, :] + 1  # stream position of each label
    assert torch.equal(y == IGNORE_INDEX, pos >= expected.size)  # padding, and only padding, is ignored
    for i in range(200):  # no validation document in training samples
        assert not {doc for _, doc, _, _ in ld.sample_plan(i)} & set(s.valid_ids.tolist())


def test_bad_loader_settings(corpus):
    with pytest.raises(DataError, match=r"global_batch_size=10 is not a multiple of dp_size\*micro_batch_size=4\*2"):
        PackedLoader([corpus["a"]], seq_len=16, global_batch_size=10, micro_batch_size=2, dp_size=4)
    ld = PackedLoader([corpus["a"]], seq_len=16, global_batch_size=4, micro_batch_size=2, seed=1)
    other = PackedLoader([corpus["a"]], seq_len=16, global_batch_size=4, micro_batch_size=2, seed=2)
    with pytest.raises(DataError, match=r"seed=1 but this run has 2"):
        other.load_state_dict(ld.state_dict())
    blend = PackedLoader([corpus["a"], corpus["b"]], seq_len=16, global_batch_size=4, micro_batch_size=2, seed=1)
    with pytest.raises(DataError, match=r"fingerprint="):
        blend.load_state_dict(ld.state_dict())
    with pytest.raises(DataError, match=r"data.weights=\[1.0\] must be 2 positive numbers"):
        PackedLoader([corpus["a"], corpus["b"]], seq_len=16, global_batch_size=4, micro_batch_size=2, weights=[1.0])


def test_megatron_gpt_dataset_runs_on_cpu(corpus):
    """megatron's own packer and blended sample index (C++ helpers) over our files: samples are stream slices."""
    from sbtrain.data.megatron_gpt import gpt_datasets

    train, valid = gpt_datasets([corpus["a"], corpus["b"]], seq_len=32, num_train_samples=64, num_valid_samples=8,
                                weights=[2, 1], seed=1, split="90,10,0")
    assert len(train) >= 64 and len(valid) >= 8
    ld = PackedLoader([corpus["a"], corpus["b"]], seq_len=32, global_batch_size=1, micro_batch_size=1)
    docs = [[tuple(s.tokens(d, 0, s.lengths[d]).tolist()) for d in range(len(s.lengths))] for s in ld.sets]
    seen = Counter()
    for i in range(64):
        item = train[i]
        full = np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]]).tolist()
        ds = docs[int(item["dataset_id"])]
        seen[int(item["dataset_id"])] += 1
        cuts = [j + 1 for j, t in enumerate(full) if t == ld.eod_id]
        pieces = [tuple(full[a:b]) for a, b in zip([0] + cuts, cuts + [len(full)]) if b > a]
        # megatron concatenates whole documents (in its own shuffled order) and cuts the stream into samples:
        # the first piece ends a document (or lies inside one), the middle ones are documents, the last one
        # begins a document.
        first, last = pieces[0], pieces[-1]
        if first[-1] == ld.eod_id:
            assert any(d[len(d) - len(first):] == first for d in ds)
        else:
            assert any(first == d[j:j + len(first)] for d in ds for j in range(len(d)))
        assert all(p in set(ds) for p in pieces[1:-1])
        if len(pieces) > 1:
            assert any(d[: len(last)] == last for d in ds)
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert seen[0] > seen[1] > 0  # the 2:1 blend
