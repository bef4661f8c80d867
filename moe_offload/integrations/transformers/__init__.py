"""Hugging Face transformers (>= 5.0) integration.

Two one-liners:

- ``use_moe_offload_experts(model, recipe=None)`` (or
  ``from_config(..., experts_implementation="moe_offload")`` after importing this
  package): run HF's experts on our fused grouped MLP (:mod:`.experts`).
- ``handle = offload(model)``: offload the activations of the decoder layers with our
  engine, alone or with ``model.gradient_checkpointing_enable()`` (:mod:`.offload`).
"""
from .experts import (IMPLEMENTATION, RECIPES, RECOMPUTE_ATTR, runs_moe_offload, ExpertsSpec, inspect_experts,
                      moe_offload_experts_forward, register, set_recipe,
                      use_moe_offload_experts)
from .offload import OffloadHandle, find_decoder_layers, offload

__all__ = ["IMPLEMENTATION", "RECIPES", "RECOMPUTE_ATTR", "runs_moe_offload", "ExpertsSpec", "inspect_experts",
           "moe_offload_experts_forward", "register", "set_recipe", "use_moe_offload_experts",
           "offload", "OffloadHandle", "find_decoder_layers"]
