"""``sbtrain-info model=NAME``: build the model on the meta device and print one JSON line with
its sizes, layer pattern and MoE summary."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from sbtrain.cli.app import run_app
from sbtrain.models.build import build_model, count_parameters
from sbtrain.models.mixers import layer_mixers


def model_info(model_cfg) -> dict:
    model = build_model(model_cfg, device="meta")
    cfg = model.config
    kinds = cfg.layer_types()
    info = {"model": cfg.name, **count_parameters(model), "layer_pattern": kinds}
    for kind in dict.fromkeys(layer_mixers(cfg)):  # each kind present adds what it wants shown
        info.update(kind.info(cfg))
    moe = cfg.moe
    if moe.num_experts:
        info["moe"] = {
            "num_experts": moe.num_experts,
            "top_k": moe.top_k,
            "num_shared_experts": moe.num_shared_experts,
            "expert_intermediate_size": moe.expert_intermediate_size or cfg.intermediate_size,
            "moe_layers": [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)],
            "dense_layers": sorted(moe.dense_layers),
            "router_activation": moe.router_activation,
            "capacity_factor": moe.capacity_factor,
        }
    else:
        info["moe"] = None
    return info


def task(cfg: DictConfig) -> None:
    print(json.dumps(model_info(cfg.model)), flush=True)


def main() -> None:
    run_app(task, "info")


if __name__ == "__main__":
    main()
