"""Marks that layers put on tensors for the offload engine.

Pure, cheap functions, safe to call when no offload context is active (then they only
set flags, or do nothing).  Each accepts any mix of:

- ``None`` (ignored);
- plain tensors (the mark is a Python attribute on the tensor object; the engine also
  looks at a view's ``_base``);
- tensor subclasses implementing ``__tensor_flatten__`` (the mark goes to every inner
  tensor, recursively, because the engine packs the inner tensors one by one);
- storage objects exposing ``component_tensors()`` (marks go to the components), or,
  failing that, ``prepare_for_saving()``/``restore_from_saved()`` (used only to read the
  components; the object is rebuilt in place).

The engine registers itself here while an enabled context is entered
(:func:`_set_active_engine`), which is how :func:`start_offload` reaches it without the
layers importing the engine.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator, Optional

import torch

__all__ = [
    "mark_not_offload",
    "mark_activation_offload",
    "start_offload",
    "is_cpu_offload_enabled",
]

# Attribute names stored on tensor objects.
NOT_OFFLOAD_ATTR = "_moe_offload_never"
OFFLOAD_MARK_ATTR = "_moe_offload_marked"
READY_EVENT_ATTR = "_moe_offload_ready_event"

# The engine whose saved-tensor hooks are currently installed in this thread (None
# outside a context, and None inside an opted-out region).  Thread-local, like torch's
# saved-tensor hooks.  Set only by the engine.
_state = threading.local()


def _set_active_engine(engine: Optional[Any]) -> Optional[Any]:
    """Install ``engine`` as the active one; return the previous (engine-internal)."""
    previous = getattr(_state, "engine", None)
    _state.engine = engine
    return previous


def _get_active_engine() -> Optional[Any]:
    return getattr(_state, "engine", None)


def iter_component_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield the plain tensors that make up ``obj`` (see module docstring)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor \
                and not isinstance(obj, torch.nn.Parameter):
            attrs, _ = obj.__tensor_flatten__()
            for name in attrs:
                yield from iter_component_tensors(getattr(obj, name))
        else:
            yield obj
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_component_tensors(item)
        return
    if hasattr(obj, "component_tensors"):
        for t in obj.component_tensors():
            yield from iter_component_tensors(t)
        return
    if hasattr(obj, "prepare_for_saving") and hasattr(obj, "restore_from_saved"):
        tensors, shell = obj.prepare_for_saving()
        # Put the tensors back so the caller's object is unchanged.
        shell.restore_from_saved(list(tensors))
        for t in tensors:
            yield from iter_component_tensors(t)
        return
    raise TypeError(
        f"cannot mark an object of type {type(obj).__name__}: expected None, a tensor, a "
        "__tensor_flatten__ subclass, or a storage object with component_tensors() or "
        "prepare_for_saving()/restore_from_saved()")


def _set_flag(t: torch.Tensor, name: str) -> None:
    try:
        setattr(t, name, True)
    except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor types
        pass


def mark_not_offload(*objs: Any) -> None:
    """Never offload these tensors (weights, workspaces, small metadata)."""
    for obj in objs:
        for t in iter_component_tensors(obj):
            _set_flag(t, NOT_OFFLOAD_ATTR)


def mark_activation_offload(*objs: Any) -> None:
    """Opt these tensors in for ``policy="marked"`` (no effect under ``policy="auto"``)."""
    for obj in objs:
        for t in iter_component_tensors(obj):
            _set_flag(t, OFFLOAD_MARK_ATTR)


def start_offload(*objs: Any) -> None:
    """Declare these tensors final: no kernel will write them any more.

    When an enabled offload context is active, records a "ready" event on the current
    stream and stashes it on each tensor, so the engine's device-to-host copy may start
    as soon as the producing kernel is done (before the op returns).  Without an active
    context this does nothing.
    """
    engine = _get_active_engine()
    if engine is None:
        return
    for obj in objs:
        for t in iter_component_tensors(obj):
            engine.record_ready(t)


def is_cpu_offload_enabled() -> bool:
    """True while an enabled offload context's hooks are installed (not in an opt-out)."""
    return _get_active_engine() is not None


def is_marked_not_offload(t: torch.Tensor) -> bool:
    """Engine helper: does ``t`` (or the base of the view ``t``) carry the never mark?"""
    return bool(getattr(t, NOT_OFFLOAD_ATTR, False)) or (
        t._base is not None and bool(getattr(t._base, NOT_OFFLOAD_ATTR, False)))


def is_marked_offload(t: torch.Tensor) -> bool:
    """Engine helper: does ``t`` (or the base of the view ``t``) carry the opt-in mark?"""
    return bool(getattr(t, OFFLOAD_MARK_ATTR, False)) or (
        t._base is not None and bool(getattr(t._base, OFFLOAD_MARK_ATTR, False)))
