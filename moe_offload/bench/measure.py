"""The bench's row measurements: step timing, activation and peak memory, grads.

Everything here is strategy-agnostic: a *step* is ``forward(x) -> y`` then
``y.backward(dy)``, given as two callables.  What the planner measures too (copy
bandwidth, saved bytes, step timing) is :mod:`moe_offload.plan.measure`'s; this module
adds what only rows need: one step's activation memory and peak (below), the memory
trace of a step, and the bitwise check of gradients.

Memory on CUDA is ``torch.cuda.memory_allocated`` (activation memory = allocated after
forward minus before forward) and ``max_memory_allocated`` after a reset (peak).  On the
CPU there is no device allocator to ask, so the same two figures come from the
profiler's per-op memory accounting (``profile_memory=True``): the net host bytes the
forward left allocated, and the running maximum over the step.  On the CPU, offloading
"to the host" cannot lower host memory, so CPU memory figures only check the plumbing.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..plan.measure import time_step

__all__ = ["StepTimes", "RowMemory", "MemoryMeasurementError", "time_steps", "loss_with_grad",
           "measure_memory", "allocate_grads", "capture_grads", "grads_bitwise_equal",
           "trace_memory"]

MiB = 1 << 20


# ----------------------------------------------------------------------------- timing
@dataclass
class StepTimes:
    """Median seconds of the timed steps: forward, backward, whole step; every step's."""
    fwd_s: float
    bwd_s: float
    step_s: float
    all_step_s: list = field(default_factory=list)


class _Pending:
    """A forward's output waiting for its backward: ``backward()`` runs ``backward(y)`` (so
    a step given as two callables runs where a loss is expected)."""

    def __init__(self, y, backward: Callable[[torch.Tensor], None]):
        self.y, self.run = y, backward

    def backward(self) -> None:
        y, self.y = self.y, None
        self.run(y)


def time_steps(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None],
               iters: int, cuda: bool, before_step: Callable[[], None] = lambda: None) -> StepTimes:
    """Run ``iters`` steps, each ``before_step()``, ``y = forward()``, ``backward(y)``, timed by
    :func:`moe_offload.plan.measure.time_step` (CUDA events; the host clock on the CPU)."""
    t = time_step(nn.ModuleList(), lambda: _Pending(forward(), backward), iters, 0, cuda,
                  before_step)
    return StepTimes(t.fwd_s, t.bwd_s, t.step_s, list(t.step_samples))


class _OutputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dy):
        ctx.dy = dy                  # an attribute, not a saved tensor: no hook sees it
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.dy, None


