"""``python -m sbtrain.train`` / ``sbtrain-train``: train a model on built datasets.

The command only: ``sbtrain.trainer.build.build_trainer`` makes every piece of a run from the
resolved Hydra config (handed the evaluation callback, which sits above the trainer); this file
resumes, records the run, trains (one run or its stages) and reports. Everything lands in
``trainer.out_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sbtrain.eval.callback import EvalCallback
from sbtrain.trainer.build import build_trainer
from sbtrain.trainer.callbacks import JSONLMetrics, plot_loss_curve
from sbtrain.trainer.distributed import report_collective_timeouts
from sbtrain.trainer.trainer import Trainer

log = logging.getLogger("sbtrain.train")


def record_run(cfg: DictConfig, trainer: Trainer, out: Path, resumed: dict | None) -> None:
    """After the resume decision, so a refused resume leaves the run's record alone: the resolved
    config.yaml, and on a resume metrics.jsonl cut back to the checkpoint's step with a marker."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if resumed is not None:
        for cb in trainer.callbacks:
            if isinstance(cb, JSONLMetrics):
                cb.rewind(int(resumed["step"]), resumed["path"], tokens=resumed.get("tokens"))


def train(cfg: DictConfig) -> dict:
    """Run (or resume) a training run, or the stages ``stage=NAME`` / ``stages=all`` pick from
    ``stage_plan`` (sbtrain/trainer/stages.py); returns the summary with the paths it wrote."""
    if cfg.get("stage") is not None or cfg.get("stages") is not None:
        from sbtrain.trainer.stages import run_stages

        return run_stages(cfg, train_run)
    return train_run(cfg)


def train_run(cfg: DictConfig, on_start=None) -> dict:
    """One run: build, resume if a checkpoint exists, then ``on_start(trainer, resumed)`` (a stage
    starting from the previous stage's checkpoint), train."""
    trainer, paths = build_trainer(cfg, eval_callback=EvalCallback)
    # A hung or lost rank fails the run with this rank, the op and the step named (torchrun / Slurm
    # then restart it from the newest checkpoint) instead of hanging until killed.
    with report_collective_timeouts(cfg.parallel.collective_timeout_s, lambda: f"step {trainer.step + 1}"):
        resumed = trainer.maybe_resume(cfg.trainer.resume)
        record_run(cfg, trainer, Path(paths["out_dir"]), resumed)
        if on_start is not None:
            on_start(trainer, resumed)
        summary = trainer.fit()
    summary.update(paths, resumed_from=resumed and resumed["path"])
    if cfg.logger.plot and cfg.logger.jsonl and Path(paths["metrics"]).exists():
        png = plot_loss_curve(paths["metrics"], Path(paths["out_dir"]) / "loss_curve.png")
        summary["loss_curve"] = str(png) if png else None
    return summary


def report(summary: dict) -> str:
    """What a person wants to see at the end of a run: did it learn, where did it all go."""
    lines = [f"trained to step {summary['step']} ({summary['tokens']:,} tokens; {summary['skipped_steps']} steps skipped)"]
    for stage in summary.get("stages", []):  # stage=NAME / stages=all
        state = "already done" if stage.get("skipped") else f"stopped by {stage['stopped_by']}" if stage.get(
            "stopped_by") else "done"
        lines.append(f"stage {stage['stage']}: step {stage['step']}, {stage['tokens']:,} tokens ({state})")
    if summary.get("stopped_by"):
        lines.append(f"stopped early by {summary['stopped_by']}; rerun the same command to resume")
    if summary.get("first_valid_loss") is not None and summary.get("last_valid_loss") is not None:
        lines.append(f"validation loss: first {summary['first_valid_loss']:.4f} -> last {summary['last_valid_loss']:.4f}")
    for key in ("out_dir", "checkpoints", "metrics", "loss_curve"):
        if summary.get(key):
            lines.append(f"{key.replace('_', ' ')}: {summary[key]}")
    return "\n".join(lines)


def task(cfg: DictConfig) -> None:
    summary = train(cfg)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # one report per job, not one per rank
    print(report(summary), flush=True)
    print(json.dumps({"summary": summary}), flush=True)


def main() -> None:
    from sbtrain.cli.app import run_app

    run_app(task, "train")


if __name__ == "__main__":
    main()
