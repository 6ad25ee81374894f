"""The op object of causal softmax attention. Backends import it from here (not from the package
``__init__``, which imports the backends: importing it from a backend would be a cycle)."""

from __future__ import annotations

from operators.attention.reference import attention_reference
from operators.registry import define_op

attention = define_op("attention", attention_reference)
