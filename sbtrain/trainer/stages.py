"""Staged long-context training: ``stage=NAME`` runs one stage of ``stage_plan``, ``stages=all`` all of them.

Layout: stage ``S`` of a run lives in ``<trainer.out_dir>/S/`` (its own checkpoints, metrics, config)
and, once it has trained to its end, holds ``stage_done.json`` naming its final checkpoint.

How a stage starts (docs/DESIGN_NOTES.md §6):

- its own checkpoint exists: the ordinary exact resume (``trainer.resume=auto``) inside the stage;
- else, the first stage: a fresh run (or ``trainer.init_from``, a converted model);
- else, from the previous stage's final checkpoint: model weights, step count, token count, the
  RNG states and the data position carry over. The data position crosses the boundary as the loader's
  document cursor (``PackedLoader.load_state_dict(new_stage=True)``): the samples of the interrupted
  shuffle window that were not trained on go back to the document stream and the new sequence length
  packs on from there, so no document is seen twice in an epoch. The optimizer moments carry over by
  default (``optimizer: carry``; the same AdamW, the same data, a short warmup of the new schedule is
  enough); ``optimizer: reset`` starts them fresh. The LR schedule always restarts: the trainer's
  ``schedule_start`` is the stage's first step, so warmup and decay span this stage only.
  A missing previous stage is an error naming it.

``stages=all`` skips the stages that hold ``stage_done.json``, so after a crash it resumes the
interrupted stage (from its own checkpoint), never an earlier one. The stage's RoPE change (if any)
is applied to the built model before every start or resume of the stage and of the stages after it.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from sbtrain.config.model import ConfigError, YarnConfig
from sbtrain.config.stages import StageConfig, stage_batch, validate_plan
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.trainer import Trainer, _python_rng_from_json

log = logging.getLogger("sbtrain.train")
DONE = "stage_done.json"


def read_done(run_dir: Path, name: str) -> dict | None:
    path = run_dir / name / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_done(run_dir: Path, name: str, record: dict) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = run_dir / name / DONE
        tmp = path.with_name(f".{DONE}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()  # the next stage (on every rank) reads this file


def rope_in_force(plan: list[StageConfig], index: int, run_seq_len: int) -> tuple[float | None, YarnConfig | None]:
    """``(RoPE base, YaRN scaling)`` in force at stage ``index``: each the last one a stage up to it
    set (None: the model's own). A yarn stage's defaults are resolved here (see RopeScalingConfig)."""
    theta, yarn = None, None
    for i, stage in enumerate(plan[: index + 1]):
        rope = stage.rope
        if rope.kind == "theta":
            theta = float(rope.theta)
        elif rope.kind == "yarn":
            before = plan[i - 1].seq_len if i else run_seq_len
            original = rope.original_max_position or (yarn.original_max_position if yarn else before)
            factor = float(rope.factor) if rope.factor is not None else stage.seq_len / original
            if factor < 1:
                raise ConfigError(f"stage {stage.name}: YaRN factor {factor:g} (seq_len {stage.seq_len} / original "
                                  f"{original}) is below 1; YaRN stretches the context, set rope.factor >= 1")
            yarn = YarnConfig(factor=factor, original_max_position=int(original), beta_fast=float(rope.beta_fast),
                              beta_slow=float(rope.beta_slow), attention_factor=rope.attention_factor)
    return theta, yarn


def stage_config(cfg: DictConfig, plan: list[StageConfig], index: int, run_dir: Path) -> DictConfig:
    """The run's config with the stage's knobs applied: length, batch, duration, schedule, CP, RoPE, folder."""
    stage = plan[index]
    scfg = copy.deepcopy(cfg)
    batch, micro = stage_batch(stage, cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size,
                               cfg.trainer.seq_len)
    scfg.trainer.seq_len, scfg.trainer.global_batch_size, scfg.trainer.micro_batch_size = stage.seq_len, batch, micro
    scfg.trainer.max_steps, scfg.trainer.max_tokens = stage.max_steps, stage.max_tokens
    scfg.trainer.out_dir = str(run_dir / stage.name)
    for key in ("lr", "min_lr_ratio", "warmup_steps", "schedule"):
        if getattr(stage, key) is not None:
            scfg.optim[key] = getattr(stage, key)
    if stage.cp is not None:
        scfg.parallel.cp = stage.cp
    if index > 0 and scfg.trainer.init_from:
        # Later stages load the previous stage's checkpoint: take the converted model's architecture,
        # as build_trainer would, without reading its weights again.
        from sbtrain.trainer.init_from import model_config

        arch = model_config(scfg.trainer.init_from)
        arch.document_masking = bool(cfg.model.document_masking)
        scfg.model = OmegaConf.structured(arch)
        scfg.trainer.init_from = None
    theta, yarn = rope_in_force(plan, index, cfg.trainer.seq_len)
    if theta is not None:
        scfg.model.rope_base = theta  # the record (config.yaml, checkpoint meta); the model gets it in on_start
    if yarn is not None:
        scfg.model.rope_yarn = OmegaConf.structured(yarn)
    scfg.stage, scfg.stages = stage.name, None
    return scfg


def _core_model(model: torch.nn.Module) -> torch.nn.Module:
    return model if hasattr(model, "config") else model.module  # a DeepSpeed engine wraps the CausalLM


def start_from_checkpoint(trainer: Trainer, path: Path, carry_optimizer: bool) -> None:
    """Load the previous stage's final checkpoint into a freshly built trainer of the next stage."""
    state = trainer.state_dict()  # the load template (it materialises the optimizer state)
    if not carry_optimizer:
        del state["optim"]
    Checkpointer(path.parent).load(state, path)
    # optim None: fresh moments (AdamW's bias correction restarts at step 1); an engine that cannot
    # start one over loaded weights says so.
    trainer.engine.load_state_dict(state["model"], state["optim"] if carry_optimizer else None)
    # The loader packs on from the document cursor (a stage may change the sequence length).
    trainer.train_data.load_state_dict(state["data"], new_stage=True)
    t = state["trainer"]
    trainer.step, trainer.tokens, trainer.skipped_steps = int(t["step"]), int(t["tokens"]), int(t["skipped_steps"])
    trainer.consecutive_nonfinite = 0
    torch.set_rng_state(t["rng_torch"])
    random.setstate(_python_rng_from_json(t["rng_python"]))
    log.info("stage starts from %s at step %d (%d tokens)", path, trainer.step, trainer.tokens)


def run_stage(cfg: DictConfig, plan: list[StageConfig], index: int, run_dir: Path,
              train_run: Callable[..., dict]) -> dict:
    stage = plan[index]
    previous = None
    if index > 0:
        before = plan[index - 1].name
        previous = read_done(run_dir, before)
        if previous is None:
            raise ConfigError(
                f"stage {stage.name} starts from stage {before}'s final checkpoint, but {run_dir / before} holds no "
                f"finished stage ({DONE} is missing): run stage={before} first, or stages=all"
            )
    scfg = stage_config(cfg, plan, index, run_dir)
    theta, yarn = rope_in_force(plan, index, cfg.trainer.seq_len)
    start_step = int(previous["step"]) if previous else 0

    def on_start(trainer: Trainer, resumed: dict | None) -> None:
        trainer.schedule_start = start_step  # this stage's LR schedule starts at its first step
        if theta is not None:
            _core_model(trainer.model).config.rope_base = theta  # the rotary embedding reads it every forward
        if yarn is not None:
            _core_model(trainer.model).config.rope_yarn = yarn
        if resumed is None and previous is not None:
            start_from_checkpoint(trainer, Path(previous["checkpoint"]), stage.optimizer == "carry")

    log.info("stage %s (%d of %d): seq_len %d, global batch %d, out_dir %s", stage.name, index + 1, len(plan),
             scfg.trainer.seq_len, scfg.trainer.global_batch_size, scfg.trainer.out_dir)
    try:
        summary = train_run(scfg, on_start)
    except ConfigError as exc:  # name the stage whose derived knobs (batch, cp, ...) are wrong; keep the type
        exc.args = (f"stage {stage.name}: {exc.args[0] if exc.args else exc}", *exc.args[1:])
        raise
    summary["stage"] = stage.name
    if not summary.get("stopped_by"):
        checkpoint = Path(summary["checkpoints"]) / f"step_{summary['step']:08d}"
        _write_done(run_dir, stage.name, {"stage": stage.name, "step": summary["step"], "tokens": summary["tokens"],
                                          "checkpoint": str(checkpoint.resolve())})
    return summary


def run_stages(cfg: DictConfig, train_run: Callable[..., dict]) -> dict:
    """``stage=NAME`` or ``stages=all``; returns the last stage's summary plus ``stages`` (one line each)."""
    plan = validate_plan([OmegaConf.to_object(s) for s in cfg.stage_plan])
    names = [s.name for s in plan]
    if cfg.stage is not None and cfg.stages is not None:
        raise ConfigError(f"stage={cfg.stage} and stages={cfg.stages} both given: run one stage or all of them")
    if cfg.stages is not None and cfg.stages != "all":
        raise ConfigError(f"stages={cfg.stages!r} is unknown: stages=all runs every stage; stage=NAME runs one")
    if cfg.stage == "all":
        raise ConfigError("stage=all: to run every stage use stages=all (stage=NAME runs one of " f"{names})")
    if cfg.stage is not None and cfg.stage not in names:
        close = difflib.get_close_matches(cfg.stage, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"stage={cfg.stage} is not in stage_plan; {hint}(stages: {', '.join(names)})")
    for stage in plan:  # every batch error before the first stage trains
        stage_batch(stage, cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, cfg.trainer.seq_len)
    run_dir = Path(str(cfg.trainer.out_dir))  # resolved once: an interpolation like ${now:} must not move
    indices = [names.index(cfg.stage)] if cfg.stage is not None else range(len(plan))
    done_lines, summary = [], {}
    for i in indices:
        done = read_done(run_dir, plan[i].name)
        if cfg.stages == "all" and done is not None:
            log.info("stage %s already finished at step %d: skipping it", plan[i].name, done["step"])
            done_lines.append({**done, "skipped": True})
            continue
        summary = run_stage(cfg, plan, i, run_dir, train_run)
        done_lines.append({"stage": plan[i].name, "step": summary["step"], "tokens": summary["tokens"],
                           "stopped_by": summary.get("stopped_by"), "resumed_from": summary.get("resumed_from")})
        if summary.get("stopped_by"):
            break  # a signal or exit_at_step: the next invocation resumes this stage
    if not summary:  # every stage was already done
        last = done_lines[-1]
        summary = {"step": last["step"], "tokens": last["tokens"], "skipped_steps": 0, "stopped_by": None,
                   "out_dir": str(run_dir / last["stage"]), "stage": last["stage"]}
    summary["stages"] = done_lines
    return summary
