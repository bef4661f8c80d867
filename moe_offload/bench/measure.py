"""The bench's row measurements: step timing, activation and peak memory, grads.

Everything here is strategy-agnostic: a step is given as two callables, ``forward() -> y``
and ``backward(y)`` (the rows pass ``step() -> loss`` and ``loss.backward()``; a stack's
loss is :func:`loss_with_grad`, whose backward is ``y.backward(dy)``).  What the planner measures too (copy
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
           "measure_memory", "allocate_grads", "grads_of", "grads_bitwise_equal", "max_rel_error",
           "trace_memory", "CHECK_MODES", "deterministic_check", "check_attention_backends",
           "check_step", "first_check_step"]

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
        # Attributes, not saved tensors: no hook sees them.  ``y`` is held until the
        # backward, as a loss holds its input: the output counts in the step's memory.
        ctx.dy, ctx.y = dy, y
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        dy, ctx.dy, ctx.y = ctx.dy, None, None
        return dy, None


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
def grads_of(params: Sequence[torch.Tensor], to_cpu: bool = True) -> list:
    """Each tensor's ``.grad`` (``None`` kept as ``None``), copied to the host (``to_cpu``:
    keeps device memory figures clean) or cloned."""
    return [None if t.grad is None else (t.grad.detach().to("cpu", copy=True) if to_cpu
                                         else t.grad.detach().clone()) for t in params]


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


def max_rel_error(got: list, ref: list) -> float:
    """``max |got - ref| / max |ref|`` over every gradient (float64)."""
    num = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got, ref)
               if a is not None and b is not None), default=0.0)
    den = max((float(b.double().abs().max()) for b in ref if b is not None), default=0.0)
    return num / den if den else num


# ------------------------------------------------------------------------ check steps
# Bitwise gradients: a row's gradients come from one *check* step under
# deterministic_check: strict torch.use_deterministic_algorithms(True) (warn_only=False:
# with warn_only torch 2.11 warns and still runs cuDNN attention's non-deterministic
# backward, which made every row of the first H200 run read NO), CUBLAS_WORKSPACE_CONFIG
# set before cuBLAS starts, SDPA limited to flash attention (deterministic backward in
# strict mode) or math, and integer histc exempted (exact in any order).  A step that
# raises in strict mode (an op without a deterministic kernel) is retried in "math" mode.

class _IntegerHistc(torch.overrides.TorchFunctionMode):
    """Lets ``torch.histc`` on *integer* input run in strict deterministic mode.

    torch flags ``histc`` on CUDA as non-deterministic for every dtype (float bins are
    atomic float adds), so strict mode raises on Hugging Face's expert counts (its
    ``grouped_mm`` experts and the router aux loss count tokens per expert with an int32
    ``histc``).  Integer atomic adds give the same counts in any order: the result is
    bitwise reproducible, so the flag is lifted for exactly that call.  The mode is part
    of autograd's thread-local state, so it also covers recomputation in backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.histc, torch.Tensor.histc) and args and \
                isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            torch.use_deterministic_algorithms(False)
            try:
                return func(*args, **kwargs)
            finally:
                torch.use_deterministic_algorithms(True, warn_only=False)
        return func(*args, **kwargs)


def check_attention_backends(cuda: bool) -> list:
    """The SDPA backends a strict check step allows: on CUDA flash attention (whose backward
    takes its deterministic kernel under strict deterministic mode; torch 2.11's cuDNN
    attention backward has no such switch) with math as the fallback; on the CPU every
    backend (the CPU kernels are deterministic)."""
    from torch.nn.attention import SDPBackend
    if cuda:
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    return [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b is not None]


CHECK_MODES = ("strict", "math")


@contextlib.contextmanager
def deterministic_check(cuda: bool, mode: str = "strict"):
    """The context of a check step.

    ``"strict"``: ``torch.use_deterministic_algorithms(True)`` with ``warn_only=False``,
    integer ``histc`` exempted, SDPA limited to :func:`check_attention_backends`.
    ``"math"`` (the fallback when a strict step raised): deterministic algorithms with
    ``warn_only=True`` and SDPA limited to the math backend.  cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` set before it starts (the CLI sets ``:4096:8`` first
    thing); it is checked here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    if cuda and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        raise RuntimeError("deterministic check: CUBLAS_WORKSPACE_CONFIG must be :4096:8 or "
                           ":16:8 before CUDA starts (python -m moe_offload sets it)")
    old = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    strict = mode == "strict"
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    backends = check_attention_backends(cuda) if strict else [SDPBackend.MATH]
    try:
        with sdpa_kernel(backends), (_IntegerHistc() if strict else contextlib.nullcontext()):
            yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def check_step(step: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], cuda: bool,
               mode: str = "strict") -> list:
    """One seeded step under :func:`deterministic_check` -> the gradients, on the host."""
    for p in params:
        p.grad = None
    torch.manual_seed(1234)
    with deterministic_check(cuda, mode):
        loss = step()
        loss.backward()
    del loss
    return grads_of(params)


def first_check_step(step, params, cuda: bool) -> tuple:
    """``(grads, mode, errors)``: the first check mode whose step does not raise
    (``(None, None, errors)`` when every mode raised)."""
    errors = []
    for mode in CHECK_MODES:
        try:
            return check_step(step, params, cuda, mode), mode, errors
        except RuntimeError as e:
            errors.append(f"{mode}: {type(e).__name__}: {e}"[:200])
            for p in params:
                p.grad = None
    return None, None, errors
