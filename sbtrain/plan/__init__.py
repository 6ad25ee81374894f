"""``sbtrain-plan``: per-rank training memory of a model under a parallel layout, computed on the
meta device (nothing allocated). See :func:`sbtrain.plan.memory.plan_memory`."""

from sbtrain.plan.memory import MemoryPlan, format_table, plan_memory

__all__ = ["MemoryPlan", "format_table", "plan_memory"]
