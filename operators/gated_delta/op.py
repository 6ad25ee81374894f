"""The op objects of the gated delta rule. Backends import them from here (not from the package
``__init__``, which imports the backends: importing it from a backend would be a cycle)."""

from __future__ import annotations

from operators.gated_delta.naive import gated_delta_reference, gated_delta_step_reference
from operators.registry import define_op

gated_delta = define_op("gated_delta", gated_delta_reference)
gated_delta_step = define_op("gated_delta_step", gated_delta_step_reference)
