"""``sbtrain-bench ttft|memory|decode [key=value ...]``: the inference and memory benchmarks
(:mod:`sbtrain.bench`). The first positional word picks the benchmark and is taken off argv
before Hydra sees it; the rest are overrides of ``recipes/bench.yaml`` (schema
:class:`sbtrain.bench.config.BenchConfig`). Each writes a table to stdout and
``<out>/<subcommand>.json`` + ``.png``."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from sbtrain.bench.config import SUBCOMMANDS, BenchConfig, BenchError, validate

USAGE = "usage: sbtrain-bench {" + "|".join(SUBCOMMANDS) + "} [key=value ...]   (e.g. sbtrain-bench ttft lengths=[4k,16k])"


def task(cfg: DictConfig, subcommand: str) -> dict:
    import torch

    bench_cfg = validate(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig), cfg)), subcommand)
    if bench_cfg.threads:
        torch.set_num_threads(bench_cfg.threads)
    if subcommand == "ttft":
        from sbtrain.bench import ttft as bench
    elif subcommand == "memory":
        from sbtrain.bench import memory as bench
    else:
        from sbtrain.bench import decode as bench
    return bench.run(bench_cfg)


def split_subcommand(argv: list[str]) -> tuple[str, list[str]]:
    """``["ttft", "repeats=1"]`` -> ``("ttft", ["repeats=1"])``; a missing or unknown word is an error."""
    if not argv or argv[0] in ("-h", "--help"):
        raise BenchError(f"{USAGE}\n  ttft: prefill time vs prompt length; memory: training peak memory and "
                         "decode-cache bytes vs length; decode: decode memory and tokens/s vs context")
    word = argv[0]
    if word not in SUBCOMMANDS:
        raise BenchError(f"unknown benchmark {word!r}; the first word must be one of {', '.join(SUBCOMMANDS)}\n{USAGE}")
    return word, argv[1:]


def main(argv: list[str] | None = None) -> None:
    from sbtrain.cli.app import fail, run_app

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        subcommand, rest = split_subcommand(argv)
    except BenchError as exc:
        fail(str(exc))
    run_app(lambda cfg: task(cfg, subcommand), "bench", rest)


if __name__ == "__main__":
    main()
