"""CPU activation-offload engine.

- ``get_cpu_offload_context``: the TransformerEngine-compatible ``(context, sync)`` API
  (design and stream/event reasoning in ``context.py``);
- ``offload_module_list``: the same through module hooks;
- ``offloaded_checkpoint``: checkpointing whose saved inputs are offloaded;
- marks used by layers (``marks.py``) and saving helpers for composite storage objects
  (``saving.py``).
"""
from .checkpoint import offloaded_checkpoint
from .context import CpuOffloadContext, OptOutContext, get_cpu_offload_context, release_lag
from .marks import (is_cpu_offload_enabled, mark_activation_offload, mark_not_offload,
                    start_offload)
from .module_hooks import OffloadModuleListHandle, first_grad_tensor, offload_module_list
from .saving import prepare_for_saving, restore_from_saved

__all__ = [
    "get_cpu_offload_context", "CpuOffloadContext", "OptOutContext", "release_lag",
    "offload_module_list", "OffloadModuleListHandle", "first_grad_tensor", "offloaded_checkpoint",
    "mark_not_offload", "mark_activation_offload", "start_offload",
    "is_cpu_offload_enabled", "prepare_for_saving", "restore_from_saved",
]
