"""``python -m sbtrain.train`` / ``sbtrain-train``: train a model on built datasets.

Builds the pieces from the resolved Hydra config and hands them to the Trainer: the model
(``build_model``), the loader (``PackedLoader``: global, resumable state), the optimizer, the
checkpointer, the callbacks. Everything lands in ``trainer.out_dir``.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sbtrain.config.model import ConfigError
from sbtrain.config.parallel import validate_parallel
from sbtrain.config.train import validate_logger
from sbtrain.data.build import check_vocab
from sbtrain.data.loader import loader_from_config
from sbtrain.models.build import build_model, count_parameters, to_model_config
from sbtrain.trainer.callbacks import ConsoleProgress, JSONLMetrics, WandbLogger, plot_loss_curve
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.distributed import init_process_group, make_mesh, parallelize, report_collective_timeouts
from sbtrain.trainer.flops import flops_per_token, peak_flops
from sbtrain.trainer.observability import build_observability
from sbtrain.trainer.optim import build_optimizer
from sbtrain.trainer.trainer import Trainer

log = logging.getLogger("sbtrain.train")


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               check=False)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class PackedBatches:
    """Adapts loader micro batches to the model: with document boundaries, a micro batch is
    flattened to one packed row so ``cu_seqlens`` (over the flattened tokens) applies."""

    def __init__(self, loader, eval_samples: int | None = None):
        self.loader, self.eval_samples = loader, eval_samples

    @staticmethod
    def to_model(mb: dict) -> dict:
        if "cu_seqlens" in mb:
            return {"input_ids": mb["input_ids"].reshape(1, -1), "labels": mb["labels"].reshape(1, -1),
                    "cu_seqlens": mb["cu_seqlens"]}
        return {"input_ids": mb["input_ids"], "labels": mb["labels"]}

    def next_global_batch(self) -> list[dict]:
        return [self.to_model(mb) for mb in self.loader.next_global_batch()]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def batches(self):
        for mb in self.loader.valid_batches(self.eval_samples):
            yield self.to_model(mb)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r} is unknown; use auto, cpu or cuda")
    return torch.device(name)


def configure_matmul_precision(device: torch.device, tf32: bool) -> None:
    """fp32 matmuls and convolutions on CUDA / MACA use TF32 tensor cores (``trainer.tf32``, on by
    default, as Megatron and TorchTitan do): what stays fp32 under bf16 autocast (the GLA
    state recurrence's fp32 parts, the weight gradient of the head) is not run at 1/15 speed."""
    if device.type != "cuda":
        return  # CPU fp32 matmuls stay exact
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def build_trainer(cfg: DictConfig) -> tuple[Trainer, dict]:
    """Every piece of a run from its config; returns the trainer and the run's paths."""
    tcfg = OmegaConf.to_object(cfg.trainer)
    pcfg = OmegaConf.to_object(cfg.parallel)
    ocfg = OmegaConf.to_object(cfg.optim)
    ocfg.new_params.validate()
    ckcfg = OmegaConf.to_object(cfg.checkpoint)
    lcfg = OmegaConf.to_object(cfg.logger)
    OmegaConf.to_object(cfg.operators).apply()  # backend overrides + MetaX tuning, before any op runs
    validate_logger(lcfg)
    model_cfg = to_model_config(cfg.model)
    if tcfg.init_from:
        # A converted (or any saved) model brings its own architecture; only training-time
        # switches come from the model group.
        from sbtrain.models.weights import load_config

        recipe_cfg = model_cfg
        model_cfg = load_config(tcfg.init_from)
        model_cfg.document_masking = recipe_cfg.document_masking
        model_cfg.spike = recipe_cfg.spike  # spike-aware continual pretraining of saved weights
    data_cfg = OmegaConf.to_object(cfg.data).validate()
    device = pick_device(tcfg.device)
    configure_matmul_precision(device, tcfg.tf32)
    world = init_process_group(device, pcfg.collective_timeout_s)
    dims = validate_parallel(pcfg, world, model_cfg, tcfg)  # every layout error before anything is built
    mesh = make_mesh(dims, device)
    rank0 = mesh is None or torch.distributed.get_rank() == 0
    out = Path(tcfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(tcfg.seed)  # the same seed everywhere: every rank builds the same initial weights

    datasets = data_cfg.train_datasets()
    for directory in datasets:
        check_vocab(directory, model_cfg.vocab_size)  # a token id >= vocab fails here, before training
    loader = loader_from_config(data_cfg, tcfg.seq_len, tcfg.global_batch_size, tcfg.micro_batch_size,
                                dp_rank=mesh.dp_rank if mesh else 0, dp_size=dims.dp)
    valid = PackedBatches(loader, tcfg.eval_batches * tcfg.micro_batch_size or None) if data_cfg.valid_fraction else None

    model = build_model(model_cfg, device=device)
    if tcfg.init_from:
        from sbtrain.models.weights import load_into

        load_into(model, tcfg.init_from)
        log.info("initialised from %s", tcfg.init_from)
    counts = count_parameters(model)  # before sharding: the model's true sizes
    layout = parallelize(model, mesh, pcfg, tcfg)
    optimizer = build_optimizer(model, ocfg)  # after FSDP: it steps the sharded parameters
    engine = None
    if pcfg.engine == "deepspeed" and mesh is not None:
        from parallel.deepspeed_engine import DeepSpeedEngine

        ds = pcfg.deepspeed
        engine = DeepSpeedEngine(model, optimizer, zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer,
                                 clip_grad=ocfg.clip_grad or None, precision=tcfg.precision,
                                 platform=None if ds.accelerator == "auto" else ds.accelerator,
                                 reduce_dtype=pcfg.reduce_dtype)
        model, optimizer = engine.module, engine.optimizer
    active_body = counts["params_active"] - counts["params_embedding"] - counts["params_lm_head"]
    fpt = flops_per_token(model_cfg, tcfg.seq_len, active_body, counts["params_lm_head"] or counts["params_embedding"])
    peak, peak_source, peak_kind = peak_flops(device, tcfg.precision, tcfg.peak_flops)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank0:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    meta = {"git_revision": git_revision(), "config": resolved, "model": model_cfg.name}
    callbacks = []
    if lcfg.jsonl and rank0:
        callbacks.append(JSONLMetrics(out / "metrics.jsonl"))
    if lcfg.console:
        callbacks.append(ConsoleProgress(tcfg.log_every))
    callbacks.append(WandbLogger(lcfg.wandb.mode, lcfg.wandb.project, lcfg.wandb.name, str(out), resolved))
    callbacks += build_observability(OmegaConf.to_object(cfg.observe), out, cp=dims.cp, eval_batches=tcfg.eval_batches)
    teacher, dcfg = None, OmegaConf.to_object(cfg.distill).validate()
    if dcfg.weight:
        if mesh is not None and (mesh.cp > 1 or mesh.tp > 1 or pcfg.engine != "fsdp"):
            raise ConfigError("distillation runs with data parallelism (FSDP) only for now: set parallel.cp=1, "
                              "parallel.tp=1, parallel.engine=fsdp, or distill.weight=0")
        from sbtrain.trainer.distill import load_teacher

        teacher = load_teacher(dcfg.teacher, device)
        if teacher.config.vocab_size != model_cfg.vocab_size:
            raise ConfigError(f"distill.teacher has vocab_size={teacher.config.vocab_size}, the student "
                              f"{model_cfg.vocab_size}: distillation needs the same tokenizer")
    trainer = Trainer(
        model=model, optimizer=optimizer, cfg=tcfg, optim_cfg=ocfg, train_data=PackedBatches(loader),
        valid_data=valid, checkpointer=Checkpointer(out / "checkpoints", ckcfg.keep_last, ckcfg.async_save),
        checkpoint_every=ckcfg.every, callbacks=callbacks, flops_per_token=fpt, peak_flops=peak, peak_kind=peak_kind, meta=meta,
        mesh=mesh, cp_linear=pcfg.cp_linear, engine=engine, teacher=teacher, distill_cfg=dcfg,
        expert_grad_divisor=layout["expert_grad_divisor"], grad_sync=pcfg.grad_sync,
    )
    log.info("model %s: %s; %.3g FLOPs/token; peak %.3g FLOP/s (%s); device %s", model_cfg.name,
             json.dumps(counts), fpt, peak, peak_source, device)
    return trainer, {"out_dir": str(out), "metrics": str(out / "metrics.jsonl"), "checkpoints": str(out / "checkpoints")}


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
    trainer, paths = build_trainer(cfg)
    # A hung or lost rank fails the run with this rank, the op and the step named (torchrun / Slurm
    # then restart it from the newest checkpoint) instead of hanging until killed.
    with report_collective_timeouts(cfg.parallel.collective_timeout_s, lambda: f"step {trainer.step + 1}"):
        resumed = trainer.maybe_resume(cfg.trainer.resume)
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
