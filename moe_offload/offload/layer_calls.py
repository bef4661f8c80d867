"""Offload per layer call: ``OffloadedLayers`` and ``offload_module_list``.

Each call of a layer is one layer of the engine: the context is entered before the
layer runs and exited after it (also when it raises), and the layer's first output
tensor that requires grad is passed to ``sync`` so the backward prefetches the reloads.

Where the context is entered, and why (checkpointing)
=====================================================
A layer that checkpoints itself (Hugging Face's ``gradient_checkpointing_enable()``, a
``forward`` that calls ``torch.utils.checkpoint`` or :func:`offloaded_checkpoint`) must
hand the engine only the checkpoint's *inputs* (saved by the checkpoint itself, under
the hooks active at its call); everything inside is recomputed in backward.  That needs
the engine entered *outside* the checkpointed function.  Module hooks cannot promise
it: transformers <= 5.17 overrides ``GradientCheckpointingLayer.__call__`` and runs the
module's hooks *inside* the checkpoint, so an engine entered by a forward pre-hook sits
innermost, takes every tensor the layer saves, and checkpointing is silently off (right
gradients, the memory and time of no checkpointing); transformers >= 5.24 checkpoints
``forward`` and runs the hooks outside.  So each layer's ``__call__`` itself is wrapped:
its class is swapped for a subclass (cached per class, same name; only ``__call__`` is
added, ``forward`` stays the original class's, so HF's "only the outermost wrapper
checkpoints" rule still holds) whose ``__call__`` enters the context, runs the original
``__call__`` (hooks, checkpointing and all) and exits.  A backward recomputation calls
the layer's inner function, never this ``__call__``; where it does call it (a checkpoint
around the layer), the entry is passive (``CpuOffloadContext.__enter__``).

A checkpoint that begins *outside* the layer (``checkpoint(layer, x)``) cannot be fixed
from inside: its inputs were saved before the layer was called.  The wrapped
``__call__`` detects it -- the innermost saved-tensor hooks at entry are a checkpoint's
forward hooks (:func:`in_checkpoint_forward`) -- and raises with the fix instead of
silently turning that checkpoint off.  (A reentrant checkpoint runs its forward under
``no_grad``: the entry is passive, nothing inside is saved, and its inputs stay where
they are.)

:meth:`OffloadedLayers.remove` restores the original classes (a layer whose class was
subclassed again after ours, e.g. by FSDP2's ``fully_shard``, keeps its class and its
calls pass straight through).  Call it before pickling or deep-copying the model object
(the swapped class is not importable by name, and each layer holds the handle, which
holds the engine); ``state_dict`` is unaffected.
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from .checkpoint import _Frame
from .context import get_cpu_offload_context
from .marks import mark_not_offload
from .params import PARAM_STORAGES

__all__ = ["offload_module_list", "OffloadedLayers", "first_grad_tensor", "in_checkpoint_forward"]

_HANDLE_ATTR = "_moe_offload_handle"
_SUBCLASSES: dict = {}       # original layer class -> its offloading subclass


def first_grad_tensor(output: Any):
    """The first tensor that requires grad in a module's output (a tensor, or nested
    tuples/lists/dicts of them), or ``None``."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    items = output.values() if isinstance(output, dict) else \
        output if isinstance(output, (list, tuple)) else ()
    for item in items:
        found = first_grad_tensor(item)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------- checkpoint detection
def _is_torch_checkpoint_pack(pack) -> bool:
    """``torch.utils.checkpoint``'s non-reentrant forward pack hook: a closure defined in
    ``_checkpoint_hook.__init__`` (torch internals; ``test_in_checkpoint_forward`` fails
    if a torch release renames it, and only this outer-checkpoint check depends on it)."""
    return (getattr(pack, "__module__", None) == "torch.utils.checkpoint"
            and getattr(pack, "__qualname__", "").startswith("_checkpoint_hook."))


def in_checkpoint_forward() -> bool:
    """Is the innermost pair of saved-tensor hooks the forward hooks of a checkpoint
    (``torch.utils.checkpoint(use_reentrant=False)`` or :func:`offloaded_checkpoint`)?

    True inside the checkpointed function during the forward, before any other hooks
    are entered there; False during a backward recomputation (those are other hooks).
    Reads torch's hook stack (``torch._C._autograd._top_saved_tensors_default_hooks``,
    torch >= 2.8); False where that is missing."""
    top_fn = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_fn is None:
        return False
    top = top_fn(False)
    if top is None:
        return False
    pack = top[0]
    return _is_torch_checkpoint_pack(pack) or isinstance(getattr(pack, "__self__", None), _Frame)


