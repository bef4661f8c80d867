"""CPU activation-offload engine.

- ``get_cpu_offload_context``: the TransformerEngine-compatible ``(context, sync)`` API
  (design and stream/event reasoning in ``context.py``);
- ``offload_module_list`` / ``OffloadedLayers``: each call of a listed module is one
  layer (its ``__call__`` wrapped, so checkpointing inside it keeps working);
- ``offloaded_checkpoint``: checkpointing whose saved inputs are offloaded;
- ``find_layers``: the one finder of a model's decoder layers (``layer_list.py``);
- marks used by layers (``marks.py``) and saving helpers for composite storage objects
  (``saving.py``).
"""
from .checkpoint import offloaded_checkpoint
from .context import CpuOffloadContext, OptOutContext, get_cpu_offload_context, release_lag
from .marks import (is_cpu_offload_enabled, mark_activation_offload, mark_not_offload,
                    start_offload)
from .layer_calls import (OffloadedLayers, first_grad_tensor, in_checkpoint_forward,
                          offload_module_list)
from .layer_list import find_layers
from .saving import prepare_for_saving, restore_from_saved

__all__ = [
    "get_cpu_offload_context", "CpuOffloadContext", "OptOutContext", "release_lag",
    "offload_module_list", "OffloadedLayers", "first_grad_tensor",
    "in_checkpoint_forward", "offloaded_checkpoint", "find_layers",
    "mark_not_offload", "mark_activation_offload", "start_offload",
    "is_cpu_offload_enabled", "prepare_for_saving", "restore_from_saved",
]
