"""Trainer callbacks: JSONL metrics, rich console progress, wandb, the loss-curve plot.

A callback sees the trainer at fixed points and never changes training; each is cheap when on.
Only rank 0 logs: the trainer calls a callback on other ranks only if it sets ``all_ranks = True``
(observability callbacks that take part in collectives; they write on rank 0 only).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("sbtrain.train")


class Callback:
    all_ranks = False  # True: called on every rank (it joins collectives), not only on rank 0

    def on_fit_start(self, trainer) -> None: ...
    def on_before_optimizer_step(self, trainer) -> None: ...  # gradients final, not yet clipped or applied
    def on_step_end(self, trainer, metrics: dict) -> None: ...
    def on_record(self, trainer, kind: str, record: dict) -> None: ...  # other callbacks' records (model_stats...)
    def on_eval(self, trainer, metrics: dict) -> None: ...
    def on_checkpoint(self, trainer, path: Path) -> None: ...
    def on_fit_end(self, trainer) -> None: ...


class JSONLMetrics(Callback):
    """Appends one JSON object per logged step / evaluation to ``metrics.jsonl``.

    A resume (:meth:`rewind`) first drops the records of steps after the checkpoint, which are about
    to be redone, and writes one ``{"kind": "resume", "step": N, ...}`` line, so a reader never sees
    two values for one step. Records without a step are kept: they belong to no step that is redone.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rewind(self, step: int, checkpoint: str, tokens: int | None = None) -> int:
        """Cut the file back to the records at or before ``step`` and mark the resume; returns how
        many lines were dropped (a line cut short by a crash counts among them)."""
        kept, dropped = [], 0
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
            if later:
                dropped += 1
            else:
                kept.append(line)
        kept.append(json.dumps({"kind": "resume", "step": step, "tokens": tokens, "checkpoint": str(checkpoint),
                                "dropped": dropped}))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(kept) + "\n")
        os.replace(tmp, self.path)  # a crash now leaves the old file or the new one, never half of it
        if dropped:
            log.info("metrics.jsonl: dropped %d records after step %d (they are redone)", dropped, step)
        return dropped

    def _write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer, metrics):
        self._write({"kind": "train", **metrics})

    def on_eval(self, trainer, metrics):
        self._write({"kind": "valid", **metrics})

    def on_record(self, trainer, kind, record):
        self._write({"kind": kind, **record})


class ConsoleProgress(Callback):
    """A rich progress bar with ETA and the latest loss; plain log lines when not a terminal."""

    def __init__(self, every: int = 1):
        self.every = every
        self.progress = None
        self.task = None

    def on_fit_start(self, trainer):
        import sys

        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=trainer.total_steps, completed=trainer.step)

    def on_step_end(self, trainer, metrics):
        text = (
            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} gnorm {metrics['grad_norm']:.3f} "
            f"{metrics['tokens_per_s']:.0f} tok/s{_utilisation(metrics)}"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=trainer.step, description=text)
        elif trainer.step % self.every == 0 or trainer.step == trainer.total_steps:
            log.info("step %d/%d %s", trainer.step, trainer.total_steps, text)

    def on_eval(self, trainer, metrics):
        msg = f"step {trainer.step}: validation loss {metrics['valid_loss']:.4f} (ppl {math.exp(min(metrics['valid_loss'], 50)):.1f})"
        if self.progress is not None:
            self.progress.console.print(msg)
        else:
            log.info(msg)

    def on_fit_end(self, trainer):
        if self.progress is not None:
            self.progress.stop()


def _utilisation(metrics: dict) -> str:
    """MFU only against a real peak; on the CPU the share of a measured matmul, labelled as such."""
    if "mfu" in metrics:
        return f" mfu {metrics['mfu']:.1%}"
    if "pct_of_measured_matmul" in metrics:
        return f" {metrics['pct_of_measured_matmul']:.1f}% of measured matmul"
    return ""


class WandbLogger(Callback):
    """wandb, offline by default (``logger.wandb.mode=online`` to sync, ``disabled`` for none)."""

    def __init__(self, mode: str, project: str, name: str | None, directory: str, config: dict):
        self.mode, self.project, self.name, self.directory, self.config = mode, project, name, directory, config
        self.run = None

    def on_fit_start(self, trainer):
        if self.mode == "disabled":
            return
        import wandb

        Path(self.directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, name=self.name, dir=self.directory, mode=self.mode, config=self.config, resume="allow"
        )

    def on_step_end(self, trainer, metrics):
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.step)

    def on_eval(self, trainer, metrics):
        if self.run is not None:
            self.run.log({f"valid/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.step)

    def on_record(self, trainer, kind, record):
        if self.run is not None:
            self.run.log({f"{kind}/{k}": v for k, v in _flatten(record).items() if k != "step"}, step=trainer.step)

    def on_fit_end(self, trainer):
        if self.run is not None:
            self.run.finish()


def _flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts / lists of numbers as ``a/b/0`` keys (wandb plots scalars only)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            out.update(_flatten(dict(enumerate(value)), name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Training and validation loss against step, from a metrics.jsonl, as a PNG. Only ``train`` and
    ``valid`` records count (``resume`` markers and other kinds are skipped); a step logged twice
    (files written before resumes rewound them) is plotted once, with its last value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_by_step, valid_by_step = {}, {}
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            train_by_step[rec["step"]] = rec["loss"]
        elif rec.get("kind") == "valid":
            valid_by_step[rec["step"]] = rec["valid_loss"]
    train, valid = sorted(train_by_step.items()), sorted(valid_by_step.items())
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
