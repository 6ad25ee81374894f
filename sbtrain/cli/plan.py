"""``sbtrain-plan model=NAME world=N parallel.*=... trainer.*=...``: the per-rank memory of one
training step under a parallel layout, predicted on the meta device (nothing is allocated).

Prints a table (params, grads, optimizer, activations, transient, total in GiB per rank: what each
holds at its largest during the step, and the composition of the peak moment, whose total is the
prediction) and one JSON line. The layout is checked by the training run's own
``validate_parallel`` first, so a layout training would refuse is refused here with the same
message. The model: :mod:`sbtrain.plan`; its accuracy: ``benchmarks/plan_vs_measured.py``.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from sbtrain.cli.app import run_app
from sbtrain.plan import format_table, plan_memory
from sbtrain.plan.config import PlanConfig  # registers plan_schema (before Hydra composes)


def task(cfg: DictConfig) -> None:
    plan_cfg: PlanConfig = OmegaConf.to_object(cfg).validate()
    result = plan_memory(plan_cfg.model, plan_cfg.world, plan_cfg.parallel, plan_cfg.trainer, plan_cfg.device)
    layout = result.layout
    print(f"{layout['model']} on {layout['world']} ranks: dp_replicate={layout['dp_replicate']} "
          f"dp_shard={layout['dp_shard']} cp={layout['cp']} tp={layout['tp']} ep={layout['ep']} "
          f"({layout['engine']}), seq {layout['seq_len']} x micro batch {layout['micro_batch_size']}, "
          f"{layout['precision']}, activation checkpointing {layout['activation_checkpointing']}")
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(json.dumps(result.to_json()), flush=True)


def main(argv: list[str] | None = None) -> None:
    run_app(task, "plan", argv)


if __name__ == "__main__":
    main()
