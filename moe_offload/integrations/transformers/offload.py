"""``offload(model)``: CPU activation offload of an HF causal LM's decoder layers.

One call finds the decoder layer list (:func:`find_decoder_layers`) and makes each call
of a decoder layer one layer of our offload engine
(:func:`moe_offload.get_cpu_offload_context`): the context is entered before the layer
runs and exited after it, and the output is passed to ``sync`` so the backward prefetches
the reloads.  The embeddings, the final norm, the LM head and the loss run outside the
context and are never offloaded; by default the last decoder layer is resident too
(``num_layers = L - 1``: its activations are needed first in backward).

Where the context is entered, and why (gradient checkpointing)
==============================================================
HF's ``gradient_checkpointing_enable()`` checkpoints each decoder layer with
``torch.utils.checkpoint`` (non-reentrant by default).  With offload around it, the
right split is: the checkpoint's *inputs* (saved by the checkpoint itself) go through
our hooks and travel to the host, and everything inside the layer is recomputed.  That
needs our context entered *outside* the checkpointed function.  Module hooks cannot
promise that: transformers <= 5.17 overrides ``GradientCheckpointingLayer.__call__``
and runs the module's hooks *inside* the checkpointed function (they would then see
the layer's internals instead of its inputs, and run again during the backward
recomputation), while transformers >= 5.24 checkpoints ``forward`` and runs the hooks
outside.  So we wrap ``__call__`` itself: each decoder layer's class is swapped for a
subclass (cached per class, same name, only ``__call__`` added; ``forward`` is the
original class's, so HF's "only the outermost wrapper checkpoints" rule still holds)
whose ``__call__`` enters the context, runs the original ``__call__`` (hooks,
checkpointing and all) and exits.  The backward recomputation calls the layer's inner
function directly, never this ``__call__``, so it never re-enters the context.
:meth:`OffloadHandle.remove` restores the original classes; call it before pickling or
deep-copying the model object (the swapped class is not importable by name, and the
handle holds the engine); ``state_dict`` is unaffected.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch
from torch import nn

from ...offload import first_grad_tensor, get_cpu_offload_context

__all__ = ["offload", "OffloadHandle", "find_decoder_layers"]

_HANDLE_ATTR = "_moe_offload_handle"
_SUBCLASSES: dict = {}       # original layer class -> its offloading subclass


def _checkpointing_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        return GradientCheckpointingLayer
    except ImportError:       # pragma: no cover - older transformers
        return None


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF model (e.g. ``model.model.layers``).

    Picks, among the ``nn.ModuleList`` s of ``model``, those whose members are all
    ``GradientCheckpointingLayer`` s (every HF decoder layer is one), else those named
    ``layers``/``h``/``blocks`` whose members share one class; of these the one with the
    most parameters (the language model's, not a vision tower's).  ``ValueError`` if none.
    """
    gcl = _checkpointing_layer_class()
    best, fallback = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kids = list(mod)
        if gcl is not None and all(isinstance(k, gcl) for k in kids):
            best.append(mod)
        elif name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") \
                and len({type(k) for k in kids}) == 1:
            fallback.append(mod)
    found = best or fallback
    if not found:
        raise ValueError(f"offload: found no decoder layer list in {type(model).__name__}; "
                         "pass it as layers=model.<path>.layers")
    return max(found, key=_num_params)


def _offloading_call(self, *args, **kwargs):
    """``__call__`` of the swapped decoder layer class: one engine layer per call."""
    handle = self.__dict__[_HANDLE_ATTR]
    ctx = handle.context
    ctx.__enter__()
    try:
        output = super(type(self), self).__call__(*args, **kwargs)   # the original __call__
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
        sub = type(cls.__name__, (cls,), {"__call__": _offloading_call,
                                          "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        # transformers >= 5.24 wraps each subclass's forward for checkpointing again;
        # keep the original class's forward (already wrapped there) so that the
        # "only the outermost wrapper checkpoints" rule sees one wrapper.
        sub.forward = cls.forward
        _SUBCLASSES[cls] = sub
    return sub


class OffloadHandle:
    """Returned by :func:`offload`: ``stats()``, ``reset_stats()``, ``remove()``.

    ``layers`` is the decoder layer list, ``context`` the engine's context,
    ``num_layers`` how many leading layers offload.
    """

    def __init__(self, layers: List[nn.Module], context, sync, num_layers: int) -> None:
        self.layers = layers
        self.context = context
        self.sync = sync
        self.num_layers = num_layers
        self._classes = {}

    def stats(self) -> dict:
        """The engine's cumulative counters (see ``CpuOffloadContext.stats``)."""
        return self.context.stats()

    def reset_stats(self) -> None:
        """Zero the engine's counters."""
        self.context.reset_stats()

    def remove(self) -> None:
        """Restore the decoder layers' original classes; offload stops."""
        for layer in self.layers:
            if layer.__dict__.get(_HANDLE_ATTR) is self:
                layer.__class__ = self._classes[id(layer)]
                del layer.__dict__[_HANDLE_ATTR]
        self._classes.clear()


def offload(model: nn.Module, num_layers: Optional[int] = None, *,
            layers: Optional[nn.ModuleList] = None, **engine_kwargs) -> OffloadHandle:
    """Offload the saved activations of ``model``'s decoder layers to host memory.

    Args:
        model: an HF causal LM (any model whose decoder layers are found by
            :func:`find_decoder_layers`), or its inner model.
        num_layers: how many leading decoder layers offload; default all but the last
            (``L - 1``); ``L`` offloads every decoder layer.
        layers: the decoder layer list, when the search should not guess.
        engine_kwargs: passed to :func:`moe_offload.get_cpu_offload_context`
            (``min_offload_bytes``, ``prefetch_layers``, ``host_memory_limit_bytes``,
            ``policy``, ...).  ``emulate`` defaults to True when the layers' parameters
            are on the CPU (the full engine state machine without streams).

    Works with and without HF's ``gradient_checkpointing_enable()`` (then only each
    checkpointed layer's inputs are saved, so only they travel; see the module
    docstring for why this holds with every transformers 5.x).  Gradients are bitwise
    equal to the run without offload.  Returns an :class:`OffloadHandle`.
    """
    found = list(find_decoder_layers(model) if layers is None else layers)
    if not found:
        raise ValueError("offload: the decoder layer list is empty")
    for layer in found:
        if _HANDLE_ATTR in layer.__dict__:
            raise RuntimeError(f"offload: {type(layer).__name__} is already offloaded; call "
                               "remove() on the previous handle first")
    L = len(found)
    n = L - 1 if num_layers is None else num_layers
    if not isinstance(n, int) or not 0 <= n <= L:
        raise ValueError(f"offload: num_layers must be an int in [0, {L}], got {num_layers!r}")
    if "emulate" not in engine_kwargs:
        p = next(found[0].parameters(), None)
        engine_kwargs["emulate"] = p is None or p.device.type == "cpu"
    ctx, sync = get_cpu_offload_context(True, num_layers=n, model_layers=L, **engine_kwargs)
    handle = OffloadHandle(found, ctx, sync, n)
    for layer in found:
        handle._classes[id(layer)] = type(layer)
        layer.__dict__[_HANDLE_ATTR] = handle
        layer.__class__ = _offloading_class(type(layer))
    return handle
