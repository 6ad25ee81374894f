"""``sbtrain-info model=NAME``: build the model on the meta device and print one JSON line with
its sizes, layer pattern and MoE summary."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from sbtrain.cli.app import run_app
from sbtrain.models.build import build_model, count_parameters
from sbtrain.models.ffn import layer_ffns
from sbtrain.models.mixers import layer_mixers


def model_info(model_cfg) -> dict:
    model = build_model(model_cfg, device="meta")
    cfg = model.config
    kinds = cfg.layer_types()
    info = {"model": cfg.name, **count_parameters(model), "layer_pattern": kinds}
    for kind in dict.fromkeys(layer_mixers(cfg)):  # each kind present adds what it wants shown
        info.update(kind.info(cfg))
    for ffn in dict.fromkeys(layer_ffns(cfg)):
        info.update(ffn.info(cfg))
    info.setdefault("moe", None)  # the key is always there: null for a model without experts
    return info


def task(cfg: DictConfig) -> None:
    print(json.dumps(model_info(cfg.model)), flush=True)


def main() -> None:
    run_app(task, "info")


if __name__ == "__main__":
    main()
