"""Build a whole run from its resolved Hydra config (``recipes/train.yaml``): process group, mesh,
model (built on meta and sharded), data, optimizer, engine, components, callbacks, checkpointer,
and the Trainer that owns them. The CLI (``sbtrain.train``) calls :func:`build_trainer`; tests and
benchmarks call it too, so a run built here is exactly what ``sbtrain-train`` trains.
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
from sbtrain.models.build import to_model_config
from sbtrain.trainer.batches import PackedBatches
from sbtrain.trainer.callbacks import ConsoleProgress, JSONLMetrics, WandbLogger
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.components import Distillation
from sbtrain.trainer.distributed import build_parallel_model, init_process_group, make_mesh
from sbtrain.trainer.flops import Throughput, flops_per_token, peak_flops
from sbtrain.trainer.observability import build_observability
from sbtrain.trainer.optim import build_optimizer
from sbtrain.trainer.resume_guard import dataset_tokenizers, resume_guard
from sbtrain.trainer.train_module import TrainModule
from sbtrain.trainer.trainer import Trainer

log = logging.getLogger("sbtrain.train")


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               check=False)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def build_trainer(cfg: DictConfig, eval_callback: type | None = None) -> tuple[Trainer, dict]:
    """Every piece of a run from its resolved config; returns the trainer and the run's paths.
    ``eval_callback``: the class ``observe.eval`` runs (``sbtrain.eval.callback.EvalCallback``,
    handed down by the CLI: evaluation sits above the trainer)."""
    tcfg = OmegaConf.to_object(cfg.trainer)
    pcfg = OmegaConf.to_object(cfg.parallel)
    ocfg = OmegaConf.to_object(cfg.optim).validate()  # a bad lr / beta is named here, not by torch's AdamW
    ckcfg = OmegaConf.to_object(cfg.checkpoint)
    lcfg = OmegaConf.to_object(cfg.logger)
    OmegaConf.to_object(cfg.operators).apply()  # backend overrides + MetaX tuning, before any op runs
    validate_logger(lcfg)
    model_cfg = to_model_config(cfg.model)
    if tcfg.init_from:
        # A converted model or a training checkpoint (SFT after CPT) brings its own architecture; only
        # training-time switches come from the model group.
        from sbtrain.trainer.init_from import model_config

        recipe_cfg = model_cfg
        model_cfg = model_config(tcfg.init_from)
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
                                dp_rank=mesh.dp_rank if mesh else 0, dp_size=dims.dp, max_steps=tcfg.max_steps)
    valid = PackedBatches(loader, tcfg.eval_batches * tcfg.micro_batch_size or None) if data_cfg.valid_fraction else None

    # On a mesh (FSDP engine): built on meta, sharded, each rank materialising, initialising and
    # loading (init_from) only its shards; alone or with DeepSpeed, a full build. Same weights.
    model, layout, counts = build_parallel_model(model_cfg, mesh, pcfg, tcfg, device, init_from=tcfg.init_from)
    if tcfg.init_from:
        log.info("initialised from %s", tcfg.init_from)
    optimizer = build_optimizer(model, ocfg)  # after FSDP: it steps the sharded parameters
    deepspeed = None
    if pcfg.engine == "deepspeed" and mesh is not None:
        from parallel.deepspeed_engine import DeepSpeedEngine

        ds = pcfg.deepspeed
        deepspeed = DeepSpeedEngine(model, optimizer, zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer,
                                    clip_grad=ocfg.clip_grad or None, precision=tcfg.precision,
                                    platform=None if ds.accelerator == "auto" else ds.accelerator,
                                    reduce_dtype=pcfg.reduce_dtype)
    active_body = counts["params_active"] - counts["params_embedding"] - counts["params_lm_head"]
    fpt = flops_per_token(model_cfg, tcfg.seq_len, active_body, counts["params_lm_head"] or counts["params_embedding"])
    peak, peak_source, peak_kind = peak_flops(device, tcfg.precision, tcfg.peak_flops)

    resolved = OmegaConf.to_container(cfg, resolve=True)  # config.yaml: written by train_run after the resume check
    meta = {"git_revision": git_revision(), "config": resolved, "model": model_cfg.name,
            # What a resume compares (resume_guard): the model actually built (init_from's, not the recipe's)
            # and the tokenizer(s) of the data.
            "model_config": OmegaConf.to_container(OmegaConf.structured(model_cfg)),
            "tokenizer": dataset_tokenizers(datasets)}
    callbacks = []
    if lcfg.jsonl and rank0:
        callbacks.append(JSONLMetrics(out / "metrics.jsonl"))
    if lcfg.console:
        callbacks.append(ConsoleProgress(tcfg.log_every))
    callbacks.append(WandbLogger(lcfg.wandb.mode, lcfg.wandb.project, lcfg.wandb.name, str(out), resolved))
    callbacks += build_observability(OmegaConf.to_object(cfg.observe), out, cp=dims.cp, eval_batches=tcfg.eval_batches,
                                     eval_callback=eval_callback)
    distillation = Distillation.from_config(OmegaConf.to_object(cfg.distill).validate(), device, model_cfg.vocab_size,
                                            mesh, pcfg.engine)
    module = TrainModule.build(model, optimizer, tcfg, ocfg, mesh=mesh, pcfg=pcfg, deepspeed=deepspeed,
                               expert_grad_divisor=layout["expert_grad_divisor"], distillation=distillation)
    checkpointer = Checkpointer(out / "checkpoints", ckcfg.keep_last, ckcfg.async_save,
                                resume_guard(meta, tcfg.resume_model_change))
    trainer = Trainer(module=module, cfg=tcfg, optim_cfg=ocfg, train_data=PackedBatches(loader), valid_data=valid,
                      checkpointer=checkpointer, checkpoint_every=ckcfg.every, callbacks=callbacks,
                      throughput=Throughput(fpt, peak, peak_kind), meta=meta)
    log.info("model %s: %s; %.3g FLOPs/token; peak %.3g FLOP/s (%s); device %s", model_cfg.name,
             json.dumps(counts), fpt, peak, peak_source, device)
    return trainer, {"out_dir": str(out), "metrics": str(out / "metrics.jsonl"), "checkpoints": str(out / "checkpoints")}


__all__ = ["build_trainer", "configure_matmul_precision", "git_revision", "pick_device", "seed_everything"]
