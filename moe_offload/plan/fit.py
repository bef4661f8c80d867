"""``fit``: one call that sizes a plan to the device -- no budget to guess.

The step's whole peak on the device is::

    parameters + gradients + optimizer state        (static: held across steps)
    + max(activation peak of forward/backward,      (what plan_memory's budget bounds)
          optimizer.step()'s temporaries)           (after the backward: activations are gone)
    + the allocator's reserve                       (fragmentation; see RESERVE below)

:func:`step_budget` does this arithmetic from the model and the optimizer alone (no step is
run); :func:`fit` measures the model (:func:`~moe_offload.plan.memory_plan.measure_model`),
plans the fastest mix whose predicted activation peak fits what is left and whose pinned host
bytes fit the host's available memory, applies it and returns the handle.

Optimizer state is counted as it is after the optimizer's first step: the state tensors it
already holds on the device, else what its class allocates per trainable parameter (Adam,
AdamW, NAdam, RAdam, Adamax: two tensors of the parameter's size and dtype, three with
``amsgrad``; SGD with momentum, Adagrad, RMSprop: one, two for centered RMSprop or
momentum+centered; an unknown class: two, and the budget says it guessed).  ``step()``'s
temporaries: a ``foreach`` implementation (torch's default on CUDA) holds a parameter-sized
tensor per trainable parameter while it updates (Adam's ``sqrt(exp_avg_sq)``), a single-tensor
loop the largest one, a ``fused`` one nothing measurable (Hugging Face ``Trainer``'s default
``adamw_torch_fused``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..offload import release_lag
from .memory_plan import MemoryPlan, PlanHandle, candidates, choose, measure_model
from .modules import find_layers
from .solve import predict

__all__ = ["fit", "step_budget", "StepBudget", "FitHandle", "RESERVE_FRACTION", "RESERVE_MIN_BYTES",
           "HOST_FRACTION", "host_available_bytes"]

GiB = float(1 << 30)


def _size(n: float) -> str:
    """Bytes in the unit that reads best."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"

#: The allocator's reserve: this share of the device's memory, at least RESERVE_MIN_BYTES.
#: It covers the caching allocator's fragmentation (blocks cached in sizes the next request
#: cannot use) and library workspaces allocated outside the measured step.  Measured on the
#: H200 runs of the main job (docs/performance.md): reserved minus allocated at the peak
#: stayed under 2% of the card with ``expandable_segments`` off.
RESERVE_FRACTION = 0.03
RESERVE_MIN_BYTES = 1 << 30

#: The share of the host's available memory (``MemAvailable``) that pinned buffers may
#: take: pinned pages cannot be swapped, and the rest of the process (data loading, the
#: Python heap) needs room too.
HOST_FRACTION = 0.8

_STATES_PER_PARAM = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "SGD": 0,
                     "Adagrad": 1, "RMSprop": 1, "Adadelta": 2, "ASGD": 2, "Rprop": 2}


@dataclass
class StepBudget:
    """The whole-step arithmetic of :func:`fit` (bytes).  ``activation_budget_bytes`` is
    what is left for the activation peak (``plan_memory``'s ``budget_bytes``)."""
    device_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    optimizer_step_bytes: int
    reserve_bytes: int
    host_bytes: Optional[int]
    optimizer_guessed: bool = False

    @property
    def static_bytes(self) -> int:
        """Held across steps: parameters and buffers, gradients, optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def activation_budget_bytes(self) -> int:
        """What the step's activation peak may use."""
        return self.device_bytes - self.static_bytes - self.reserve_bytes

    def whole_step_peak(self, activation_peak_bytes: int) -> int:
        """The step's predicted peak on the device for a given activation peak (the
        reserve not included: it is slack, not allocated)."""
        return self.static_bytes + max(activation_peak_bytes, self.optimizer_step_bytes)

    def describe(self) -> str:
        """One line per term, in GiB."""
        guess = " (class not known: two states per parameter assumed)" if self.optimizer_guessed else ""
        host = "no limit" if self.host_bytes is None else f"{_size(self.host_bytes)}"
        return "\n".join([
            f"device memory           {_size(self.device_bytes):>12}",
            f"- parameters, buffers   {_size(self.param_bytes):>12}",
            f"- gradients             {_size(self.grad_bytes):>12}",
            f"- optimizer state       {_size(self.optimizer_bytes):>12}{guess}",
            f"- allocator reserve     {_size(self.reserve_bytes):>12}",
            f"= activation peak budget {_size(self.activation_budget_bytes):>11} "
            f"(optimizer step temporaries {_size(self.optimizer_step_bytes)})",
            f"pinned host memory for offload: {host}"])


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _optimizer_bytes(optimizer, device: torch.device) -> tuple:
    """``(state bytes, guessed)`` as after the first step."""
    if optimizer is None:
        return 0, False
    total, guessed = 0, False
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state.get(p, {})
            held = [v for v in state.values() if isinstance(v, torch.Tensor) and v.device == device
                    and v.dim() > 0]
            if held:
                total += sum(_tensor_bytes(v) for v in held)
                continue
            name = type(optimizer).__name__
            n = _STATES_PER_PARAM.get(name)
            if n is None:
                n, guessed = 2, True
            if name in ("Adam", "AdamW") and group.get("amsgrad"):
                n = 3
            if name == "SGD" and group.get("momentum", 0):
                n = 1
            if name == "RMSprop":
                n = 1 + bool(group.get("momentum", 0)) + bool(group.get("centered"))
            total += n * _tensor_bytes(p)
    return total, guessed


