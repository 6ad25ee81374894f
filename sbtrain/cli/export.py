"""``sbtrain-export ckpt=DIR out=DIR [format=hf|w8aspike] [w8a.method=absmax|mse] [w8a.k=3]
[tokenizer.path=DIR] [dtype=bf16]``: an sbtrain weights directory or training checkpoint -> a
Hugging Face folder loadable with ``trust_remote_code=True`` (see :mod:`sbtrain.export`);
``format=w8aspike`` writes int8 weights + spike activations (:mod:`sbtrain.export.w8aspike_export`).
Prints one JSON line: the source, its kind, the format and the folder written."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from sbtrain.export.config import ExportConfig  # noqa: F401  registers export_schema before Hydra composes
from sbtrain.export.hf_export import ExportError


def task(cfg: DictConfig) -> None:
    from sbtrain.export.hf_export import export, resolve_source

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ExportError(f"{key}= is required: sbtrain-export ckpt=DIR out=DIR")
    out = export(cfg.ckpt, cfg.out, tokenizer=OmegaConf.select(cfg, "tokenizer.path"),
                 dtype=cfg.dtype, max_shard_bytes=int(cfg.max_shard_bytes), format=cfg.format, w8a=cfg.w8a)
    kind, source = resolve_source(cfg.ckpt)
    print(json.dumps({"source": str(source), "kind": kind, "format": cfg.format, "out": str(out)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    from sbtrain.cli.app import run_app

    run_app(task, "export", argv)


if __name__ == "__main__":
    main()
