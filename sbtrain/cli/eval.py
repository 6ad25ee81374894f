"""``sbtrain-eval <subcommand> key=value ...``: evaluation commands (see :mod:`sbtrain.eval`).

The first word picks the subcommand, before Hydra sees the rest. Each subcommand names the
function that runs it (imported only when chosen) and the recipe its overrides compose against,
so a new one (``passkey``) is one entry in :data:`SUBCOMMANDS` plus, if it needs its own knobs,
its own recipe and schema.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class Subcommand:
    target: str  # "module:function" taking the composed config
    config_name: str  # recipes/<config_name>.yaml
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "ppl": Subcommand("sbtrain.eval.ppl:run", "eval", "perplexity and bits per byte (sliding windows with stride=)"),
    "loss_by_position": Subcommand("sbtrain.eval.loss_by_position:run", "eval",
                                   "mean loss per log-spaced position bucket, JSON + PNG"),
    "lm_eval": Subcommand("sbtrain.eval.lm_eval_adapter:run", "eval",
                          "lm-evaluation-harness tasks (harness.tasks=[...]; needs lm-eval installed)"),
    "chat_loss": Subcommand("sbtrain.eval.chat_loss:run", "eval",
                            "assistant-token loss of held-out conversations (data.paths=[chats.jsonl])"),
    "passkey": Subcommand("sbtrain.eval.passkey:run", "eval_passkey",
                          "synthetic retrieval fine-tune, then passkey accuracy per length x depth (+ heatmap PNG)"),
}
USAGE = "usage: sbtrain-eval {" + "|".join(SUBCOMMANDS) + "} ckpt=DIR data.paths=[FILE] [seq_len=T] [key=value ...]"


def usage() -> str:
    lines = [USAGE, ""] + [f"  {name:<18} {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return "\n".join([*lines, "", "sbtrain-eval <subcommand> --help lists the keys."])


def resolve(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def make_task(sub: Subcommand):
    def task(cfg: DictConfig) -> object:
        return resolve(sub.target)(cfg)

    task.__name__ = sub.target.rpartition(":")[2]
    return task


def main(argv: list[str] | None = None) -> None:
    from sbtrain.cli.app import fail, run_app

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            sys.exit(2)
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        fail(f"unknown subcommand {name!r}: the first word must be one of {', '.join(SUBCOMMANDS)} "
             f"(e.g. sbtrain-eval ppl ckpt=DIR data.paths=[valid.txt])")
    import sbtrain.eval.config  # noqa: F401  registers eval_schema before Hydra composes

    importlib.import_module(SUBCOMMANDS[name].target.partition(":")[0])  # a module's own schema (passkey_schema)

    run_app(make_task(SUBCOMMANDS[name]), SUBCOMMANDS[name].config_name, rest)


if __name__ == "__main__":
    main()