def loss_with_grad(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """A scalar whose ``backward()`` is ``y.backward(dy)`` (bitwise: ``y``'s gradient is
    ``dy`` itself), for code that expects a loss (the planner's ``step_fn``)."""
    return _OutputGrad.apply(y, dy)


# ----------------------------------------------------------------------------- memory
@dataclass
class RowMemory:
    """A row's activation memory (after forward minus before) and peak over the step, bytes
    (the planner's moment-by-moment record is :class:`moe_offload.plan.measure.StepMemory`).

    ``peak_bytes`` is absolute on CUDA (weights included) and relative to the step start
    on the CPU; ``base_bytes`` is what was allocated when the step began."""
    act_bytes: int
    peak_bytes: int
    base_bytes: int
    source: str


_FWD_END = "moe_offload.bench.forward_end"


@contextlib.contextmanager
def _without_kineto_notices():
    """Drop the ``USDT:... profiler_start`` / ``profiler_stop`` lines that Kineto (the
    profiler's C++ back end) writes to file descriptor 2 when a profile starts and stops;
    anything else written meanwhile is passed on to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = [line for line in tmp.read().splitlines(keepends=True)
                    if not line.startswith(b"USDT:")]
            if rest:
                os.write(2, b"".join(rest))


def _cpu_profiled_step(forward: Callable[[], torch.Tensor],
                       backward: Callable[[torch.Tensor], None]) -> tuple:
    """One profiled step -> ``(series, fwd_end_s)``: ``series`` is ``[(t_s, running net
    host bytes)]`` from the per-op self memory ordered by op start, ``fwd_end_s`` the
    time of a marker recorded between forward and backward."""
    from torch.profiler import ProfilerActivity, profile, record_function
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _without_kineto_notices():
        prof.start()
    try:
        y = forward()
        with record_function(_FWD_END):
            pass
        backward(y)
        del y
    finally:
        with _without_kineto_notices():
            prof.stop()
    events = list(prof.events())
    t0 = min((e.time_range.start for e in events), default=0)
    fwd_end = next((e.time_range.start for e in events if e.name == _FWD_END), t0)
    mem = sorted((e for e in events if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    running, series = 0, [(0.0, 0)]
    for e in mem:
        running += e.self_cpu_memory_usage
        series.append(((e.time_range.start - t0) / 1e6, running))
    return series, (fwd_end - t0) / 1e6


class MemoryMeasurementError(RuntimeError):
    """The activation figure is impossible (below the bytes the forward must leave alive)."""


def _check_act(act: int, min_act_bytes: int) -> None:
    if act < min_act_bytes:
        raise MemoryMeasurementError(
            f"activation memory {act / MiB:.1f} MiB is below the forward output's "
            f"{min_act_bytes / MiB:.1f} MiB: the forward freed memory retained from an earlier "
            "step (a graph or buffer kept past its backward), so this figure would understate "
            "the strategy's memory")


def measure_memory(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None],
                   cuda: bool, min_act_bytes: int = 0) -> RowMemory:
    """One step measuring activation and peak memory (see the module docstring).

    It starts from a clean state: whatever the previous step dropped is collected first
    (``gc.collect()``: graphs and modules can form reference cycles that only the
    collector frees), so the forward cannot free earlier memory and look smaller.
    Memory the previous step still *holds* (a graph stored on a module) can still be
    freed by this forward; ``min_act_bytes`` (the forward output's bytes, which the
    forward must leave allocated) catches that: a smaller figure raises
    :class:`MemoryMeasurementError` instead of being reported."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = forward()
        torch.cuda.synchronize()
        act = torch.cuda.memory_allocated() - base
        backward(y)
        del y
        torch.cuda.synchronize()
        _check_act(act, min_act_bytes)
        return RowMemory(act, torch.cuda.max_memory_allocated(), base, "torch.cuda.memory_allocated")
    series, fwd_end = _cpu_profiled_step(forward, backward)
    act = [b for t, b in series if t <= fwd_end][-1]
    peak = max(b for _, b in series)
    _check_act(int(act), min_act_bytes)
    return RowMemory(int(act), int(peak), 0, "cpu profiler (net host bytes)")


def allocate_grads(params) -> list:
    """Give every parameter without a gradient a zero one (as ``zero_grad(set_to_none=False)``
    leaves them), so a measured step's memory is activations, not the first allocation of
    the weight gradients.  Adding into zeros changes no gradient bit (``0 + g == g``).
    Returns the parameters that got one (to reset them to ``None`` afterwards)."""
    fresh = [p for p in params if p.grad is None]
    for p in fresh:
        p.grad = torch.zeros_like(p)
    return fresh


def trace_memory(layers: Sequence[torch.nn.Module], forward: Callable[[], torch.Tensor],
                 backward: Callable[[torch.Tensor], None], cuda: bool) -> dict:
    """Memory over one step sampled at layer boundaries: ``{"t_s", "bytes", "fwd_end_s"}``.

    CUDA: forward pre/post hooks on each layer and gradient hooks on each layer's output
    (they fire as that layer's backward begins) read ``memory_allocated`` after a
    synchronize (so the trace run is slower than a timed one; its shape is what matters).
    Parameter gradients are allocated before the step, so the trace is activation memory.
    CPU: the profiler's running net host bytes."""
    if not cuda:
        series, fwd_end = _cpu_profiled_step(forward, backward)
        return {"t_s": [p[0] for p in series], "bytes": [int(p[1]) for p in series],
                "fwd_end_s": fwd_end, "source": "cpu profiler"}

    # Parameter gradients exist before the step (as after the first step of training),
    # so the trace shows activation memory, not the weight gradients' first allocation.
    fresh = allocate_grads(p for layer in layers for p in layer.parameters() if p.requires_grad)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    samples = []

    def sample(*_):
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0, torch.cuda.memory_allocated() - base))

    def post_hook(_module, _inputs, output):
        sample()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda g: sample())

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda m, i: sample()))
        handles.append(layer.register_forward_hook(post_hook))
    try:
        sample()
        y = forward()
        sample()
        fwd_end = samples[-1][0]
        backward(y)
        del y
        sample()
    finally:
        for h in handles:
            h.remove()
        for p in fresh:
            p.grad = None
    return {"t_s": [s[0] for s in samples], "bytes": [int(s[1]) for s in samples],
            "fwd_end_s": fwd_end, "source": "torch.cuda.memory_allocated at layer boundaries"}


# ------------------------------------------------------------------------------ grads
def capture_grads(x: torch.Tensor, params: Sequence[torch.Tensor], to_cpu: bool = False) -> list:
    """``x.grad`` and each parameter's ``.grad`` (``None`` kept as ``None``), cloned, or
    copied to the host with ``to_cpu`` (keeps device memory figures clean)."""
    return [None if t.grad is None else (t.grad.detach().to("cpu", copy=True) if to_cpu else t.grad.detach().clone())
            for t in [x, *params]]


def grads_bitwise_equal(got: Sequence[Optional[torch.Tensor]],
                        ref: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when every gradient is bitwise equal (``torch.equal``; both ``None`` counts).

    ``ref`` may live on another device (it is moved one tensor at a time)."""
    if len(got) != len(ref):
        return False
    for a, b in zip(got, ref):
        if a is None or b is None:
            if a is not b:
                return False
        elif a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b.to(a.device)):
            return False
    return True
