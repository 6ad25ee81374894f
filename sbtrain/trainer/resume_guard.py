"""Refuse to resume a checkpoint of another model or tokenizer (``trainer.resume_model_change``).

The Checkpointer calls :func:`resume_guard`'s check with a checkpoint's meta before any tensor is
loaded or any file of the run is written; the run's meta says which model was actually built
(``init_from``'s, not the recipe's) and which tokenizer the data was made with.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sbtrain.config.model import ConfigError
from sbtrain.trainer.init_from import checkpoint_model

log = logging.getLogger("sbtrain.train")


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


def resume_differences(checkpoint_meta: dict, run_meta: dict) -> list[str]:
    """``key: checkpoint X vs this run Y`` for every model key (but RESUME_FREE_MODEL_FIELDS) and
    the tokenizer that differ between a checkpoint and the run that would resume it."""
    lines = []
    theirs = checkpoint_model(checkpoint_meta)
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


__all__ = ["RESUME_FREE_MODEL_FIELDS", "dataset_tokenizers", "resume_differences", "resume_guard"]
