"""Moved to :mod:`moe_offload.plan.stack` (the synthetic-stack planner); re-exported here."""
from ..plan.stack import (OFFLOAD_MODES, LayerCosts, Plan, candidate_plans, costs_from_measurements,
                          layer_memory, plan_for_budget, plan_hidden, plan_memory, prefetch_for,
                          simulate)

__all__ = ["LayerCosts", "Plan", "OFFLOAD_MODES", "layer_memory", "plan_memory", "simulate",
           "candidate_plans", "plan_for_budget", "plan_hidden", "prefetch_for", "costs_from_measurements"]
