"""Packing documents of built datasets into fixed-length samples, from a resumable document cursor.

Vocabulary used here and in :mod:`sbtrain.data.loader`:

- *segment* ``[d, doc, start, end]``: tokens ``start:end`` of document ``doc`` of dataset ``d``.
- *cursor*: where packing stands, as plain ints (it goes into checkpoints as is)::

      {"docs": [[epoch, pos], ...],      # per dataset: next position in that epoch's document permutation
       "emitted": [tokens, ...],          # per dataset: tokens taken so far, drives the blend
       "pending": [segment, ...],         # mixed packing: pieces to place before any new document
       "domain_pending": [[segment, ...], ...]}  # per-domain packing: the same, per dataset

  A document that does not fit the rest of a sample is split: its remainder becomes the first
  pending segment, so the next sample continues it. After a change of sequence length the
  not-yet-consumed samples of the interrupted window are put back as pending segments, which is
  how the next stage packs from exactly where the last one stopped.
- *plan*: a sample as its list of segments; ``sum(end - start) == seq_len + 1``.

The blend is deterministic: the next document (mixed) or sample (per-domain) comes from the
dataset with the smallest ``emitted / weight``, so token shares follow the weights closely at
every point of the stream, not only on average.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Sequence

import numpy as np

from sbtrain.data.build import check_dataset_dir, dataset_prefix, read_manifest
from sbtrain.data.index_cache import DocumentIndex
from sbtrain.data.sources import DataError

Segment = list[int]  # [d, doc, start, end]
Plan = list[Segment]


class DocumentSet:
    """One built dataset (``data.bin/.idx`` + manifest) with its fixed train/valid document split."""

    def __init__(self, dataset_dir: str, valid_fraction: float = 0.0, split_seed: int = 4321):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.dir = dataset_dir
        check_dataset_dir(dataset_dir)
        self.manifest = read_manifest(dataset_dir)
        self.ds = IndexedDataset(dataset_prefix(dataset_dir))
        n = len(self.ds)
        # Views of megatron's memory-mapped .idx (int32 lengths): no per-document copy on any rank. The split
        # and the epoch orders are built once per node and memory-mapped (sbtrain.data.index_cache).
        self.lengths = self.ds.sequence_lengths
        if self.ds.document_indices.size != n + 1:
            raise DataError(f"{dataset_dir}: documents made of several sequences are not supported; rebuild it "
                            "with sbtrain-data (one sequence per document)")
        n_valid = round(valid_fraction * n)
        if valid_fraction > 0 and n_valid == 0:
            n_valid = 1
        if n_valid >= n:
            raise DataError(f"data.valid_fraction={valid_fraction} leaves no training document in {dataset_dir} "
                            f"({n} documents): lower it")
        # The split has its own seed so that every stage and every data.seed holds out the same documents.
        self.index = DocumentIndex(dataset_dir, str(self.manifest.get("fingerprint")), n, n_valid, split_seed)
        if not self.index.meta["one_sequence_per_document"]:
            raise DataError(f"{dataset_dir}: documents made of several sequences are not supported; rebuild it "
                            "with sbtrain-data (one sequence per document)")
        self.valid_ids, self.train_ids = self.index.valid_ids, self.index.train_ids
        self.train_tokens, self.valid_tokens = int(self.index.meta["train_tokens"]), int(self.index.meta["valid_tokens"])
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}
        self.eod_id = int(self.manifest["tokenizer"]["eod_id"])
        # Chat datasets: a uint8 loss mask per token (1 = trained on), documents of the same lengths.
        self.masks = None
        mask_info = self.manifest.get("loss_mask")
        if mask_info:
            prefix = os.path.join(dataset_dir, mask_info["prefix"])
            if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
                raise DataError(f"{dataset_dir}: its manifest names a loss mask but {prefix}.bin/.idx is missing: "
                                "rebuild the dataset with sbtrain-data")
            self.masks = IndexedDataset(prefix)
            if len(self.masks) != n:
                raise DataError(f"{dataset_dir}: the loss mask has {len(self.masks)} documents, the tokens {n}: "
                                "rebuild the dataset with sbtrain-data")

    def epoch_order(self, seed: int, d: int, epoch: int) -> np.ndarray:
        key = (seed, d, epoch)
        if key not in self._orders:
            if len(self._orders) > 4:  # only the current and next epoch are ever needed
                self._orders.clear()
            self._orders[key] = self.index.epoch_order(seed, d, epoch)
        return self._orders[key]

    def tokens(self, doc: int, start: int, end: int) -> np.ndarray:
        return self.ds.get(int(doc), offset=int(start), length=int(end - start))

    def mask(self, doc: int, start: int, end: int) -> np.ndarray:
        """1 where a token carries loss (every token of a dataset without a loss mask)."""
        if self.masks is None:
            return np.ones(int(end - start), dtype=np.uint8)
        return self.masks.get(int(doc), offset=int(start), length=int(end - start))


def initial_cursor(n_datasets: int) -> dict:
    return {"docs": [[0, 0] for _ in range(n_datasets)], "emitted": [0] * n_datasets, "pending": [],
            "domain_pending": [[] for _ in range(n_datasets)]}


def _pick(emitted: Sequence[int], weights: Sequence[float]) -> int:
    # Smallest emitted share relative to its weight; ties go to the lowest index (deterministic).
    return int(np.argmin([e / w for e, w in zip(emitted, weights)]))


class Packer:
    """Pure function of (cursor, count): the plans of the next ``count`` samples and the cursor after them."""

    def __init__(self, sets: list[DocumentSet], weights: Sequence[float], seed: int, per_domain: bool):
        self.sets, self.seed, self.per_domain = sets, seed, per_domain
        total = float(sum(weights))
        self.weights = [w / total for w in weights]

    def _new_document(self, cur: dict, d: int) -> Segment:
        epoch, pos = cur["docs"][d]
        order = self.sets[d].epoch_order(self.seed, d, epoch)
        doc = int(order[pos])
        pos += 1
        if pos == len(order):  # epoch of this dataset done: the next one is a fresh permutation
            epoch, pos = epoch + 1, 0
        cur["docs"][d] = [epoch, pos]
        return [d, doc, 0, int(self.sets[d].lengths[doc])]

    def pack(self, cursor: dict, count: int, seq_len: int) -> tuple[list[Plan], dict]:
        cur = copy.deepcopy(cursor)
        size = seq_len + 1
        plans: list[Plan] = []
        if self.per_domain:
            queues = [deque(p) for p in cur["domain_pending"]]
            for _ in range(count):
                d = _pick(cur["emitted"], self.weights)
                cur["emitted"][d] += size
                plans.append(self._fill(size, queues[d], lambda d=d: self._new_document(cur, d)))
            cur["domain_pending"] = [[list(s) for s in q] for q in queues]
        else:
            queue = deque(cur["pending"])

            def new_doc() -> Segment:
                d = _pick(cur["emitted"], self.weights)
                seg = self._new_document(cur, d)
                cur["emitted"][d] += seg[3]
                return seg

            for _ in range(count):
                plans.append(self._fill(size, queue, new_doc))
            cur["pending"] = [list(s) for s in queue]
        return plans, cur

    @staticmethod
    def _fill(size: int, queue: deque, new_doc) -> Plan:
        plan: Plan = []
        need = size
        while need > 0:
            d, doc, start, end = queue.popleft() if queue else new_doc()
            take = min(need, end - start)
            plan.append([d, doc, start, start + take])
            if start + take < end:  # the rest of this document opens the next sample
                queue.appendleft([d, doc, start + take, end])
            need -= take
        return plan


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join contiguous pieces of the same document (so a resumed document is not cut needlessly)."""
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1][:2] == seg[:2] and out[-1][3] == seg[2]:
            out[-1] = [seg[0], seg[1], out[-1][2], seg[3]]
        else:
            out.append(list(seg))
    return out