def _step_temporaries(optimizer, device: torch.device) -> int:
    """Bytes ``optimizer.step()`` allocates while it runs: a ``fused`` implementation
    nothing measurable; a single-tensor loop (``foreach=False``) one parameter-sized
    temporary at a time (the largest); ``foreach`` (torch's default on CUDA) one per
    trainable parameter at once."""
    if optimizer is None:
        return 0
    total = 0
    for group in optimizer.param_groups:
        sizes = [_tensor_bytes(p) for p in group["params"] if p.requires_grad and p.device == device]
        if not sizes or group.get("fused"):
            continue
        total += max(sizes) if group.get("foreach") is False else sum(sizes)
    return total


def host_available_bytes() -> Optional[int]:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def step_budget(model: nn.Module, optimizer=None, *, device_memory_bytes: Optional[int] = None,
                reserve_bytes: Optional[int] = None,
                host_memory_bytes: Optional[int] = None) -> StepBudget:
    """The whole-step arithmetic (no step run): see the module docstring.

    ``device_memory_bytes``: the memory the step may use in all (default on CUDA: what
    this process can hold, free memory plus what torch's allocator already reserved;
    required on the CPU).  ``reserve_bytes``: default ``max(RESERVE_MIN_BYTES,
    RESERVE_FRACTION x device)``.  ``host_memory_bytes``: pinned bytes allowed (default
    ``HOST_FRACTION`` x the host's available memory; ``None`` where it cannot be read)."""
    params = list(model.parameters())
    if not params:
        raise ValueError("step_budget: the model has no parameters")
    device = params[0].device
    if device_memory_bytes is None:
        if device.type != "cuda":
            raise ValueError("step_budget: give device_memory_bytes for a model that is not on a "
                             "CUDA device")
        free, _ = torch.cuda.mem_get_info(device)
        device_memory_bytes = free + torch.cuda.memory_reserved(device)
    if device_memory_bytes <= 0:
        raise ValueError(f"device_memory_bytes must be > 0, got {device_memory_bytes}")
    seen = set()
    param_bytes = grad_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device != device:
            continue
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        param_bytes += t.untyped_storage().nbytes()
        if isinstance(t, nn.Parameter) and t.requires_grad:
            grad_bytes += _tensor_bytes(t)
    opt_bytes, guessed = _optimizer_bytes(optimizer, device)
    if reserve_bytes is None:
        reserve_bytes = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * device_memory_bytes))
    if host_memory_bytes is None:
        avail = host_available_bytes()
        host_memory_bytes = None if avail is None else int(HOST_FRACTION * avail)
    step_tmp = _step_temporaries(optimizer, device)
    return StepBudget(int(device_memory_bytes), param_bytes, grad_bytes, opt_bytes, step_tmp,
                      int(reserve_bytes), host_memory_bytes, guessed)


class FitHandle(PlanHandle):
    """An applied plan sized by :func:`fit`: ``plan`` (the :class:`MemoryPlan`), ``budget``
    (the :class:`StepBudget`), ``stats()`` (the engine's counters and the predictions,
    plus ``predicted_step_peak_bytes``), ``reset_stats()``, ``remove()``."""

    def __init__(self, plan: MemoryPlan, budget: StepBudget) -> None:
        super().__init__(plan)
        self.budget = budget

    @property
    def predicted_step_peak_bytes(self) -> int:
        """Parameters, gradients, optimizer state and the activation peak."""
        return self.budget.whole_step_peak(self.plan.predicted_peak_bytes)

    def stats(self) -> dict:
        out = super().stats()
        out["predicted_step_peak_bytes"] = self.predicted_step_peak_bytes
        return out

    def describe(self) -> str:
        """The budget arithmetic and the plan."""
        return self.budget.describe() + "\n" + self.plan.describe() + \
            f"\npredicted whole-step peak: {_size(self.predicted_step_peak_bytes)} of " \
            f"{_size(self.budget.device_bytes)}"