# ------------------------------------------------------------------- the wrapped call
def _keep_leaf_inputs(args, kwargs) -> None:
    """A leaf input that requires grad is the caller's tensor: moving it frees nothing (the
    caller holds it), so it never travels."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.grad_fn is None and a.requires_grad:
            mark_not_offload(a)


def _call(layer: nn.Module, original_call, args, kwargs):
    """One engine layer around ``original_call(layer, *args, **kwargs)``."""
    handle = layer.__dict__.get(_HANDLE_ATTR)
    if handle is None:                    # removed while a later subclass kept our class
        return original_call(layer, *args, **kwargs)
    if torch.is_grad_enabled() and in_checkpoint_forward():
        raise RuntimeError(
            f"moe_offload: offloaded layer {type(layer).__name__} was called inside a "
            "checkpoint that began outside it (e.g. torch.utils.checkpoint(layer, x)); the "
            "engine would take every tensor the checkpoint should recompute, turning "
            "checkpointing off.  Checkpoint inside the layer instead (Hugging Face "
            "gradient_checkpointing_enable(), or a forward that calls the checkpoint), or "
            "remove the layer offload and write `with ctx: h = offloaded_checkpoint(layer, "
            "h)` then `h = sync(h)` with (ctx, sync) = get_cpu_offload_context(...)")
    if torch.is_grad_enabled():
        _keep_leaf_inputs(args, kwargs)
    ctx = handle.context
    inner = handle.inner.get(id(layer))
    ctx.__enter__()
    try:
        if inner is not None:
            inner.__enter__()
        try:
            output = original_call(layer, *args, **kwargs)
        except BaseException:
            if inner is not None:
                inner.__exit__(*sys.exc_info())
            raise
        if inner is not None:
            inner.__exit__(None, None, None)
    except BaseException:
        ctx.__exit__(*sys.exc_info())
        raise
    ctx.__exit__(None, None, None)
    if torch.is_grad_enabled():
        x = first_grad_tensor(output)
        if x is not None:
            handle.sync(x)
    return output


def _offloading_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        original_call = cls.__call__

        def __call__(self, *args, **kwargs):
            return _call(self, original_call, args, kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        # transformers >= 5.24 wraps each subclass's forward for checkpointing again;
        # keep the original class's forward (already wrapped there) so that the
        # "only the outermost wrapper checkpoints" rule sees one wrapper.
        sub.forward = cls.forward
        _SUBCLASSES[cls] = sub
    return sub


class OffloadedLayers:
    """Make each call of each module in ``layers`` one layer of the engine ``(context,
    sync)`` (the pair from :func:`get_cpu_offload_context`), entered outside anything the
    module's own ``__call__`` does (hooks, its checkpointing): see the module docstring.

    ``layers`` the offloaded modules, ``context``/``sync`` the engine's pair; ``inner``
    (optional, one per layer, ``None`` for none): a context manager entered inside the
    engine's for each call of that layer (the planner's opt-out of a layer that keeps what
    it saves); ``stats()``, ``reset_stats()``, ``remove()``.  A leaf input that requires
    grad never travels (the caller holds it).  The modules' parameters are registered
    so that they never move (``params.py``).  Raises ``RuntimeError`` when a module is
    already offloaded, and, at call time, when a module is called inside a checkpoint
    that began outside it.
    """

    def __init__(self, layers: Sequence[nn.Module], context, sync,
                 inner: Optional[Sequence[Any]] = None) -> None:
        modules = list(layers)
        if inner is not None and len(inner) != len(modules):
            raise ValueError(f"inner: need one entry per layer ({len(modules)}), got {len(inner)}")
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"OffloadedLayers expects modules, got {type(m).__name__}")
            if _HANDLE_ATTR in m.__dict__:
                raise RuntimeError(f"moe_offload: {type(m).__name__} is already offloaded; "
                                   "call remove() on the previous handle first")
        self.layers = modules
        self.context = context
        self.sync = sync
        self.inner = {id(m): c for m, c in zip(modules, inner or ()) if c is not None}
        self._classes: dict = {}       # id(layer) -> its original class
        for m in modules:
            PARAM_STORAGES.add_module(m)       # their storages never move (params.py)
            self._classes[id(m)] = type(m)
            m.__dict__[_HANDLE_ATTR] = self
            m.__class__ = _offloading_class(type(m))

    def stats(self) -> dict:
        """The engine's cumulative counters (see ``CpuOffloadContext.stats``)."""
        return self.context.stats()

    def reset_stats(self) -> None:
        """Zero the engine's counters."""
        self.context.reset_stats()

    def remove(self) -> None:
        """Stop offloading: restore the layers' original classes (a layer subclassed again
        after ours keeps its class; its calls then pass through)."""
        for layer in self.layers:
            if layer.__dict__.get(_HANDLE_ATTR) is not self:
                continue
            del layer.__dict__[_HANDLE_ATTR]
            original = self._classes[id(layer)]
            if type(layer) is _SUBCLASSES.get(original):
                layer.__class__ = original
        self._classes.clear()


def offload_module_list(module_list: nn.ModuleList, **kwargs) -> OffloadedLayers:
    """Offload the saved activations of each module in ``module_list``.

    Takes the keyword arguments of :func:`get_cpu_offload_context`; ``model_layers``
    defaults to ``len(module_list)``.  Each call of a module is one layer (entered
    outside the module's hooks and own checkpointing: only a checkpoint's inputs travel);
    its first output tensor that requires grad is passed to ``sync``.  Returns an
    :class:`OffloadedLayers` (see it for the errors).
    """
    if not isinstance(module_list, (nn.ModuleList, nn.Sequential, list, tuple)):
        raise TypeError("offload_module_list expects an nn.ModuleList (or Sequential/list "
                        f"of modules), got {type(module_list).__name__}")
    modules = list(module_list)
    if not modules:
        raise ValueError("offload_module_list: the module list is empty")
    kwargs.setdefault("model_layers", len(modules))
    ctx, sync = get_cpu_offload_context(**kwargs)
    return OffloadedLayers(modules, ctx, sync)
