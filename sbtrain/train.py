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
from sbtrain.eval.callback import EvalCallback
from sbtrain.models.build import to_model_config
from sbtrain.trainer.callbacks import ConsoleProgress, JSONLMetrics, WandbLogger, plot_loss_curve
from sbtrain.trainer.checkpoint import Checkpointer
from sbtrain.trainer.distributed import build_parallel_model, init_process_group, make_mesh, report_collective_timeouts
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
    ocfg = OmegaConf.to_object(cfg.optim).validate()  # a bad lr / beta is named here, not by torch's AdamW
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
                                dp_rank=mesh.dp_rank if mesh else 0, dp_size=dims.dp, max_steps=tcfg.max_steps)
    valid = PackedBatches(loader, tcfg.eval_batches * tcfg.micro_batch_size or None) if data_cfg.valid_fraction else None

    # On a mesh (FSDP engine): built on meta, sharded, each rank materialising, initialising and
    # loading (init_from) only its shards; alone or with DeepSpeed, a full build. Same weights.
    model, layout, counts = build_parallel_model(model_cfg, mesh, pcfg, tcfg, device, init_from=tcfg.init_from)
    if tcfg.init_from:
        log.info("initialised from %s", tcfg.init_from)
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
                                     eval_callback=EvalCallback)
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
        valid_data=valid, checkpointer=Checkpointer(out / "checkpoints", ckcfg.keep_last, ckcfg.async_save,
                                                      resume_guard(meta, tcfg.resume_model_change)),
        checkpoint_every=ckcfg.every, callbacks=callbacks, flops_per_token=fpt, peak_flops=peak, peak_kind=peak_kind, meta=meta,
        mesh=mesh, cp_linear=pcfg.cp_linear, engine=engine, teacher=teacher, distill_cfg=dcfg,
        expert_grad_divisor=layout["expert_grad_divisor"], grad_sync=pcfg.grad_sync,
    )
    log.info("model %s: %s; %.3g FLOPs/token; peak %.3g FLOP/s (%s); device %s", model_cfg.name,
             json.dumps(counts), fpt, peak, peak_source, device)
    return trainer, {"out_dir": str(out), "metrics": str(out / "metrics.jsonl"), "checkpoints": str(out / "checkpoints")}


# Model fields that do not change what the weights mean (how a run trains, or how new weights
# would be initialised): a resume may change them without trainer.resume_model_change=allow.
RESUME_FREE_MODEL_FIELDS = ("name", "document_masking", "spike", "init_std", "moe.aux_loss_coef", "moe.z_loss_coef",
                            "moe.aux_free_update_rate", "moe.capacity_factor")


def dataset_tokenizers(datasets: list[str]) -> list[str]:
    """The sha256 of the tokenizer(s) the built datasets were tokenized with (their manifests)."""
    from sbtrain.data.build import read_manifest

    found = set()
    for directory in datasets:
        try:
            found.add(read_manifest(directory)["tokenizer"]["sha256"])
        except (ConfigError, OSError, KeyError, TypeError, ValueError):
            continue  # built elsewhere (no manifest) or moved away: nothing to compare
    return sorted(found)


def _leaves(tree: dict, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


_ABSENT = object()  # a key one side does not have (another sbtrain version), unlike a null value


def _show(value) -> str:
    if isinstance(value, (list, tuple)):  # in full: where two layer patterns differ may be anywhere
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return "absent" if value is _ABSENT else "null" if value is None else str(value)


def _checkpoint_model(meta: dict) -> dict | None:
    """The model a checkpoint holds: its ``model_config``, or (checkpoints written before it was
    recorded) rebuilt from its run config; None when that is no longer possible."""
    if "model_config" in meta:
        return meta["model_config"]
    from sbtrain.models.weights import load_config

    config = meta.get("config") or {}
    try:
        init_from = (config.get("trainer") or {}).get("init_from")
        model_cfg = load_config(init_from) if init_from else to_model_config(config["model"])
    except (ConfigError, KeyError, TypeError) as exc:
        log.warning("cannot tell which model the checkpoint holds (%s): its architecture is not compared", exc)
        return None
    return OmegaConf.to_container(OmegaConf.structured(model_cfg))


def resume_differences(checkpoint_meta: dict, run_meta: dict) -> list[str]:
    """``key: checkpoint X vs this run Y`` for every model key (but RESUME_FREE_MODEL_FIELDS) and
    the tokenizer that differ between a checkpoint and the run that would resume it."""
    lines = []
    theirs = _checkpoint_model(checkpoint_meta)
    if theirs is not None:
        a, b = _leaves(theirs, "model."), _leaves(run_meta["model_config"], "model.")
        free = tuple(f"model.{f}" for f in RESUME_FREE_MODEL_FIELDS)
        for key in sorted(set(a) | set(b)):
            old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
            if not (key in free or key.startswith(tuple(f + "." for f in free))) and old != new:
                lines.append(f"{key}: checkpoint {_show(old)} vs this run {_show(new)}")
    old = checkpoint_meta.get("tokenizer")
    if old is None:  # written before the tokenizer was recorded: the datasets it names, if still there
        old = dataset_tokenizers(((checkpoint_meta.get("config") or {}).get("data") or {}).get("datasets") or [])
    new = run_meta.get("tokenizer") or []
    if old and new and old != new:
        lines.append(f"tokenizer: checkpoint {', '.join(h[:12] for h in old)} (sha256 of the data's tokenizer) "
                     f"vs this run {', '.join(h[:12] for h in new)}")
    return lines


def resume_guard(run_meta: dict, policy: str):
    """The Checkpointer's ``check_meta``: refuse (before any tensor is loaded or any file of the run is
    written) a checkpoint of another model, tokenizer or vocabulary, unless ``policy`` is allow."""

    def check(path: Path, checkpoint_meta: dict) -> None:
        differences = resume_differences(checkpoint_meta, run_meta)
        if not differences:
            return
        if policy == "allow":
            log.warning("resuming %s with a changed model (trainer.resume_model_change=allow): %s", path,
                        "; ".join(differences))
            return
        raise ConfigError(
            f"the checkpoint to resume, {path}, is of another model than this run: {'; '.join(differences)}. "
            "Nothing was loaded or written. Continue it with the settings it was trained with (its meta.json holds "
            "them), start a new run in another trainer.out_dir, or pass trainer.resume_model_change=allow to resume "
            "it into this model on purpose (every tensor this model needs must be in the checkpoint)")

    return check


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
    trainer, paths = build_trainer(cfg)
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
