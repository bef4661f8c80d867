"""``offload_module_list``: offload an ``nn.ModuleList`` without editing the loop.

Each module gets a forward pre-hook (enter the context: next layer) and an
``always_call`` forward hook (exit the context, even when the forward raises, so no
saved-tensor hooks are left installed; then ``sync`` the output).  The hooks may run
inside the module's own checkpointing (a layer whose ``__call__`` wraps its hooks in
``torch.utils.checkpoint``): the recomputation in backward enters the context again,
which the context treats as a passive entry (no step, no offload; see
``CpuOffloadContext.__enter__``).
"""
from __future__ import annotations

import sys
from typing import Any, List

import torch

from .context import get_cpu_offload_context
from .params import PARAM_STORAGES

__all__ = ["offload_module_list", "OffloadModuleListHandle", "first_grad_tensor"]


def first_grad_tensor(output: Any):
    """The first tensor that requires grad in a module's output (a tensor, or nested
    tuples/lists/dicts of them), or ``None``."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (list, tuple)):
        for item in output:
            found = first_grad_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = first_grad_tensor(item)
            if found is not None:
                return found
    return None


class OffloadModuleListHandle:
    """Returned by :func:`offload_module_list`; ``.remove()`` detaches the hooks."""

    def __init__(self, context, sync) -> None:
        self.context = context
        self._sync = sync
        self._handles: List[Any] = []

    def stats(self) -> dict:
        """The context's cumulative stats (see ``CpuOffloadContext.stats``)."""
        return self.context.stats()

    def reset_stats(self) -> None:
        """Zero the context's counters."""
        self.context.reset_stats()

    def remove(self) -> None:
        """Remove every hook this handle installed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def offload_module_list(module_list: torch.nn.ModuleList, **kwargs) -> OffloadModuleListHandle:
    """Offload the saved activations of each module in ``module_list``.

    Takes the keyword arguments of :func:`get_cpu_offload_context`; ``model_layers``
    defaults to ``len(module_list)``.  Each module's forward is one layer; its first
    output tensor that requires grad is passed to ``sync``.
    """
    if not isinstance(module_list, (torch.nn.ModuleList, torch.nn.Sequential, list, tuple)):
        raise TypeError("offload_module_list expects an nn.ModuleList (or Sequential/list "
                        f"of modules), got {type(module_list).__name__}")
    modules = list(module_list)
    if not modules:
        raise ValueError("offload_module_list: the module list is empty")
    kwargs.setdefault("model_layers", len(modules))
    ctx, sync = get_cpu_offload_context(**kwargs)
    for m in modules:
        PARAM_STORAGES.add_module(m)       # their storages never move (params.py)
    handle = OffloadModuleListHandle(ctx, sync)

    def pre_hook(module, args):
        ctx.__enter__()

    def post_hook(module, args, output):
        exc = sys.exc_info() if output is None else (None, None, None)
        ctx.__exit__(*exc)
        if exc[0] is not None or not torch.is_grad_enabled():
            return None
        x = first_grad_tensor(output)
        if x is not None:
            sync(x)
        return None

    for m in modules:
        handle._handles.append(m.register_forward_pre_hook(pre_hook))
        handle._handles.append(m.register_forward_hook(post_hook, always_call=True))
    return handle
