"""``sbtrain-data``: raw text -> ``<data.output>/data.bin|.idx`` + ``manifest.json``.

``build_dataset(cfg)`` is the whole command as a plain function (tests and other code call it);
``main`` only wraps it in the shared Hydra app over ``recipes/build_data.yaml``.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from sbtrain.config.data import DataConfig, TokenizerConfig  # also registers the schemas


def _as(node, cls):
    """The typed config of a node (DictConfig or plain dict; nested sections such as ``data.chat`` too)."""
    if isinstance(node, cls):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))


def build_dataset(cfg) -> dict:
    """Build the dataset described by ``cfg.data`` / ``cfg.tokenizer``; returns the manifest."""
    from sbtrain.data.build import build_indexed_dataset

    data = _as(cfg.data if hasattr(cfg, "data") else cfg["data"], DataConfig)
    tokenizer = _as(cfg.tokenizer if hasattr(cfg, "tokenizer") else cfg["tokenizer"], TokenizerConfig)
    return build_indexed_dataset(data, tokenizer)


def task(cfg: DictConfig) -> None:
    manifest = build_dataset(cfg)
    summary = {k: manifest[k] for k in ("num_documents", "num_tokens", "max_token_id", "dtype", "skipped")}
    # What the input checks let through (each also logged as a warning while building): printed, not only filed.
    if manifest["bad_records"]["malformed_records"] or manifest["bad_records"]["empty_files"]:
        summary["bad_records"] = manifest["bad_records"]
    if manifest["invalid_utf8"]["replaced_bytes"]:
        summary["invalid_utf8"] = {k: manifest["invalid_utf8"][k] for k in ("replaced_lines", "replaced_bytes")}
    if "loss_mask" in manifest:  # chat: how many tokens carry loss, and the records skipped
        summary["loss_mask"] = {k: manifest["loss_mask"][k] for k in ("loss_on", "template", "trained_tokens")}
    summary["output"] = OmegaConf.select(cfg, "data.output")
    summary["tokenizer"] = manifest["tokenizer"]["path"]
    print(json.dumps(summary), flush=True)


def main() -> None:
    from sbtrain.cli.app import run_app

    run_app(task, "build_data")


if __name__ == "__main__":
    main()
