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

The engine's regions (which context is entered on this thread, and whose hooks are
active) live here too (:func:`enter_region`, :func:`active_engine`): that is how
:func:`start_offload` reaches the engine without the layers importing it.
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

# -- the active-engine state: the one place ------------------------------------------
# A thread-local stack of regions, one per entered context (enabled, opt-out, or a
# passive entry that installs nothing).  Thread-local like torch's saved-tensor hooks.
# The functions below are public for the engine (context.py) and for tests that stand
# in a fake engine; layers only use the mark functions.
_local = threading.local()


class Region:
    """One entered context on this thread: who entered it, the engine whose hooks are
    active inside it (None: no offload inside), and the saved-tensor hooks it installed
    (None: none)."""

    __slots__ = ("owner", "engine", "hooks")

    def __init__(self, owner: Any, engine: Optional[Any], hooks: Any) -> None:
        self.owner = owner
        self.engine = engine
        self.hooks = hooks


def regions() -> list:
    """This thread's stack of entered regions (innermost last)."""
    stack = getattr(_local, "regions", None)
    if stack is None:
        stack = _local.regions = []
    return stack


def enter_region(owner: Any, engine: Optional[Any], hooks: Any = None) -> Region:
    """Install ``hooks`` (a ``saved_tensors_hooks`` or None) and push a region."""
    if hooks is not None:
        hooks.__enter__()
    region = Region(owner, engine, hooks)
    regions().append(region)
    return region


def exit_region(region: Region) -> None:
    """Pop ``region`` and uninstall its hooks.

    Regions must exit in reverse order of entry.  When ``region`` is not the innermost,
    every region entered inside it is unwound too (hooks removed, innermost first), so
    no state is left behind, and a ``RuntimeError`` says what happened.  A region that
    is no longer on the stack (already unwound that way) is ignored.
    """
    stack = regions()
    if region not in stack:
        return
    inner = []
    while stack[-1] is not region:
        inner.append(stack.pop())
    stack.pop()
    for r in inner + [region]:
        if r.hooks is not None:
            r.hooks.__exit__(None, None, None)
    if inner:
        names = ", ".join(type(r.owner).__name__ for r in inner)
        raise RuntimeError(
            f"moe_offload: {type(region.owner).__name__} was exited while a region "
            f"entered inside it is still open ({names}); contexts must exit in reverse "
            "order of entry.  Every region down to this one was closed (no hooks are "
            "left installed); exiting the inner ones later does nothing.")


def owner_entered(owner: Any) -> bool:
    """Is a region entered by ``owner`` open on this thread?"""
    return any(r.owner is owner for r in regions())


def active_engine() -> Optional[Any]:
    """The engine whose hooks are active in the innermost region (None: no offload)."""
    override = getattr(_local, "override", None)
    if override is not None:
        return override
    stack = regions()
    return stack[-1].engine if stack else None


def set_active_engine(engine: Optional[Any]) -> Optional[Any]:
    """Test aid: make ``engine`` (anything with ``record_ready``) the active engine on
    this thread, over the region stack; None removes it.  Returns the previous override
    (pass it back to restore)."""
    previous = getattr(_local, "override", None)
    _local.override = engine
    return previous


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
    engine = active_engine()
    if engine is None:
        return
    for obj in objs:
        for t in iter_component_tensors(obj):
            engine.record_ready(t)


def is_cpu_offload_enabled() -> bool:
    """True while an enabled offload context's hooks are installed (not in an opt-out)."""
    return active_engine() is not None


def is_marked_not_offload(t: torch.Tensor) -> bool:
    """Engine helper: does ``t`` (or the base of the view ``t``) carry the never mark?"""
    return bool(getattr(t, NOT_OFFLOAD_ATTR, False)) or (
        t._base is not None and bool(getattr(t._base, NOT_OFFLOAD_ATTR, False)))


def is_marked_offload(t: torch.Tensor) -> bool:
    """Engine helper: does ``t`` (or the base of the view ``t``) carry the opt-in mark?"""
    return bool(getattr(t, OFFLOAD_MARK_ATTR, False)) or (
        t._base is not None and bool(getattr(t._base, OFFLOAD_MARK_ATTR, False)))