def resume_cursor(packer: Packer, window_start: dict, window_plans: list[Plan], window_end: dict,
                  consumed_slots: np.ndarray, seq_len: int) -> dict:
    """Cursor for a new stage: the unconsumed samples of an interrupted window go back in front of its end cursor.

    ``consumed_slots`` are the plan indices (pre-shuffle positions) already trained on. The rest are
    returned as pending segments in their packing order, so the permutation order is kept.
    """
    if len(consumed_slots) == 0:
        return copy.deepcopy(window_start)
    cur = copy.deepcopy(window_end)
    taken = {int(i) for i in consumed_slots}
    left = [seg for i, plan in enumerate(window_plans) if i not in taken for seg in plan]
    if packer.per_domain:
        for d in range(len(packer.sets)):
            mine = [s for s in left if s[0] == d]
            unconsumed = sum(1 for i, p in enumerate(window_plans) if i not in taken and p[0][0] == d)
            cur["emitted"][d] -= unconsumed * (seq_len + 1)  # those samples were never trained on
            cur["domain_pending"][d] = _merge(mine + cur["domain_pending"][d])
    else:
        cur["pending"] = _merge(left + cur["pending"])
    return cur


def plan_positions(plan: Plan, seq_len: int) -> list[int]:
    """Input positions (< seq_len) where a document piece begins; 0 is always one."""
    starts, pos = [], 0
    for _, _, start, end in plan:
        if pos < seq_len:
            starts.append(pos)
        pos += end - start
    return starts


def materialize(sets: list[DocumentSet], plan: Plan) -> np.ndarray:
    return np.concatenate([sets[d].tokens(doc, s, e) for d, doc, s, e in plan]).astype(np.int64)


def materialize_mask(sets: list[DocumentSet], plan: Plan) -> np.ndarray:
    """The loss mask of a sample, aligned with :func:`materialize`'s tokens."""
    return np.concatenate([sets[d].mask(doc, s, e) for d, doc, s, e in plan])


def open_sets(dataset_dirs: Sequence[str], valid_fraction: float, split_seed: int) -> list[DocumentSet]:
    if not dataset_dirs:
        raise DataError("no dataset given: set data.datasets=[DIR, ...] (folders written by sbtrain-data)")
    sets = [DocumentSet(os.path.abspath(p), valid_fraction, split_seed) for p in dataset_dirs]
    hashes = {s.manifest["tokenizer"]["sha256"] for s in sets}
    if len(hashes) > 1:
        raise DataError(f"datasets {list(dataset_dirs)} were tokenized with different tokenizers: rebuild them "
                        "with one tokenizer (token ids would mean different things)")
    return sets


def blend_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    if len(weights) != n or any(w <= 0 for w in weights):
        raise DataError(f"data.weights={list(weights)} must be {n} positive numbers, one per dataset")
    return [float(w) for w in weights]
