"""``sbtrain-convert from_hf=DIR target=sb7b|sb76b out=DIR [key=value ...]``: convert a local HF
Qwen2 / Llama / Mistral folder into an sbtrain weights directory (see :mod:`sbtrain.convert`)
and print one JSON line: where it went, the layer kinds, the window, the upcycling scale."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sbtrain.config.model import ConfigError
from sbtrain.convert.config import ConvertConfig  # registers convert_schema before Hydra composes


def task(cfg: DictConfig) -> None:
    from sbtrain.convert.hf_import import convert_hf

    try:
        convert_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConvertConfig), cfg))
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} is required: sbtrain-convert from_hf=DIR target=sb7b|sb76b out=DIR") from exc
    out = convert_hf(convert_cfg)
    provenance = json.loads((out / "provenance.json").read_text())
    summary = {k: provenance[k] for k in ("source", "target", "dtype", "window", "layer_types", "upcycle")}
    summary["out"] = str(out)
    print(json.dumps(summary), flush=True)


def main() -> None:
    from sbtrain.cli.app import run_app

    run_app(task, "convert")


if __name__ == "__main__":
    main()
