"""Hugging Face transformers (>= 5.0) integration.

Two one-liners:

- ``use_moe_offload_experts(model, recipe=None)`` (or
  ``from_config(..., experts_implementation="moe_offload")`` after importing this
  package): run HF's experts on our fused grouped MLP (:mod:`.experts`).
- ``handle = offload(model)``: offload the activations of the decoder layers with our
  engine, alone or with ``model.gradient_checkpointing_enable()`` (:mod:`.offload`).
- ``handle = use_chunked_loss(model)``: the training loss computed in token chunks from the
  final hidden states, so the logits of all tokens never exist at once (:mod:`.loss`).

And for training loops (:mod:`.trainer`, imported on first use):
``Trainer(..., callbacks=[MoEOffloadCallback()])`` plans activation memory at the first
training batch; ``with plan_on_first_batch(model, optimizer): ...`` does it in a plain loop.
"""
from .experts import (IMPLEMENTATION, RECIPES, RECOMPUTE_ATTR, runs_moe_offload, ExpertsSpec, inspect_experts,
                      moe_offload_experts_forward, register, set_recipe,
                      use_moe_offload_experts)
from .loss import ChunkedLossHandle, chunked_loss_problem, use_chunked_loss
from .offload import OffloadHandle, find_decoder_layers, offload
from ...plan import register_head, register_recompute_switch

# The planner knows no integration; this one tells it what it adds: the recompute switch of HF
# experts running our implementation, and the chunked loss as a head option.
register_recompute_switch(lambda m: RECOMPUTE_ATTR if runs_moe_offload(m) else None)
register_head("chunked", lambda model: chunked_loss_problem(model) is None,
              lambda model: use_chunked_loss(model).remove)

__all__ = ["IMPLEMENTATION", "RECIPES", "RECOMPUTE_ATTR", "runs_moe_offload", "ExpertsSpec", "inspect_experts",
           "moe_offload_experts_forward", "register", "set_recipe", "use_moe_offload_experts",
           "offload", "OffloadHandle", "find_decoder_layers", "use_chunked_loss", "ChunkedLossHandle", "chunked_loss_problem",
           "MoEOffloadCallback", "FirstBatchPlanner", "plan_on_first_batch"]

_TRAINER_NAMES = ("MoEOffloadCallback", "FirstBatchPlanner", "plan_on_first_batch")


def __getattr__(name):
    # The trainer module imports transformers' Trainer machinery: load it on first use.
    if name in _TRAINER_NAMES:
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
