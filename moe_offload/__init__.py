"""moe_offload: grouped MoE expert layers and a CPU activation-offload engine.

Layers (``moe_offload.ops``):

- :class:`GroupedLinear` -- one linear layer per contiguous row group, split sizes on
  the device, no host sync.
- :class:`GroupedMLP` -- fused ``fc1 -> activation (* router probs) -> fc2`` in one
  autograd function that recomputes the cheap activation in backward.
- :class:`MoE` -- linear router, softmax top-k, on-device permutation, ``GroupedMLP``
  experts, weighted combine; the load-balancing loss is attached to the output through
  autograd (``moe.aux_loss``: its detached value, for logging).

:func:`linear_cross_entropy` -- LM head + cross-entropy a chunk of tokens at a time: the
logits of all tokens never exist at once (``ops/linear_cross_entropy.py``).

Quantized formats (``moe_offload.tensor``): :class:`Float8CurrentScalingQuantizer`,
:class:`MXFP8Quantizer`, :class:`NVFP4Quantizer`, the containers
:class:`GroupedTensorStorage` (internal) and :class:`GroupedTensor` (a ``torch.Tensor``
subclass), and :func:`group_quantize`.

Offload engine (``moe_offload.offload``): :func:`get_cpu_offload_context` (the
TransformerEngine-compatible ``(context, sync)`` pair), :func:`offload_module_list`,
:func:`offloaded_checkpoint`, and the marks :func:`mark_not_offload`,
:func:`mark_activation_offload`, :func:`start_offload`, :func:`is_cpu_offload_enabled`.

Routing helpers (``moe_offload.ops.routing``), for any MoE model code:
:func:`sort_by_expert` (stable order of the token copies by expert and int32 end
offsets, on the device), :func:`offsets_to_split_sizes`, :func:`permute`,
:func:`permute_probs` and :func:`unpermute` (deterministic, optionally weighted,
combine of the ``k`` copies of each token).

Hugging Face transformers (optional): ``moe_offload.integrations.transformers``.
Planner (``moe_offload.plan``): :func:`fit` sizes a plan to the device in one call (the
weights, gradients, optimizer state and the allocator's reserve come off the device's memory;
the fastest mix whose step peak fits the rest is applied; :func:`step_budget` is that
arithmetic alone); :func:`plan_memory` measures a model and returns the fastest
:class:`MemoryPlan` (per-layer keep / offload / recompute mix) whose predicted step peak fits
a budget.
"""
from .offload import (get_cpu_offload_context, is_cpu_offload_enabled,
                      mark_activation_offload, mark_not_offload, offload_module_list,
                      offloaded_checkpoint, prepare_for_saving, restore_from_saved,
                      start_offload)
from .ops import GroupedLinear, GroupedMLP, MoE, linear_cross_entropy
from .ops.routing import (offsets_to_split_sizes, permute, permute_probs, sort_by_expert,
                          unpermute)
from .plan import FitHandle, MemoryPlan, StepBudget, fit, plan_memory, step_budget
from .tensor import (Float8CurrentScalingQuantizer, GroupedTensor, GroupedTensorStorage,
                     MXFP8Quantizer, NVFP4Quantizer, group_quantize)

__version__ = "0.1.0"

__all__ = [
    "GroupedLinear", "GroupedMLP", "MoE", "linear_cross_entropy",
    "Float8CurrentScalingQuantizer", "MXFP8Quantizer", "NVFP4Quantizer",
    "GroupedTensorStorage", "GroupedTensor", "group_quantize",
    "get_cpu_offload_context", "offload_module_list", "offloaded_checkpoint",
    "mark_not_offload", "mark_activation_offload", "start_offload",
    "is_cpu_offload_enabled", "prepare_for_saving", "restore_from_saved",
    "sort_by_expert", "offsets_to_split_sizes", "permute", "permute_probs", "unpermute",
    "plan_memory", "MemoryPlan", "fit", "step_budget", "StepBudget", "FitHandle",
]
