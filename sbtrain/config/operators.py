"""Typed schema of the operator choices (``operators.*`` in ``sbtrain.train``).

Two tables a recipe may edit, applied through the operators layer's own API (``operators``
never imports ``sbtrain``):

- ``operators.overrides``: ``{op: backend}`` forces a backend per op, e.g.
  ``operators.overrides={gla: naive, attention: flash_attn}`` (``naive`` = ``reference``).
  Forcing is strict: a backend that is unavailable or declines a call is an error, never a
  silent fallback. ``SBTRAIN_OPS=op:backend`` in the environment wins over this table.
- ``operators.maca.<op>.<knob>``: the MetaX tuning limits of the ``fla_maca`` backend
  (``operators/maca.py``: block sizes, warps of 64 lanes, stages), e.g.
  ``operators.maca.gla.num_warps=2``; unset knobs keep the table's defaults.

Unknown op, backend or knob names raise :class:`ConfigError` naming the choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass, make_dataclass
from typing import Optional

from operators import ops
from sbtrain.config.model import ConfigError


@dataclass
class FlaTuningConfig:
    """Upper bounds for fla's autotune candidates on MetaX (null: the operators table's default)."""

    block_k: int | None = None  # BK: key-dim block
    block_v: int | None = None  # BV: value-dim block
    num_warps: int | None = None  # warps of 64 lanes per program
    num_stages: int | None = None  # software-pipeline stages


@dataclass
class MacaConfig:
    gla: FlaTuningConfig = field(default_factory=FlaTuningConfig)  # fla chunk_gla (training, prefill)
    gla_step: FlaTuningConfig = field(default_factory=FlaTuningConfig)  # fla fused_recurrent_gla (decode)


# One field per registered op, built from the registry (a typo in an op name is a Hydra error, and a
# new op folder needs no line here); the value is a backend name of that op, checked against the
# registry when applied; null: the registry's own choice.
OverridesConfig = make_dataclass(
    "OverridesConfig", [(op, Optional[str], field(default=None)) for op in sorted(ops.OPS)])  # noqa: UP045


@dataclass
class OperatorsConfig:
    overrides: OverridesConfig = field(default_factory=OverridesConfig)  # op -> backend, forced
    maca: MacaConfig = field(default_factory=MacaConfig)

    def tuning(self) -> dict[str, dict[str, int]]:
        """The MetaX knobs the recipe sets (unset ones left out)."""
        table = asdict(self.maca) if not isinstance(self.maca, dict) else dict(self.maca)
        return {op: {k: v for k, v in (knobs or {}).items() if v is not None} for op, knobs in table.items()}

    def apply(self) -> OperatorsConfig:
        """Validate both tables and install them in the operators layer (process-wide)."""
        from operators import maca, registry

        try:
            maca.merge_tuning(self.tuning())  # both tables checked before either is installed
            table = asdict(self.overrides) if is_dataclass(self.overrides) else dict(self.overrides)
            registry.set_overrides({op: b for op, b in table.items() if b is not None})
            maca.set_tuning(self.tuning())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self
