"""Typed schema of ``sbtrain-bench`` (``recipes/bench.yaml``), stored in Hydra's ConfigStore as
``bench_schema`` so a mistyped key is an error, not a silent default.

One flat schema serves the three subcommands (``ttft``, ``memory``, ``decode``); a ``null``
length list or limit means "this subcommand's default" (:data:`DEFAULT_LENGTHS`,
:data:`DEFAULT_QUADRATIC_MAX`). Lengths are token counts written as ``4096``, ``"4k"`` or ``"128k"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from sbtrain import RECIPES_DIR
from sbtrain.config.model import ConfigError

SUBCOMMANDS = ("ttft", "memory", "decode")
DEFAULT_LENGTHS = {
    "ttft": ["4k", "8k", "16k", "32k", "64k", "128k"],
    "memory": ["4k", "8k", "16k", "32k", "64k", "128k"],
    "decode": ["4k", "16k", "64k", "128k"],
}
# Models with full-attention layers run only up to this length (quadratic time / memory);
# ttft extrapolates beyond it from the fitted exponent; memory and decode leave the cell empty.
DEFAULT_QUADRATIC_MAX = {"ttft": "64k", "memory": "32k", "decode": "128k"}
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
DECODE_FILL = ("synthetic", "prefill")


class BenchError(ConfigError):
    """A bench knob the benchmark cannot use (exit status 2, the message names the fix)."""


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["sb7b_tiny", "qwen2_tiny"])  # recipes/model/<name>.yaml
    baseline: str = "qwen2_tiny"  # speed-ups and FLOP ratios are against this model (must be in models)
    lengths: list[str] | None = None  # token counts ("4k", "128k", 4096); null: the subcommand's default
    model_overrides: list[str] = field(default_factory=list)  # applied to every model, e.g. [model.num_layers=2]
    repeats: int = 3  # ttft: timed prefills per point (median); decode: timed decode runs per point
    threads: int | None = None  # torch threads; null: torch's default
    out: str = "benchmarks/out"  # folder for <subcommand>.json and .png
    plot: bool = True
    seed: int = 0
    # Models with full-attention layers: measured up to here. null: 64k (ttft), 32k (memory), 128k (decode).
    quadratic_max_length: str | None = None
    single_repeat_above: str = "32k"  # ttft: full-attention models run once above this length
    fit_from: str = "16k"  # ttft: the exponent is fitted over measured lengths >= this
    fresh_process: bool = True  # memory, decode: one fresh subprocess per point (else in this process)
    activation_checkpointing: str = "full"  # memory: none | selective | full
    new_tokens: int = 32  # decode: tokens decoded per run
    decode_fill: str = "synthetic"  # decode: cache filled with random keys/values (synthetic) or a real prefill
    timeout_s: float = 7200.0  # memory, decode: per subprocess; ttft with cp > 1: the whole cp run
    # ttft: also prefill across this many gloo processes with context parallelism (each rank
    # threads // cp threads), beside the in-process prefill; 1: in-process only.
    cp: int = 1
    cp_linear: str = "allgather"  # ttft with cp > 1: linear-attention CP method, allgather (LASP-2) | scan


def parse_length(value) -> int:
    """``4096`` / ``"4096"`` / ``"4k"`` / ``"128K"`` -> tokens (k = 1024)."""
    text = str(value).strip().lower()
    try:
        n = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise BenchError(f"length {value!r} is not a token count; write e.g. 4096, 4k or 128k") from None
    if n <= 0:
        raise BenchError(f"length {value!r} must be positive")
    return n


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def validate(cfg: BenchConfig, subcommand: str) -> BenchConfig:
    if subcommand not in SUBCOMMANDS:
        raise BenchError(f"unknown subcommand {subcommand!r}; use one of {', '.join(SUBCOMMANDS)}")
    if not cfg.models:
        raise BenchError("models=[] is empty; give e.g. models=[sb7b_tiny,qwen2_tiny]")
    if subcommand == "ttft" and cfg.baseline not in cfg.models:
        raise BenchError(f"baseline={cfg.baseline} is not in models={list(cfg.models)}; add it or set baseline= "
                         "to one of them")
    if cfg.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise BenchError(f"activation_checkpointing={cfg.activation_checkpointing} is unknown; use one of "
                         f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    if cfg.decode_fill not in DECODE_FILL:
        raise BenchError(f"decode_fill={cfg.decode_fill} is unknown; use one of {', '.join(DECODE_FILL)}")
    if cfg.repeats < 1 or cfg.new_tokens < 1:
        raise BenchError(f"repeats={cfg.repeats} and new_tokens={cfg.new_tokens} must be >= 1")
    validate_cp(cfg, subcommand)
    lengths(cfg, subcommand)  # parse errors now, not after an hour of measuring
    return cfg


def validate_cp(cfg: BenchConfig, subcommand: str) -> None:
    from parallel.context_parallel import CP_LINEAR_METHODS

    if cfg.cp < 1:
        raise BenchError(f"cp={cfg.cp} must be >= 1 (the number of context-parallel prefill processes)")
    if cfg.cp_linear not in CP_LINEAR_METHODS:
        raise BenchError(f"cp_linear={cfg.cp_linear} is unknown; use one of {', '.join(CP_LINEAR_METHODS)}")
    if cfg.cp == 1:
        return
    if subcommand != "ttft":
        raise BenchError(f"cp={cfg.cp} applies to ttft only (context-parallel prefill); drop it for {subcommand}")
    bad = [format_length(T) for T in lengths(cfg, subcommand) if T % cfg.cp]
    if bad:
        raise BenchError(f"lengths {bad} are not divisible by cp={cfg.cp}: each rank holds an equal contiguous "
                         f"shard; use multiples of {cfg.cp}")


def lengths(cfg: BenchConfig, subcommand: str) -> list[int]:
    return sorted({parse_length(x) for x in (cfg.lengths if cfg.lengths is not None else DEFAULT_LENGTHS[subcommand])})


def quadratic_max(cfg: BenchConfig, subcommand: str) -> int:
    return parse_length(cfg.quadratic_max_length or DEFAULT_QUADRATIC_MAX[subcommand])


def model_names() -> list[str]:
    """The model recipes (``recipes/model/<name>.yaml``)."""
    return sorted(p.stem for p in (RECIPES_DIR / "model").glob("*.yaml"))


def model_config(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The validated ModelConfig of ``recipes/model/<name>.yaml`` with ``model.*`` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import sbtrain.config  # noqa: F401  registers the model schema

    if name not in model_names():
        raise BenchError(f"model {name!r} is not a recipe in recipes/model/ (choices: {', '.join(model_names())})")
    bad = [o for o in overrides if not str(o).startswith("model.")]
    if bad:
        raise BenchError(f"model_overrides={bad} must be model.* keys, e.g. [model.num_layers=2]")
    args = [f"model={name}", *overrides]
    try:
        if GlobalHydra.instance().is_initialized():  # inside the sbtrain-bench Hydra app
            node = compose("info", overrides=args).model
        else:
            with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
                node = compose("info", overrides=args).model
    except Exception as exc:  # Hydra's message names the bad override
        raise BenchError(f"model {name} with overrides {list(overrides)}: {exc}") from exc
    return OmegaConf.to_object(node).validate()


def register_bench_schema() -> None:
    """Store the schema as ``bench_schema`` (idempotent: ConfigStore overwrites)."""
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


register_bench_schema()
