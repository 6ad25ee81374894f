"""Evaluation during training (``observe.eval``): :class:`EvalCallback`, a Trainer callback that
runs :func:`sbtrain.eval.evaluate_ppl` / :func:`sbtrain.eval.loss_by_position.loss_by_position`
every ``every`` steps on the validation micro batches (one window per row); every rank scores its
share, rank 0 records what it measured on its own (kind ``eval``).

It lives here, not in ``sbtrain.trainer``, because the eval room sits above the trainer
(tests/test_architecture.py): ``sbtrain.train`` hands it to
:func:`sbtrain.trainer.observability.build_observability` as ``eval_callback``.
"""

from __future__ import annotations

import logging

import torch

from sbtrain.eval.corpus import Window
from sbtrain.eval.loss_by_position import loss_by_position
from sbtrain.eval.ppl import evaluate_ppl
from sbtrain.trainer.callbacks import Callback

log = logging.getLogger("sbtrain.train")


class EvalCallback(Callback):
    all_ranks = True  # a sharded model's forward needs every rank

    def __init__(self, every: int, ppl: bool = True, loss_by_position: bool = False, max_batches: int = 0):
        self.every, self.ppl, self.by_position, self.max_batches = every, ppl, loss_by_position, max_batches
        self.warned = False

    def windows(self, trainer) -> tuple[list, int]:
        """This rank's validation micro batches as ``sbtrain.eval`` windows (one per row, with the
        loader's labels), and the rows per micro batch (the scoring batch size). Packed rows are
        scored as one window: documents in it see each other (no document masking here)."""
        windows, rows = [], 1
        for i, mb in enumerate(trainer.valid_data.batches()):
            if self.max_batches and i >= self.max_batches:
                break
            rows = mb["input_ids"].shape[0]
            windows += [Window(ids, labels) for ids, labels in zip(mb["input_ids"], mb["labels"])]
        return windows, rows

    def on_step_end(self, trainer, metrics):
        if trainer.step % self.every:
            return
        if trainer.valid_data is None:
            if not self.warned:
                log.warning("observe.eval.every=%d but there is no validation split (data.valid_fraction=0)",
                            self.every)
                self.warned = True
            return
        windows, rows = self.windows(trainer)
        record: dict = {"step": trainer.step, "tokens": trainer.tokens}
        with torch.no_grad():  # the functions restore the model's train/eval mode themselves
            if self.ppl:
                stats = evaluate_ppl(trainer.model, windows, batch_size=rows)
                record.update(ppl=stats.ppl, loss=stats.loss, eval_tokens=stats.tokens)
            if self.by_position:
                record["loss_by_position"] = loss_by_position(trainer.model, windows, batch_size=rows).buckets()
        if trainer._rank0:
            trainer.log_record("eval", record)


__all__ = ["EvalCallback"]
