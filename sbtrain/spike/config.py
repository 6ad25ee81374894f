"""Typed schema of ``sbtrain-spike stats|sweep`` (recipes/spike.yaml), stored in Hydra's ConfigStore
as ``spike_schema`` so a typo in an override is an error.

``validate`` checks every value before a model is loaded; the unsigned codings (binary,
bitwise_pure) are refused as the report's coding because spike counts of linear inputs are signed
(the statistics still list them measured on ``|s|``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sbtrain.config.model import ConfigError
from sbtrain.spike.codings import CODINGS, SIGNED_CODINGS

COMMANDS = ("stats", "sweep")
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class SpikeDataConfig:
    """Where the validation tokens come from: one dataset directory built by ``sbtrain-data``."""

    path: str = MISSING  # <dir> with data.bin / data.idx / manifest.json
    # 0: read the whole dataset (packed in the loader's seeded order); > 0: the held-out split the trainer
    # evaluates on with the same valid_fraction and split_seed (documents in fixed order, last row padded).
    valid_fraction: float = 0.0
    split_seed: int = 4321
    seed: int = 1234


@dataclass
class SpikeCommandConfig:
    command: str = "stats"  # stats | sweep (the first word on the command line: sbtrain-spike stats ...)
    ckpt: str = MISSING  # a weights directory (config.yaml + safetensors) or a training checkpoint
    out: str = "runs/spike"  # report.json, the table and the PNG go here
    data: SpikeDataConfig = field(default_factory=SpikeDataConfig)
    k: float = 3.0  # stats: V_th = mean(|x|) / k
    ks: list[float] = field(default_factory=lambda: [2.0, 2.5, 3.0, 3.5, 4.0])  # sweep: the k values
    coding: str = "bitwise_bidirectional"  # the coding whose spikes the energy estimate counts
    max_count: int | None = None  # clamp counts to [-max_count, max_count] (None: the model's setting)
    spike_down_proj: bool | None = None  # also spike the FFN down_proj input (None: the model's setting)
    window: int = 3  # time steps of the "N-step window" sparsity readings
    eval_samples: int = 64  # sequences of seq_len tokens read
    seq_len: int = 512
    micro_batch_size: int = 4
    device: str = "cpu"  # cpu | cuda | auto
    plot: bool = True  # the PNG (histogram of |s| for stats, sparsity and loss vs k for sweep)

    def validate(self) -> SpikeCommandConfig:
        if self.command not in COMMANDS:
            raise ConfigError(f"command={self.command!r} is unknown; use one of {COMMANDS} (sbtrain-spike stats ...)")
        if self.coding not in CODINGS:
            raise ConfigError(f"coding={self.coding!r} is unknown; use one of {tuple(CODINGS)}")
        if self.coding not in SIGNED_CODINGS:
            raise ConfigError(
                f"coding={self.coding} needs non-negative counts, but spike counts of linear inputs are signed "
                f"(s = round(x / V_th) keeps the sign of x); use coding= one of {SIGNED_CODINGS} (the report still "
                f"lists {self.coding} measured on |s| with the sign sent separately, as {self.coding}_abs)"
            )
        if not self.k > 0:
            raise ConfigError(f"k={self.k} must be positive (V_th = mean(|x|) / k; the report uses 3)")
        if self.command == "sweep" and (not self.ks or any(not k > 0 for k in self.ks)):
            raise ConfigError(f"ks={list(self.ks)} must be a non-empty list of positive k values, e.g. ks=[2,3,4]")
        if self.max_count is not None and self.max_count < 1:
            raise ConfigError(f"max_count={self.max_count} must be >= 1, or null (the model's setting)")
        for name in ("window", "eval_samples", "seq_len", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.data.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction={self.data.valid_fraction} must be in [0, 1) (0: the whole set)")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is unknown; use one of {DEVICES}")
        return self


def register_spike_schema() -> None:
    """Store the schema (idempotent: ConfigStore overwrites)."""
    ConfigStore.instance().store(name="spike_schema", node=SpikeCommandConfig)


register_spike_schema()

__all__ = ["COMMANDS", "SpikeCommandConfig", "SpikeDataConfig", "register_spike_schema"]
