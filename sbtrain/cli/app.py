"""Shared Hydra entry for every sbtrain command.

``run_app(task, config_name)`` makes ``task(cfg)`` a Hydra app whose config dir is the recipes
folder shipped with the package (:data:`sbtrain.RECIPES_DIR`: ``recipes/`` in a checkout,
``sbtrain/recipes`` in an install). Before Hydra runs, the overrides are composed once with Hydra's compose
API; if that fails, the bad override is located and the error names it with the closest
valid keys (``model.hiden_size=3`` -> ``did you mean model.hidden_size?``) or config choices
(``model=sb7x`` -> ``sb7b``), then exits with status 2. An error of the project's own kinds raised
by the task is printed as one ``error: ...`` line without a traceback: a :class:`ConfigError` or a
subclass (bad input: WeightsError, DataError, ConversionError, ...; status 2), a CheckpointError or
NonFiniteLossError (status 1). ``SBTRAIN_DEBUG=1`` prints the traceback above that line as well.
Any other exception is a bug and keeps Hydra's report with its traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

import sbtrain.config  # noqa: F401  registers the schemas in Hydra's ConfigStore
from sbtrain import RECIPES_DIR
from sbtrain.config.model import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_RUN_ERROR = 1  # a checkpoint that cannot be used, a run that diverged: not the overrides' fault
DEBUG_ENV = "SBTRAIN_DEBUG"


def dotted_keys(node, prefix: str = "") -> list[str]:
    """Every key path of a config (``model``, ``model.moe``, ``model.moe.top_k``, ...)."""
    keys: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            keys.append(path)
            keys.extend(dotted_keys(value, path))
    return keys


def group_options(group: str) -> list[str]:
    folder = RECIPES_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def suggest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    candidates = list(candidates)
    parent, _, leaf = word.rpartition(".")
    # A key put in the wrong group ("trainer.lr"): the same name in every other group, shallowest first.
    moved = sorted((c for c in candidates if c != word and c.rpartition(".")[2] == leaf), key=lambda c: (c.count("."), c))
    if moved:
        return moved[:n]
    close = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    if close:
        return close
    # Compare the last component only: "trainer.max_stepz" vs keys under "trainer" ...
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    leaves = difflib.get_close_matches(leaf, [c.rpartition(".")[2] for c in siblings], n=n, cutoff=0.5)
    if leaves:
        return [f"{parent}.{leaf_}" if parent else leaf_ for leaf_ in leaves]
    # ... then against every group's names ("trainer.warmup_step" -> "optim.warmup_steps").
    by_leaf: dict[str, list[str]] = {}
    for c in candidates:
        by_leaf.setdefault(c.rpartition(".")[2], []).append(c)
    found = difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75)
    return [c for name in found for c in sorted(by_leaf[name], key=lambda c: (c.count("."), c))][:n]


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    return compose(config_name=config_name, overrides=overrides)


def explain_override_error(config_name: str, overrides: list[str], error: Exception) -> str:
    """Find the first override that breaks composition and say what is wrong with it."""
    parser = OverridesParser.create()
    for i in range(len(overrides)):
        try:
            _compose(config_name, overrides[: i + 1])
            continue
        except Exception as exc:  # noqa: BLE001 - any failure points at override i
            failure = exc
        bad = overrides[i]
        try:
            parsed = parser.parse_override(bad)
        except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message says it best
            return f"cannot parse override {bad!r}: {failure}"
        key = parsed.key_or_group
        value = parsed.value() if not parsed.is_sweep_override() else None
        options = group_options(key)
        if options and isinstance(value, str):
            hint = suggest(value, options) or options
            return (f"{key}={value} is not a known {key} config; did you mean {' or '.join(hint)}? "
                    f"(choices: {', '.join(options)})")
        base = OmegaConf.to_container(_compose(config_name, overrides[:i]), resolve=False)
        keys = dotted_keys(base)
        if key not in keys:
            hint = suggest(key, keys)
            tip = f"did you mean {' or '.join(hint)}?" if hint else f"valid keys start with: {', '.join(base)}"
            return f"unknown config key {key!r} in override {bad!r}; {tip}"
        return f"override {bad!r} is invalid: {failure}"
    return f"config {config_name!r} does not compose: {error}"


def _overrides_from_argv(argv: list[str]) -> list[str] | None:
    """The key=value overrides in argv, or None when argv asks Hydra for something else (help,
    multirun sweeps, another config) and the pre-check should stay out of the way."""
    flags_with_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                        "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--help", "-h", "--hydra-help", "--multirun", "-m", "--shell-completion", "-sc"):
            return None
        if arg.split("=")[0] in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"):
            return None
        if arg in flags_with_value:
            skip = arg not in ("--info", "-i")  # --info takes an optional value
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides


def precheck(config_name: str, argv: list[str]) -> str | None:
    """None when the overrides compose; else a message naming the bad override."""
    overrides = _overrides_from_argv(argv)
    if overrides is None:
        return None
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        try:
            _compose(config_name, overrides)
            return None
        except Exception as exc:  # noqa: BLE001 - explain every composition failure
            return explain_override_error(config_name, overrides, exc)


def fail(message: str, code: int = EXIT_CONFIG_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_code(exc: BaseException) -> int | None:
    """The status for an error whose message already says what to do; None for anything else."""
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG_ERROR
    # Imported here: the checkpoint and trainer modules are heavy, and only a failing run needs them.
    from sbtrain.trainer.checkpoint import CheckpointError
    from sbtrain.trainer.trainer import NonFiniteLossError

    return EXIT_RUN_ERROR if isinstance(exc, (CheckpointError, NonFiniteLossError)) else None


def run_app(task: Callable[[DictConfig], object], config_name: str, argv: list[str] | None = None) -> None:
    """Run ``task`` as a Hydra app over ``recipes/<config_name>.yaml`` with friendly errors."""
    argv = sys.argv[1:] if argv is None else argv
    message = precheck(config_name, argv)
    GlobalHydra.instance().clear()
    if message:
        fail(message)

    def guarded(cfg: DictConfig) -> object:
        try:
            return task(cfg)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise  # a bug: Hydra's report, traceback included
            if debugging():
                traceback.print_exc()
            fail(str(exc), code)

    guarded.__name__ = getattr(task, "__name__", "task")
    main = hydra.main(config_path=str(RECIPES_DIR), config_name=config_name, version_base="1.3")(guarded)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # hydra.main reads sys.argv
    try:
        main()
    finally:
        sys.argv = saved
