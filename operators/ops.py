"""The op table. Each op is defined by its reference; backends register themselves on import
of their module (listed at the bottom), so adding a backend is one module plus one import."""

from __future__ import annotations

from operators.attention.reference import attention_reference
from operators.cross_entropy import linear_cross_entropy_reference
from operators.elementwise import rms_norm_reference, rotary_reference, swiglu_reference
from operators.gla.reference import gla_reference, gla_step_reference
from operators.grouped_mm import grouped_mm_reference
from operators.registry import define_op

gla = define_op("gla", gla_reference)
gla_step = define_op("gla_step", gla_step_reference)
attention = define_op("attention", attention_reference)
rms_norm = define_op("rms_norm", rms_norm_reference)
swiglu = define_op("swiglu", swiglu_reference)
rotary = define_op("rotary", rotary_reference)
grouped_mm = define_op("grouped_mm", grouped_mm_reference)
linear_cross_entropy = define_op("linear_cross_entropy", linear_cross_entropy_reference)
# Backends register on import (keep this list in step with docs/ARCHITECTURE.md).
from operators import backends  # noqa: F401
from operators.spike import spike  # noqa: F401  defines op "spike" (its reference lives there)
