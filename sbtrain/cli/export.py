"""``sbtrain-export ckpt=DIR out=DIR [tokenizer.path=DIR] [dtype=bf16]``: an sbtrain weights
directory or training checkpoint -> a Hugging Face folder loadable with ``trust_remote_code=True``
(see :mod:`sbtrain.export`). Prints one JSON line: the source, its kind and the folder written."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from sbtrain.export.hf_export import ExportError


def task(cfg: DictConfig) -> None:
    from sbtrain.export.hf_export import export, resolve_source

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise ExportError(f"{key}= is required: sbtrain-export ckpt=DIR out=DIR")
    kind, source = resolve_source(cfg.ckpt)
    out = export(cfg.ckpt, cfg.out, tokenizer=OmegaConf.select(cfg, "tokenizer.path"),
                  dtype=cfg.dtype, max_shard_bytes=int(cfg.max_shard_bytes))
    print(json.dumps({"source": str(source), "kind": kind, "out": str(out)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    from sbtrain.cli.app import run_app

    run_app(task, "export", argv)


if __name__ == "__main__":
    main()
