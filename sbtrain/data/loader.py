"""The trainer's data loader: packed samples, global (rank-independent) resumable state, micro batches.

Sample order. A stage's samples are numbered 0, 1, 2, ... and grouped in windows of
``shuffle_window`` (K) samples; window w is packed from its start cursor and shuffled with
``rng(seed, stage, w)``. Global batch i is samples ``[i*G, (i+1)*G)``; rank r of D takes rows
``[r*G/D, (r+1)*G/D)``, cut into micro batches of m. Nothing here depends on D or m, so a run
resumed with another DP size or micro batch sees the same global batches.

State (:meth:`PackedLoader.state_dict`) is global: seed, data fingerprint, seq_len, window size,
stage number, samples consumed in the stage, and the cursor at the start of the current window.
Resuming re-packs that one window (lengths only) and goes on. Loading a state whose seq_len differs
starts a new stage: the unconsumed samples of the interrupted window are returned to the document
stream and packing continues at the new length, so no token of the epoch is seen twice or skipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sbtrain.data.samples import (
    Packer,
    Plan,
    blend_weights,
    initial_cursor,
    materialize,
    materialize_mask,
    open_sets,
    plan_positions,
    resume_cursor,
)
from sbtrain.data.sources import DataError

log = logging.getLogger(__name__)
STATE_VERSION = 1
IGNORE_INDEX = -100  # label of padding in validation batches (torch cross_entropy's default ignore_index)


class PackedLoader:
    def __init__(self, datasets: Sequence[str], seq_len: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, weights: Sequence[float] | None = None, seed: int = 1234,
                 shuffle_window: int = 1024, valid_fraction: float = 0.0, split_seed: int = 4321,
                 per_domain_packing: bool = False, document_boundaries: bool = False):
        for name, v in (("seq_len", seq_len), ("global_batch_size", global_batch_size),
                        ("micro_batch_size", micro_batch_size), ("dp_size", dp_size),
                        ("data.shuffle_window", shuffle_window)):
            if int(v) < 1:
                raise DataError(f"{name}={v} must be >= 1")
        if global_batch_size % (dp_size * micro_batch_size):
            raise DataError(f"global_batch_size={global_batch_size} is not a multiple of dp_size*micro_batch_size="
                            f"{dp_size}*{micro_batch_size}: choose a global batch divisible by it")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.seq_len, self.G, self.m = int(seq_len), int(global_batch_size), int(micro_batch_size)
        self.rank, self.D, self.K, self.seed = int(dp_rank), int(dp_size), int(shuffle_window), int(seed)
        self.document_boundaries = document_boundaries
        self.sets = open_sets(list(datasets), valid_fraction, split_seed)
        w = blend_weights(weights, len(self.sets))
        self.packer = Packer(self.sets, w, self.seed, per_domain_packing)
        self.eod_id = self.sets[0].eod_id
        # Any chat dataset: labels of tokens outside its loss mask become IGNORE_INDEX, so the loss (and its
        # global token count) covers only the trained-on tokens, whatever the packing or the layout.
        self.masked = any(s.masks is not None for s in self.sets)
        self.fingerprint = hashlib.sha256(json.dumps({
            "datasets": [s.manifest["fingerprint"] for s in self.sets], "weights": self.packer.weights,
            "per_domain": per_domain_packing, "valid_fraction": valid_fraction, "split_seed": split_seed,
        }, sort_keys=True).encode()).hexdigest()
        self.stage = 0
        self.samples_consumed = 0  # in this stage, global
        self.total_samples = 0  # over all stages
        self.total_tokens = 0
        self._reset_windows(initial_cursor(len(self.sets)))

    # ---- windows -------------------------------------------------------------------------------
    def _reset_windows(self, start_cursor: dict, window: int = 0) -> None:
        self._base_w = window
        self._windows: dict[int, tuple] = {}  # w -> (start cursor, plans, end cursor, shuffle order)
        self._starts = {window: start_cursor}

    def _window(self, w: int) -> tuple:
        if w < self._base_w:
            raise RuntimeError(f"window {w} is behind the loader (window {self._base_w}); samples are read in order")
        for v in range(self._base_w, w + 1):
            if v not in self._windows:
                plans, end = self.packer.pack(self._starts[v], self.K, self.seq_len)
                order = np.random.default_rng([self.seed, self.stage, v]).permutation(self.K)
                self._windows[v] = (self._starts[v], plans, end, order)
                self._starts[v + 1] = end
        return self._windows[w]

    def _advance_base(self) -> None:
        w = self.samples_consumed // self.K
        if w > self._base_w:
            self._window(w - 1)  # makes sure window w's start cursor is known
            for v in [v for v in self._windows if v < w]:
                del self._windows[v]
            self._starts = {v: c for v, c in self._starts.items() if v >= w}
            self._base_w = w

    def sample_plan(self, i: int) -> Plan:
        """Segments of stage-local sample ``i`` (``[dataset, document, start, end]`` each)."""
        _, plans, _, order = self._window(i // self.K)
        return plans[int(order[i % self.K])]

    # ---- batches -------------------------------------------------------------------------------
    def _collate(self, plans: list[Plan]) -> dict[str, torch.Tensor]:
        T = self.seq_len
        tokens = torch.from_numpy(np.stack([materialize(self.sets, p) for p in plans]))
        batch = {"input_ids": tokens[:, :T].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if self.masked:
            # A copy: with one sample per micro batch both slices are views of the same storage, and the
            # masking below must not reach the inputs.
            batch["labels"] = batch["labels"].clone()  # the label at t is token t + 1: it is trained on where token t + 1 is
            mask = torch.from_numpy(np.stack([materialize_mask(self.sets, p) for p in plans]))
            batch["labels"][mask[:, 1:] == 0] = IGNORE_INDEX
        if self.document_boundaries:
            # flash-attn varlen layout over the flattened [m*T] batch: every sample and document start, then the end.
            bounds = [b * T + p for b, plan in enumerate(plans) for p in plan_positions(plan, T)]
            batch["cu_seqlens"] = torch.tensor(bounds + [len(plans) * T], dtype=torch.int32)
        return batch

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro batches of the next global batch; the global sample count advances by G."""
        first = self.samples_consumed + self.rank * (self.G // self.D)
        plans = [self.sample_plan(i) for i in range(first, first + self.G // self.D)]
        micro = [self._collate(plans[j:j + self.m]) for j in range(0, len(plans), self.m)]
        self.samples_consumed += self.G
        self.total_samples += self.G
        self.total_tokens += self.G * self.seq_len
        self._advance_base()
        return micro

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A global batch is counted as consumed when its first micro batch is handed out, so a checkpoint
        # taken after a step's last micro batch records exactly the steps done (the next one is not built yet).
        while True:
            yield from self.next_global_batch()

    def _valid_rows(self) -> Iterator[np.ndarray]:
        """The held-out documents of every dataset, in fixed order, cut into rows of seq_len + 1 (the last padded
        with -1); read document by document so a large validation split never sits in memory at once. A token
        outside a chat dataset's loss mask comes as -2 - id (negative: no label; the id is recovered)."""
        S = self.seq_len + 1
        buf = np.zeros(0, dtype=np.int64)
        for s in self.sets:
            for doc in s.valid_ids:
                tokens = s.tokens(doc, 0, s.lengths[doc]).astype(np.int64)
                if s.masks is not None:
                    tokens = np.where(s.mask(doc, 0, s.lengths[doc]) == 0, -2 - tokens, tokens)
                buf = np.concatenate([buf, tokens])
                while buf.size >= S:
                    yield buf[:S]
                    buf = buf[S:]
        if buf.size:
            yield np.concatenate([buf, np.full(S - buf.size, -1, dtype=np.int64)])

    def valid_batches(self, max_samples: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out documents in fixed order (no shuffle), packed at this seq_len; this rank's micro batches.

        The sample count is padded to a multiple of dp_size*micro_batch so every rank runs the same number
        of steps; padding tokens are EOD in input_ids and IGNORE_INDEX in labels.
        """
        S = self.seq_len + 1
        n_tokens = sum(s.valid_tokens for s in self.sets)
        if n_tokens == 0:
            raise DataError("no validation documents: set data.valid_fraction > 0")
        n = -(-n_tokens // S)
        if max_samples is not None:
            n = min(n, int(max_samples))
        step = self.D * self.m
        n_steps = -(-n // step)
        rows = self._valid_rows()
        pad = np.full(S, -1, dtype=np.int64)
        for j in range(n_steps):
            block = [next(rows, pad) if j * step + i < n else pad for i in range(step)]
            mine = torch.from_numpy(np.stack(block[self.rank * self.m:(self.rank + 1) * self.m]))
            labels = mine[:, 1:].clone()
            labels[labels < 0] = IGNORE_INDEX
            inputs = mine[:, :-1].clone()
            inputs = torch.where(inputs <= -2, -2 - inputs, inputs)  # masked-out tokens are still inputs
            inputs[inputs < 0] = self.eod_id
            yield {"input_ids": inputs, "labels": labels}

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        w = self.samples_consumed // self.K
        self._window(w)
        return {
            "version": STATE_VERSION, "seed": self.seed, "fingerprint": self.fingerprint, "seq_len": self.seq_len,
            "shuffle_window": self.K, "stage": self.stage, "samples_consumed": self.samples_consumed,
            "window_start": copy.deepcopy(self._starts[w]), "total_samples": self.total_samples,
            "total_tokens": self.total_tokens,
        }

    def load_state_dict(self, state: dict, new_stage: bool | None = None) -> None:
        """Resume from ``state``. A new stage (default: when seq_len changed) packs on from the document cursor."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("fingerprint", self.fingerprint)):
            if state[key] != mine:
                raise DataError(f"data loader state has {key}={state[key]!r} but this run has {mine!r}: resume with "
                                "the same data.seed, datasets, weights, split and packing mode, or start fresh")
        if new_stage is None:
            new_stage = state["seq_len"] != self.seq_len
        self.total_samples, self.total_tokens = int(state["total_samples"]), int(state["total_tokens"])
        if not new_stage:
            if state["seq_len"] != self.seq_len or state["shuffle_window"] != self.K:
                raise DataError(f"resuming inside a stage needs the same seq_len and data.shuffle_window (state: "
                                f"{state['seq_len']}, {state['shuffle_window']}; now: {self.seq_len}, {self.K})")
            self.stage, self.samples_consumed = int(state["stage"]), int(state["samples_consumed"])
            self._reset_windows(copy.deepcopy(state["window_start"]), self.samples_consumed // self.K)
            return
        # New stage: re-pack the interrupted window with the old settings to learn which pieces were not consumed.
        old_len, old_k, consumed = int(state["seq_len"]), int(state["shuffle_window"]), int(state["samples_consumed"])
        w = consumed // old_k
        plans, end = self.packer.pack(state["window_start"], old_k, old_len)
        order = np.random.default_rng([self.seed, int(state["stage"]), w]).permutation(old_k)
        done = order[: consumed - w * old_k]
        cursor = resume_cursor(self.packer, state["window_start"], plans, end, done, old_len)
        self.stage, self.samples_consumed = int(state["stage"]) + 1, 0
        self._reset_windows(cursor, 0)

    def progress(self) -> dict:
        """Per-dataset epoch and position of the window being read (for logs)."""
        start = self._starts.get(self.samples_consumed // self.K) or self._window(self.samples_consumed // self.K)[0]
        return {"stage": self.stage, "samples_consumed": self.samples_consumed, "total_tokens": self.total_tokens,
                "datasets": [{"dir": s.dir, "epoch": e, "position": p, "train_documents": len(s.train_ids)}
                             for s, (e, p) in zip(self.sets, start["docs"])]}


def check_repeats(loader: PackedLoader, allow_repeat: bool = False, valid_fraction: float = 0.0,
                  max_steps: int | None = None) -> list[float]:
    """Refuse (or, with ``allow_repeat``, warn about) a dataset smaller than its share of one global batch:
    packing would silently cycle through it several times inside every step. Returns epochs per step
    for each dataset. Also warns when a validation split holds less than one sequence."""
    S, G = loader.seq_len + 1, loader.G
    per_step = []
    for s, w in zip(loader.sets, loader.packer.weights):
        tokens = s.train_tokens
        epochs = w * G * S / tokens  # this dataset's tokens in one global batch / its training tokens
        per_step.append(epochs)
        held = len(s.valid_ids)
        if valid_fraction and s.valid_tokens < S:
            log.warning("the validation split of dataset %s holds %d tokens (%d documents), less than one sequence "
                        "of seq_len+1=%d: its loss rests on one short padded sample; raise data.valid_fraction "
                        "(now %g) or lower trainer.seq_len", s.dir, s.valid_tokens, held, S,
                        valid_fraction)
        if epochs <= 1:
            continue
        share = "one global batch" if len(loader.sets) == 1 else f"its share (weight {w:.3g}) of one global batch"
        run = f"; trainer.max_steps={max_steps} would take {max_steps * epochs:.0f} epochs of it" if max_steps else ""
        kept = f", after holding out {held} documents for validation" if held else ""
        message = (f"dataset {s.dir} holds {tokens // S} training sequences of seq_len+1={S} tokens ({tokens} tokens in "
                   f"{len(s.train_ids)} document{'s' * (len(s.train_ids) != 1)}{kept}), fewer than {share} of {G} sequences "
                   f"(trainer.global_batch_size={G}): every step would repeat it {epochs:.1f} times{run}")
        if not allow_repeat:
            raise DataError(f"{message}. Use more data, or a smaller trainer.global_batch_size or trainer.seq_len, or "
                            "set data.allow_repeat=true to train on the repeats anyway")
        log.warning("%s (allowed by data.allow_repeat=true)", message)
    return per_step


def warn_long_conversations(loader: PackedLoader) -> int:
    """Chat datasets: count the conversations longer than one sample. Packing splits them across samples
    (the second part trains without the first as context); nothing is cut silently. Returns the count."""
    S = loader.seq_len + 1
    long = {s.dir: int((np.asarray(s.lengths) > S).sum()) for s in loader.sets if s.masks is not None}
    total = sum(long.values())
    if total:
        log.warning("%d conversation(s) are longer than trainer.seq_len + 1 = %d tokens and will be split across "
                    "samples (%s); raise trainer.seq_len, or rebuild with data.chat.max_tokens=%d to skip them "
                    "(counted in the manifest)", total, S, ", ".join(f"{d}: {n}" for d, n in long.items() if n), S)
    return total


def loader_from_config(data_cfg, seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, max_steps: int | None = None):
    """A :class:`PackedLoader` from a ``data`` config node (:class:`sbtrain.config.data.DataConfig`), checked by
    :func:`check_repeats` (``max_steps`` only makes its message give the run's epoch count), wrapped in a
    :class:`sbtrain.data.prefetch.PrefetchLoader` (same batches and state) when ``data.prefetch`` > 0."""
    datasets = list(data_cfg.datasets) or [data_cfg.output]
    loader = PackedLoader(datasets, seq_len, global_batch_size, micro_batch_size, dp_rank, dp_size,
                          weights=list(data_cfg.weights) or None, seed=data_cfg.seed,
                          shuffle_window=data_cfg.shuffle_window, valid_fraction=data_cfg.valid_fraction,
                          split_seed=data_cfg.split_seed, per_domain_packing=data_cfg.per_domain_packing,
                          document_boundaries=data_cfg.document_boundaries)
    check_repeats(loader, getattr(data_cfg, "allow_repeat", False), data_cfg.valid_fraction, max_steps)
    warn_long_conversations(loader)
    depth = int(getattr(data_cfg, "prefetch", 0))
    if depth > 0:
        from sbtrain.data.prefetch import PrefetchLoader

        return PrefetchLoader(loader, depth)
    return loader
