"""The memory planner: pick, per decoder layer and module kind, what to keep, offload or
recompute so that activation memory fits a budget at the least step time.

- :func:`plan_memory` (``memory_plan.py``): measure a model, solve, return a
  :class:`MemoryPlan` (``apply()``, ``describe()``, predictions);
- ``modules.py``: finding the layers, module kinds, the recompute wrappers;
- ``measure.py``: saved bytes per layer/kind, times, bandwidth;
- ``solve.py``: the cost model and the search (pure Python);
- ``stack.py``: the planner of the synthetic benchmark stacks (uniform expert layers).
"""
from .memory_plan import (MemoryPlan, PlanHandle, calibrate_offload, calibrate_recompute,
                          make_plan, measure_model, plan_memory)
from .modules import KINDS, RECOMPUTE_OPTIONS, find_layers, use_our_experts
from .solve import OFFLOAD_LEVELS, Choice, ModelFigures, Prediction

__all__ = ["plan_memory", "MemoryPlan", "PlanHandle", "measure_model", "make_plan",
           "calibrate_offload", "calibrate_recompute", "KINDS",
           "RECOMPUTE_OPTIONS", "OFFLOAD_LEVELS", "find_layers", "use_our_experts", "Choice",
           "ModelFigures", "Prediction"]
