"""``offloaded_checkpoint``: activation checkpointing whose inputs go through offload.

Non-reentrant design (the semantics of ``torch.utils.checkpoint(use_reentrant=False)``,
our own code):

- **Forward.** ``fn`` runs *with* grad recording, so its outputs -- and any value that
  leaves it by a side channel, e.g. router logits collected by a forward hook for a
  load-balancing loss computed outside -- carry their graph.  While it runs, our own
  ``saved_tensors_hooks`` are the innermost pair: every tensor autograd saves inside
  ``fn`` is replaced by a tiny :class:`_Holder` (its shape, dtype and device are noted
  for the recompute check).  The outer offload engine sees none of these saves.
- **Inputs.** Just before, the tensors found in ``args``/``kwargs`` (also inside
  tuples, lists and dicts) are saved by a no-op autograd function,
  :class:`_InputSaver`, under the hooks active at the call -- the offload engine's when
  ``offloaded_checkpoint`` runs inside its context.  So the inputs are the only bytes
  that travel, and nothing else holds them: the saver node's saved values are whatever
  the outer hooks packed (a host copy when offloaded), read back through that node at
  recompute time.
- **Backward.** The first unpack of a holder whose value is missing recomputes ``fn``
  once: inputs read back through the saver node, the CPU and CUDA RNG states captured
  before the forward restored (so dropout masks match), the forward's autocast state
  re-entered, and our recompute hooks fill every live holder in save order, checking
  shape/dtype/device against the forward.  Recomputation stops as soon as the last saved
  tensor is recomputed.  Each unpack hands its value over and empties the holder, so the
  recomputed tensors live only until their node has used them; a later backward through
  the same graph (``retain_graph=True``) finds empty holders and recomputes again.
- **Errors.** A recomputation that saves more or fewer tensors, or tensors of another
  shape/dtype/device, raises ``torch.utils.checkpoint.CheckpointError`` (torch's own
  class).  A second backward without ``retain_graph`` raises autograd's usual error
  (the holders were released with the graph's buffers).
- **Lifetime rule.** The saver's saved inputs live exactly as long as the frame, and
  the frame as long as any tensor ``fn`` saved is still held by the graph:

  * The frame owns the saver's *output* (an empty CPU tensor), and a tensor owns its
    ``grad_fn``.  Holding only the node's Python object (``out.grad_fn``) is not enough:
    in torch 2.11 (and the other releases from before the Python object of a custom
    function owned its node) that object holds its node weakly, so the node died with
    its output tensor right after the forward and freed its saved tensors on the way;
    the recomputation then raised "backward through the graph a second time".  torch
    2.13 made the Python object own its node, which hid this on 2.13.
  * The saver node is never run: its output feeds nothing, so no backward -- with or
    without ``retain_graph``, through ``backward`` or through ``torch.autograd.grad``
    of any subset of inputs -- reaches it, and the engine never releases its saved
    values.  So whichever order the engine runs ``fn``'s nodes in (the CPU thread and
    each device thread keep their own ready queues), the inputs are still there when
    the first unpack recomputes.
  * The frame is referenced only by the unpack hooks of the holders, i.e. by the
    SavedVariables of ``fn``'s nodes.  A backward without ``retain_graph`` releases each
    node's saved values after it runs; once the last of them is gone (or the graph is
    dropped, or a partial ``autograd.grad`` leaves the unrun nodes to be dropped with
    it), the frame, the saver's output, the saver node and the (offloaded) inputs go
    together.  With ``retain_graph=True`` the holders stay, so does the frame, and a
    second backward recomputes from the same inputs.
  * No cycle: the saver's saved values (the inputs, or the outer hooks' packed
    handles) reference only the graph *before* the call, never ``fn``'s nodes; for a
    nested checkpoint, the inner saver's saved values are outer holders, which point
    at the outer frame, never the other way.

Nested checkpoints work as torch's do: an inner checkpoint's inputs are saved by its
saver under the outer checkpoint's holders, so reading them recomputes the outer
function first.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, List, Optional

import torch
from torch.utils.checkpoint import CheckpointError, get_device_states, set_device_states

__all__ = ["offloaded_checkpoint"]


# ----------------------------------------------------------------- nested arguments
class _Slot:
    """Placeholder for the ``index``-th tensor of a checkpoint's arguments."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _strip(obj: Any, tensors: List[torch.Tensor]) -> Any:
    """``obj`` with every tensor (also inside tuples, lists and dicts) replaced by a
    :class:`_Slot`; the tensors are appended to ``tensors``.  Other objects are kept as
    they are (a tensor inside an arbitrary object is not found, as in torch)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, (list, tuple)):
        items = [_strip(o, tensors) for o in obj]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return type(obj)((k, _strip(v, tensors)) for k, v in obj.items())
    return obj


def _fill(obj: Any, tensors) -> Any:
    """Inverse of :func:`_strip`: the slots replaced by ``tensors``."""
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, (list, tuple)):
        items = [_fill(o, tensors) for o in obj]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return type(obj)((k, _fill(v, tensors)) for k, v in obj.items())
    return obj


# ---------------------------------------------------------------- autocast and RNG
def _autocast_state() -> list:
    """``[(device_type, enabled, dtype, cache_enabled)]`` of CPU and CUDA autocast."""
    state = [("cpu", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
              torch.is_autocast_cache_enabled())]
    if torch.cuda.is_available():
        state.append(("cuda", torch.is_autocast_enabled("cuda"),
                      torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled()))
    return state


def _autocast_contexts(state: list) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type, enabled, dtype, cache in state:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                           cache_enabled=cache))
    return stack


# -------------------------------------------------------------------- the pieces
class _InputSaver(torch.autograd.Function):
    """No-op whose only job is ``save_for_backward(*inputs)`` under the hooks active at
    the call (the offload engine's, when one is).  Its output feeds nothing, so its
    backward never runs: the frame keeps the output -- which owns the node, in every
    torch version -- and reads ``output.grad_fn.saved_tensors`` to recompute.
    ``anchor`` (an empty tensor that requires grad) makes autograd create the node even
    when no input requires grad."""

    @staticmethod
    def forward(ctx, anchor, *inputs):
        ctx.save_for_backward(*inputs)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the output is never used
        return (None,) * len(ctx.needs_input_grad)


class _Holder:
    """Stands in for one tensor saved inside ``fn``: empty from the forward until a
    recomputation fills it, emptied again by the unpack that hands the value over."""
    __slots__ = ("value", "__weakref__")

    def __init__(self):
        self.value: Optional[torch.Tensor] = None


class _Stop(Exception):
    """Raised by a recompute pack hook once the last saved tensor is recomputed."""

    def __init__(self, frame):
        super().__init__()
        self.frame = frame


def _meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


class _Frame:
    """One call of :func:`offloaded_checkpoint`: what the recomputation needs.

    Held only by the hooks of the tensors ``fn`` saved, so it (and through the saver's
    output, its node and the offloaded inputs) is freed with the graph's buffers: see
    "Lifetime rule" in the module docstring."""

    def __init__(self, fn: Callable, template: Any, tensors: List[torch.Tensor]):
        self.fn, self.template = fn, template
        self.holders: List[weakref.ref] = []      # one per tensor saved in the forward
        self.metas: List[tuple] = []
        self.forward_done = False
        self.cpu_rng = torch.get_rng_state()
        self.had_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.devices, self.device_states = get_device_states(*tensors) if self.had_cuda else ([], [])
        self.autocast = _autocast_state()
        anchor = torch.empty(0, requires_grad=True)
        # The output, not just its grad_fn: in torch 2.11 ``grad_fn`` holds the node
        # weakly, and the node frees the saved inputs when its output dies.
        self.saved = _InputSaver.apply(anchor, *tensors)

    # -- forward: fn's saves become holders
    def pack(self, t: torch.Tensor) -> _Holder:
        holder = _Holder()
        self.holders.append(weakref.ref(holder))
        self.metas.append(_meta(t))
        return holder

    def unpack(self, holder: _Holder) -> torch.Tensor:
        if holder.value is None:
            self.recompute()
        value, holder.value = holder.value, None
        return value

    # -- backward: refill the holders
    def recompute(self) -> None:
        if not self.forward_done:
            raise RuntimeError("offloaded_checkpoint: a backward inside the checkpointed function "
                               "(through a tensor it saved) is not supported; use "
                               "torch.utils.checkpoint for that function")
        args, kwargs = _fill(self.template, self.saved.grad_fn.saved_tensors)
        count = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal count
            index, count = count, count + 1
            if index >= len(self.holders):
                raise CheckpointError(
                    "offloaded_checkpoint: the recomputation saved more tensors than the "
                    f"forward ({len(self.holders)}); the checkpointed function must run the same "
                    "operations both times")
            t = t.detach()
            if _meta(t) != self.metas[index]:
                raise CheckpointError(
                    f"offloaded_checkpoint: saved tensor {index} differs between the forward and "
                    f"the recomputation: (shape, dtype, device) {self.metas[index]} vs {_meta(t)}")
            holder = self.holders[index]()
            if holder is not None:        # None: that part of the graph is already freed
                holder.value = t
            if count == len(self.holders):
                raise _Stop(self)         # everything needed is recomputed: stop early
            return t

        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu_rng)
            if self.had_cuda:
                set_device_states(self.devices, self.device_states)
            try:
                with torch.enable_grad(), _autocast_contexts(self.autocast), \
                        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    self.fn(*args, **kwargs)
            except _Stop as stop:
                if stop.frame is not self:
                    raise
                return
        raise CheckpointError(
            "offloaded_checkpoint: the recomputation saved fewer tensors than the forward "
            f"({count} vs {len(self.holders)}); the checkpointed function must run the same "
            "operations both times")


def offloaded_checkpoint(fn: Callable, *args: Any, **kwargs: Any):
    """Checkpoint ``fn(*args, **kwargs)`` (non-reentrant): keep only its tensor inputs --
    through the offload hooks when a context is active -- and recompute ``fn`` in backward.

    ``fn`` runs with grad recording, so outputs and values leaving by side channels
    (forward hooks, attributes) keep their graph; what ``fn`` saves for backward is
    recomputed instead of stored.  Tensors may be passed positionally or by keyword, also
    inside tuples, lists and dicts; parameters used by ``fn`` get their gradients whether
    or not any argument requires grad.  The recomputation runs under the CPU/CUDA RNG
    state and the autocast state of the forward, so gradients are bitwise equal to
    running ``fn`` without checkpointing, given a deterministic ``fn``.  Under
    ``torch.no_grad`` this is just ``fn(*args, **kwargs)``.

    Raises ``torch.utils.checkpoint.CheckpointError`` when the recomputation saves a
    different number of tensors, or tensors of another shape, dtype or device (e.g. a
    Hugging Face layer called with a KV cache, which the recomputation appends to again:
    call the model with ``use_cache=False``).  Unsupported (a clear ``RuntimeError``): a
    backward inside ``fn`` through tensors ``fn`` itself saved.
    """
    if not callable(fn):
        raise TypeError(f"offloaded_checkpoint: fn must be callable, got {type(fn).__name__}")
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    tensors: List[torch.Tensor] = []
    template = _strip((args, kwargs), tensors)
    frame = _Frame(fn, template, tensors)
    del tensors
    with torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack):
        out = fn(*args, **kwargs)
    frame.forward_done = True
    if not frame.had_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("offloaded_checkpoint: CUDA was initialized inside the checkpointed "
                           "function, so its RNG state could not be saved; initialize CUDA before")
    return out
