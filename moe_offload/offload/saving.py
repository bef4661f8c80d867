"""Split composite storage objects into plain tensors for ``save_for_backward``.

Autograd saves tensors only.  A storage object (for example a grouped, quantized
container) implements ``prepare_for_saving() -> (list[Tensor | None], shell)`` and
``shell.restore_from_saved(tensors) -> unused_tail``.  These helpers apply that to any
mix of ``None``, plain tensors and storage objects, so every component passes the
offload engine's saved-tensor hooks on its own (own events, own size threshold)::

    tensors, state = prepare_for_saving(x, w_storage, None)
    ctx.save_for_backward(*tensors); ctx.state = state
    ...
    x, w_storage, _ = restore_from_saved(ctx.state, ctx.saved_tensors)
"""
from __future__ import annotations

import copy
from typing import Any, List, Sequence, Tuple

import torch

__all__ = ["prepare_for_saving", "restore_from_saved"]

_NONE, _TENSOR, _STORAGE = "none", "tensor", "storage"


def prepare_for_saving(*objs: Any) -> Tuple[List[Any], list]:
    """Return ``(tensors, state)``: a flat tensor list for ``save_for_backward`` and the
    tensor-free state that :func:`restore_from_saved` needs to rebuild ``objs``."""
    tensors: List[Any] = []
    state: list = []
    for obj in objs:
        if obj is None:
            state.append((_NONE, None, 0))
        elif isinstance(obj, torch.Tensor):
            state.append((_TENSOR, None, 1))
            tensors.append(obj)
        elif hasattr(obj, "prepare_for_saving") and hasattr(obj, "restore_from_saved"):
            parts, shell = obj.prepare_for_saving()
            parts = list(parts)
            state.append((_STORAGE, shell, len(parts)))
            tensors.extend(parts)
        else:
            raise TypeError(
                f"prepare_for_saving: cannot save an object of type {type(obj).__name__}; "
                "expected None, a tensor, or an object with prepare_for_saving()/"
                "restore_from_saved()")
    return tensors, state


def restore_from_saved(state: list, tensors: Sequence[Any]) -> tuple:
    """Inverse of :func:`prepare_for_saving`: rebuild the objects from saved tensors."""
    tensors = list(tensors)
    expected = sum(n for _, _, n in state)
    if len(tensors) != expected:
        raise ValueError(f"restore_from_saved: got {len(tensors)} tensors, the saved state "
                         f"needs {expected}")
    out = []
    pos = 0
    for kind, shell, n in state:
        if kind == _NONE:
            out.append(None)
        elif kind == _TENSOR:
            out.append(tensors[pos])
        else:
            # Restore into a shallow copy: the shell stays tensor-free in the autograd
            # context, so the rebuilt object (and its device tensors) dies with the
            # backward that used it instead of living as long as the graph does.  A
            # second restore (retain_graph) builds a fresh copy the same way.
            obj = copy.copy(shell)
            tail = obj.restore_from_saved(tensors[pos:pos + n])
            if tail:
                raise ValueError(f"{type(shell).__name__}.restore_from_saved left "
                                 f"{len(tail)} of its {n} tensors unused")
            out.append(obj)
        pos += n
    return tuple(out)
