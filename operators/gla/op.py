"""The op objects of gated linear attention. Backends import them from here (not from the package
``__init__``, which imports the backends: importing it from a backend would be a cycle)."""

from __future__ import annotations

from operators.gla.reference import gla_reference, gla_step_reference
from operators.registry import define_op

gla = define_op("gla", gla_reference)
gla_step = define_op("gla_step", gla_step_reference)
