"""The memory planner: pick, per decoder layer and module kind, what to keep, offload or
recompute so that activation memory fits a budget at the least step time.

- :func:`fit` (``fit.py``): size a plan to the device in one call: parameters, gradients,
  optimizer state and the allocator's reserve come off the device's memory, the rest is the
  activation peak's budget;
- :func:`plan_memory` (``memory_plan.py``): measure a model, solve for a peak budget, return a
  :class:`MemoryPlan` (``apply()``, ``describe()``, predictions);
- ``modules.py``: finding the layers, module kinds, the recompute wrappers;
- ``measure.py``: saved bytes per layer/kind, times, bandwidth;
- ``solve.py``: the cost model and the search (pure Python).
"""
from .fit import FitHandle, StepBudget, fit, step_budget
from .memory_plan import (MemoryPlan, PlanHandle, calibrate_offload, calibrate_recompute,
                          make_plan, measure_model, plan_memory)
from .modules import (KINDS, RECOMPUTE_OPTIONS, find_layers, register_head,
                      register_recompute_switch)
from .solve import HEAD_OPTIONS, OFFLOAD_LEVELS, Choice, HeadFigures, ModelFigures, Prediction

__all__ = ["fit", "step_budget", "StepBudget", "FitHandle", "HEAD_OPTIONS", "HeadFigures",
           "plan_memory", "MemoryPlan", "PlanHandle", "measure_model", "make_plan",
           "calibrate_offload", "calibrate_recompute", "KINDS",
           "RECOMPUTE_OPTIONS", "OFFLOAD_LEVELS", "find_layers", "register_head", "register_recompute_switch", "Choice",
           "ModelFigures", "Prediction"]
