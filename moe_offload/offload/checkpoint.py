"""``offloaded_checkpoint``: activation checkpointing whose inputs go through offload.

The forward runs ``fn`` under ``no_grad`` and saves only the tensor inputs with
``save_for_backward``, so an active offload context moves them to the host (the
offload + recompute strategy: one input per layer travels, the rest is recomputed).
The backward reloads the inputs, restores the CPU and CUDA RNG states captured before
the forward (so dropout masks match) and the forward's autocast state (so the same
function is recomputed), re-runs ``fn`` with grad and back-propagates through it, like
torch's reentrant checkpoint.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = ["offloaded_checkpoint", "is_recomputing", "in_checkpoint_forward"]


_RECOMPUTING = threading.local()


def is_recomputing() -> bool:
    """True while :func:`offloaded_checkpoint` re-runs a function in backward.

    Modules that publish a value from their forward as an attribute (``MoE.aux_loss``)
    use it to keep the forward's value: a recomputed graph stored on a module would keep
    the recomputation's inputs and their gradients alive until the next forward."""
    return getattr(_RECOMPUTING, "depth", 0) > 0


def in_checkpoint_forward() -> bool:
    """True while :func:`offloaded_checkpoint` runs a function's (no-grad) forward."""
    return getattr(_RECOMPUTING, "forward_depth", 0) > 0


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


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.had_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        ctx.devices, ctx.device_states = [], []
        if ctx.had_cuda:
            ctx.devices, ctx.device_states = get_device_states(*args)
        # The recomputation must run the same function: same autocast state as now.
        ctx.autocast = _autocast_state()
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_pos])
        _RECOMPUTING.forward_depth = getattr(_RECOMPUTING, "forward_depth", 0) + 1
        try:
            with torch.no_grad():
                return fn(*args)
        finally:
            _RECOMPUTING.forward_depth -= 1

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        args = list(ctx.args)
        inputs = []
        for k, (pos, t) in enumerate(zip(ctx.tensor_pos, saved)):
            x = t.detach()
            x.requires_grad_(ctx.needs_input_grad[pos + 1])
            args[pos] = x
            inputs.append(x)
        with torch.random.fork_rng(devices=ctx.devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.had_cuda:
                set_device_states(ctx.devices, ctx.device_states)
            _RECOMPUTING.depth = getattr(_RECOMPUTING, "depth", 0) + 1
            try:
                with torch.enable_grad(), _autocast_contexts(ctx.autocast):
                    outputs = ctx.fn(*args)
            finally:
                _RECOMPUTING.depth -= 1
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        result = [None] * (len(ctx.args) + 1)
        for pos, x in zip(ctx.tensor_pos, inputs):
            result[pos + 1] = x.grad if x.requires_grad else None
        return tuple(result)


def offloaded_checkpoint(fn, *args: Any):
    """Checkpoint ``fn(*args)``: save only the tensor inputs (through the offload hooks
    when a context is active), recompute ``fn`` in backward with the same RNG state.

    Gradients are bitwise equal to running ``fn`` without checkpointing, given a
    deterministic ``fn``.  Parameters used by ``fn`` receive their gradients during the
    recomputation's inner backward.
    """
    if not callable(fn):
        raise TypeError(f"offloaded_checkpoint: fn must be callable, got {type(fn).__name__}")
    return _OffloadedCheckpoint.apply(fn, *args)
