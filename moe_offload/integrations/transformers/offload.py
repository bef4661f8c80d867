"""``offload(model)``: CPU activation offload of an HF causal LM's decoder layers.

One call finds the decoder layer list (:func:`find_decoder_layers`) and makes each call
of a decoder layer one layer of our offload engine
(:func:`moe_offload.get_cpu_offload_context`): the context is entered before the layer
runs and exited after it, and the output is passed to ``sync`` so the backward prefetches
the reloads.  The embeddings, the final norm, the LM head and the loss run outside the
context and are never offloaded; by default the last decoder layer is resident too
(``num_layers = L - 1``: its activations are needed first in backward).

Gradient checkpointing
======================
HF's ``gradient_checkpointing_enable()`` checkpoints each decoder layer; with offload
around it only each checkpointed layer's *inputs* travel and everything inside is
recomputed, with every transformers 5.x (<= 5.17 runs module hooks inside the
checkpoint, >= 5.24 outside): the layers' ``__call__`` is wrapped, not hooked, by the
engine's :class:`moe_offload.offload.OffloadedLayers` (``layer_calls.py`` says why).  :meth:`OffloadHandle.remove` restores the original classes; call it before
pickling or deep-copying the model object; ``state_dict`` is unaffected.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from ...offload import OffloadedLayers, get_cpu_offload_context

__all__ = ["offload", "OffloadHandle", "find_decoder_layers"]


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


class OffloadHandle(OffloadedLayers):
    """Returned by :func:`offload`: ``stats()``, ``reset_stats()``, ``remove()``.

    ``layers`` is the decoder layer list, ``context`` the engine's context,
    ``num_layers`` how many leading layers offload.
    """

    def __init__(self, layers: List[nn.Module], context, sync, num_layers: int) -> None:
        super().__init__(layers, context, sync)          # raises if already offloaded
        self.num_layers = num_layers


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
    L = len(found)
    n = L - 1 if num_layers is None else num_layers
    if not isinstance(n, int) or not 0 <= n <= L:
        raise ValueError(f"offload: num_layers must be an int in [0, {L}], got {num_layers!r}")
    if "emulate" not in engine_kwargs:
        p = next(found[0].parameters(), None)
        engine_kwargs["emulate"] = p is None or p.device.type == "cpu"
    ctx, sync = get_cpu_offload_context(True, num_layers=n, model_layers=L, **engine_kwargs)
    return OffloadHandle(found, ctx, sync, n)
