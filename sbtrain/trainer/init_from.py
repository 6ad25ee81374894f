"""``trainer.init_from``: the weights a run starts from.

Either a *weights directory* (``config.yaml`` + safetensors: ``sbtrain-convert`` output,
``save_weights``) or a *training checkpoint* — one ``step_XXXXXXXX`` directory, a run's
``checkpoints/`` or its ``out_dir`` (the newest intact step). Only the model comes along: the
optimizer, the data position and the step count start fresh, which is what a new phase such as
SFT after continual pretraining wants (a ``stage_plan`` is the way to carry them over).

The architecture is the source's own (its ``config.yaml``, or the checkpoint's recorded
``model_config``), and the tensors are read shard by shard into whatever layout the new run has
(``load_into`` reads safetensors slices; DCP reshards a training checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from sbtrain.config.model import ConfigError, ModelConfig
from sbtrain.models.build import to_model_config
from sbtrain.models.weights import CONFIG, load_config, load_into
from sbtrain.trainer.checkpoint import STEP_DIR, Checkpointer, verify

log = logging.getLogger("sbtrain.train")


def resolve(path: str | Path, knob: str = "trainer.init_from") -> tuple[str, Path]:
    """``("weights", dir)`` or ``("training", step_dir)`` for what ``path`` names (``knob``: the setting
    that named it, for the messages: ``ckpt`` for export, generate and eval)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{knob}={path} is not a directory; give a weights directory (with {CONFIG}) "
                          "or a training checkpoint (checkpoints/step_XXXXXXXX, a run's checkpoints/ or out_dir)")
    # A run's out_dir also holds a config.yaml (the whole run config): its checkpoints/ decide.
    if (path / CONFIG).is_file() and not (path / "checkpoints").is_dir():
        return "weights", path
    if STEP_DIR.match(path.name) and (path / "meta.json").is_file():
        reason = verify(path)
        if reason is not None:
            raise ConfigError(f"{knob}={path} is a damaged training checkpoint: {reason}; "
                              "give an earlier step")
        return "training", path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    candidates = Checkpointer(path).candidates()
    for candidate in candidates:
        if verify(candidate) is None:
            return "training", candidate
    if candidates:
        raise ConfigError(f"{knob}={path}: none of its checkpoints {[c.name for c in candidates]} is intact")
    raise ConfigError(f"{knob}={path} is neither an sbtrain weights directory (no {CONFIG}) nor a training "
                      "checkpoint (no step_XXXXXXXX/meta.json, no checkpoints/ with a latest)")


def model_config(path: str | Path, knob: str = "trainer.init_from") -> ModelConfig:
    """The architecture of the model stored at ``path``: a weights directory's config, or what a
    checkpoint's run actually built (its recorded ``model_config``: a converted model's, not the recipe's)."""
    kind, where = resolve(path, knob)
    if kind == "weights":
        return load_config(where)
    meta = json.loads((where / "meta.json").read_text())
    node = checkpoint_model(meta)
    if node is None:
        raise ConfigError(f"{where}/meta.json does not say which model it holds (no model_config, no config.model)")
    return to_model_config(node)


def checkpoint_model(meta: dict) -> dict | None:
    """The model a checkpoint holds: its ``model_config``, or (checkpoints written before it was
    recorded) rebuilt from its run config; None when that is no longer possible."""
    if "model_config" in meta:
        return meta["model_config"]
    config = meta.get("config") or {}
    try:
        init_from = (config.get("trainer") or {}).get("init_from")
        model_cfg = model_config(init_from) if init_from else to_model_config(config["model"])
    except (ConfigError, KeyError, TypeError) as exc:
        log.warning("cannot tell which model the checkpoint holds (%s): its architecture is not compared", exc)
        return None
    return OmegaConf.to_container(OmegaConf.structured(model_cfg))


def load_weights(model: torch.nn.Module, path: str | Path, knob: str = "trainer.init_from") -> None:
    """Overwrite every tensor of ``model`` (plain or sharded) with the ones stored at ``path``."""
    kind, where = resolve(path, knob)
    if kind == "weights":
        load_into(model, where)
        return
    state = get_model_state_dict(model)  # DTensor shards under FSDP / TP / EP: DCP reads only those
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # a tied alias: the embedding's tensor carries it
    loaded = {"model": state}
    Checkpointer(where.parent).load(loaded, where)  # verified, then read in place
    set_model_state_dict(model, loaded["model"], options=_partial())
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def run_data_manifest(step_dir: str | Path) -> dict | None:
    """The manifest of the first dataset a training checkpoint's run read (its tokenizer, and for
    SFT data the chat template); None for a weights directory, or when the data has moved away."""
    try:
        config = json.loads((Path(step_dir) / "meta.json").read_text())["config"]
        return json.loads((Path(config["data"]["datasets"][0]) / "manifest.json").read_text())
    except (KeyError, IndexError, TypeError, ValueError, OSError):
        return None


def _partial():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # the tied head alias may be left out


__all__ = ["checkpoint_model", "load_weights", "model_config", "resolve", "run_data_manifest"]