def _what_fits(f, cands, budget: StepBudget, host: Optional[int]) -> Optional[str]:
    """The tokens per step whose least peak fits, as words (``None``: not even 1/64 of
    this batch).  The peak is close to linear in tokens, so the plans that reach the least
    peaks here are re-predicted on ``ModelFigures.scaled(r)`` and ``r`` is bisected."""
    low = sorted((c for c in cands if host is None or sum(c.moved_bytes) <= host),
                 key=lambda c: c.peak_bytes)[:24]
    if not low:
        return None
    limit = budget.activation_budget_bytes

    def least(r: float) -> int:
        g = f.scaled(r)
        return min(predict(g, list(c.choices), release_lag, head=c.head, peak_limit=limit).peak_bytes
                   for c in low)
    lo, hi = 1 / 64, 1.0
    if least(lo) > limit:
        return None
    for _ in range(10):
        mid = (lo + hi) / 2
        if least(mid) <= limit:
            lo = mid
        else:
            hi = mid
    if f.tokens:
        return (f"about {int(lo * f.tokens)} tokens per step would fit (this batch has "
                f"{f.tokens}: {lo:.0%} of it)")
    return f"about {lo:.0%} of this batch's tokens would fit"


def fit(model: nn.Module, step_fn: Callable[[], torch.Tensor], optimizer=None, *,
        device_memory_bytes: Optional[int] = None, host_memory_bytes: Optional[int] = None,
        reserve_bytes: Optional[int] = None, layers=None, exact: bool = False,
        min_offload_bytes: int = 256 * 1024, emulate: Optional[bool] = None,
        options: Optional[Sequence[str]] = None, iters: int = 2, warmup: int = 1,
        calibrate: Optional[bool] = None, figures: Optional[tuple] = None,
        scale: float = 1.0) -> FitHandle:
    """Measure ``model``, plan the fastest mix whose whole-step peak fits the device and
    whose pinned host bytes fit the host, apply it, and return the :class:`FitHandle`.

    Args:
        model: the model, on its device.
        step_fn: ``step_fn() -> loss``, one forward on a batch of the size you train on.
        optimizer: its state counts (as after its first step); ``None``: no state.
        device_memory_bytes: the memory the step may use (default: what this process can
            hold on the model's CUDA device; required on the CPU).
        host_memory_bytes: pinned host bytes the plan may fill (default: ``HOST_FRACTION``
            of the host's available memory).
        reserve_bytes: the allocator's reserve (default: see ``RESERVE_FRACTION``).
        layers: the decoder layers (default: found).
        exact: only options that keep gradients bitwise (no chunked loss).
        min_offload_bytes, emulate, options, iters, warmup, calibrate: as for
            :func:`~moe_offload.plan_memory`.
        figures: ``(layers, ModelFigures)`` measured before (e.g. on a shorter batch:
            then give ``scale``); skips measuring.
        scale: the figures are for ``1/scale`` of this step's tokens: they are scaled by
            ``scale`` (:meth:`ModelFigures.scaled`) before planning.

    Raises:
        ValueError: nothing fits; the message says how many bytes are missing and what
            would fit (the tokens per step whose least peak fits).  Nothing is installed.
    """
    budget = step_budget(model, optimizer, device_memory_bytes=device_memory_bytes,
                         reserve_bytes=reserve_bytes, host_memory_bytes=host_memory_bytes)
    if budget.activation_budget_bytes <= 0 or budget.optimizer_step_bytes > budget.activation_budget_bytes:
        need = budget.static_bytes + budget.reserve_bytes + budget.optimizer_step_bytes
        raise ValueError(
            f"fit: the weights, gradients, optimizer state (and its step's temporaries) and the "
            f"allocator reserve alone need {_size(need)} of {_size(budget.device_bytes)}: "
            f"{_size(need - budget.device_bytes)} are missing before any activation\n"
            + budget.describe())
    cuda = next(model.parameters()).is_cuda
    emulate = (not cuda) if emulate is None else emulate
    if figures is None:
        figures = measure_model(model, step_fn, find_layers(model, layers),
                                min_offload_bytes=min_offload_bytes, options=options, iters=iters,
                                warmup=warmup, emulate=emulate, calibrate=calibrate)
    layer_list, f = figures
    if scale != 1.0:
        f = f.scaled(scale)
    act_budget = budget.activation_budget_bytes
    cands = candidates(f, act_budget, exact=exact)
    try:
        plan = choose(model, layer_list, f, cands, act_budget, min_offload_bytes=min_offload_bytes,
                      emulate=emulate, exact=exact, host_bytes=budget.host_bytes)
    except ValueError:
        host = budget.host_bytes
        ok = [c for c in cands if host is None or sum(c.moved_bytes) <= host] or cands
        low = min(ok, key=lambda c: c.peak_bytes)
        fits = _what_fits(f, cands, budget, host)
        raise ValueError(
            f"fit: no plan fits: the least whole-step peak is "
            f"{_size(budget.whole_step_peak(low.peak_bytes))} (activation peak "
            f"{_size(low.peak_bytes)}, set by the {low.peak_moment}) against "
            f"{_size((budget.device_bytes - budget.reserve_bytes))} usable: "
            f"{_size((low.peak_bytes - act_budget))} are missing. "
            + (f"At this batch, {fits}." if fits else "Not even 1/64 of this batch fits.")
            + "\n" + budget.describe()) from None
    handle = FitHandle(plan, budget)
    try:
        plan._install(handle)
    except Exception:
        handle.remove()
        raise
    return handle
