"""Measure what the planner needs: saved bytes per layer and module kind, step and layer
times, and the pinned copy bandwidth.

Saved bytes are counted by saved-tensor hooks around one forward, deduplicated by storage
(the engine moves a storage once).  Each storage is filed under its savers: the set of
``(layer, kind)`` pairs whose modules saved it (the innermost classified module running
when it was packed; :mod:`.modules`).  Not counted: parameters and module buffers (and
views of them) and leaf inputs that require grad (the caller holds them: moving them frees
nothing; :meth:`MemoryPlan.apply` marks them not-offload).  Storages below the engine's
``min_offload_bytes`` are counted as unmovable.

Times: CUDA events on the GPU (``perf_counter`` on the CPU) around the whole step and at
each layer's forward boundaries.

Memory over the step (:class:`StepMemory`): on the GPU the caching allocator's own counters
(``memory_allocated`` / ``max_memory_allocated``, host-side: no sync) read at the step's
moments: forward end, the start of each layer's backward (a hook on the gradient of the
layer's output) and the end of the backward; between two moments the peak counter is reset,
so each phase has its own high-water mark.  On the CPU there is no allocator to ask: the
same record is filled from counted saved bytes (:func:`counted_memory`).

Every measurement leaves the model as it found it (:func:`preserved_state`): parameter
``.grad`` (``None`` stays ``None``, a half-done accumulation is kept), the CPU and CUDA RNG
states, buffers and each module's training mode.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import weakref
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..offload import first_grad_tensor
from .modules import layer_modules

__all__ = ["SavedGroups", "StepTiming", "StepMemory", "count_saved", "time_step",
           "pinned_bandwidth", "activation_bytes_after_forward", "counted_memory",
           "preserved_state"]


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run the body, then put ``model`` back as it was: every parameter's ``.grad`` (the
    same tensor object, untouched: the body sees ``None`` and may allocate its own), the
    CPU and CUDA RNG states, every buffer's values and every module's training mode."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@dataclass
class SavedGroups:
    """Saved storages of one forward, grouped.

    ``by_layer[i]``: ``{(kinds frozenset, movable): bytes}`` of storages saved only inside
    layer ``i``; ``shared_bytes``: storages saved by several layers (never freed by one
    layer's choice); ``outside_bytes``: saved outside every layer (embedding, LM head,
    loss)."""
    by_layer: List[Dict[tuple, int]]
    shared_bytes: int = 0
    outside_bytes: int = 0
    shared_by_layer: List[Dict[tuple, int]] = field(default_factory=list)
    #: The part of ``outside_bytes`` saved before the first layer ran (embedding).
    pre_bytes: int = 0
    #: Rows of the first layer's input (batch x sequence), when it was a tensor.
    tokens: Optional[int] = None

    def layer_total(self, i: int) -> int:
        """Every byte layer ``i`` alone saved."""
        return sum(self.by_layer[i].values())

    @property
    def total(self) -> int:
        """Every counted byte."""
        return sum(self.layer_total(i) for i in range(len(self.by_layer))) + \
            self.shared_bytes + self.outside_bytes


class _Locator:
    """Forward hooks that keep ``(layer index, innermost kind)`` of the running code."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layer: Optional[int] = None
        self.kinds: List[str] = []
        self.entered = False          # some layer has run: outside saves are after them
        self.tokens: Optional[int] = None
        self.handles = []
        self.handles.append(layers[0].register_forward_pre_hook(self._first_input))
        for i, layer in enumerate(layers):
            self._hook(layer, lambda i=i: self._enter_layer(i), self._exit_layer)
            for _, (m, kind) in layer_modules(layer).items():
                self._hook(m, lambda kind=kind: self.kinds.append(kind), self._pop_kind)

    def _hook(self, m, pre, post) -> None:
        self.handles.append(m.register_forward_pre_hook(lambda mod, args: pre()))
        self.handles.append(m.register_forward_hook(lambda mod, a, o: post(), always_call=True))

    def _first_input(self, module, args) -> None:
        if self.tokens is None and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            self.tokens = int(args[0].numel() // args[0].shape[-1])

    def _enter_layer(self, i: int) -> None:
        self.layer, self.kinds, self.entered = i, [], True

    def _exit_layer(self) -> None:
        self.layer, self.kinds = None, []

    def _pop_kind(self) -> None:
        if self.kinds:
            self.kinds.pop()

    def where(self) -> tuple:
        return self.layer, (self.kinds[-1] if self.kinds else "other")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _fixed_storages(model: nn.Module) -> set:
    out = set()
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            out.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            pass
    return out


def count_saved(model: nn.Module, layers: nn.ModuleList, step_fn: Callable[[], torch.Tensor],
                min_offload_bytes: int) -> SavedGroups:
    """One forward of ``step_fn`` under counting hooks -> :class:`SavedGroups`: the storages
    the returned loss's graph holds when the forward ends.  The graph is freed before
    returning."""
    fixed = _fixed_storages(model)
    loc = _Locator(layers)
    storages: Dict[tuple, list] = {}       # key -> [nbytes, savers set]

    def pack(t):
        # Returned as a detached alias, never as ``t`` itself: a saved output returned as is
        # forms a cycle through C++ (tensor -> grad_fn -> saved variable -> tensor) that gc
        # cannot break, and every counting forward's graph would leak (39 GB on the H200
        # slice before this was fixed).  The graph is never run backward here.
        if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.layout == torch.strided:
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return t.detach()
            ptr = st.data_ptr()
            leaf_input = t.grad_fn is None and t.requires_grad
            if ptr not in fixed and not leaf_input and not isinstance(t, nn.Parameter) \
                    and st.nbytes() > 0:
                alias = t.detach()
                # An address whose earlier saves are all dead belongs to a new storage now
                # (the allocator reuses addresses: e.g. a graph the forward dropped): start
                # its entry afresh rather than merge two storages under one size.
                key = (ptr, t.device)
                entry = storages.get(key)
                if entry is None or all(ref() is None for _, ref, _ in entry[1]):
                    entry = storages[key] = [st.nbytes(), []]
                entry[1].append((loc.where(), weakref.ref(alias), loc.entered))
                return alias
            return t.detach()
        return t

    # Only what the graph of the returned loss still holds counts: a branch whose output
    # the step dropped (e.g. Hugging Face's logits when the loss is recomputed from the
    # final norm's input) frees its saved tensors before the forward ends.
    live = []
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step_fn()
        for nbytes, refs in storages.values():
            savers = {where for where, ref, _ in refs if ref() is not None}
            before = not any(after for _, ref, after in refs if ref() is not None)
            if savers:
                live.append((nbytes, savers, before))
        del loss
    finally:
        loc.remove()
    groups = SavedGroups([dict() for _ in layers], shared_by_layer=[dict() for _ in layers],
                         tokens=loc.tokens)
    for nbytes, savers, before in live:
        layer_ids = {l for l, _ in savers}
        if layer_ids == {None}:
            groups.outside_bytes += nbytes
            if before:
                groups.pre_bytes += nbytes
        elif len(layer_ids) > 1:
            groups.shared_bytes += nbytes
            for i in layer_ids - {None}:
                key = (frozenset(k for l, k in savers if l == i), nbytes >= min_offload_bytes)
                groups.shared_by_layer[i][key] = groups.shared_by_layer[i].get(key, 0) + nbytes
        else:
            (i,) = layer_ids
            key = (frozenset(k for _, k in savers), nbytes >= min_offload_bytes)
            groups.by_layer[i][key] = groups.by_layer[i].get(key, 0) + nbytes
    gc.collect()
    return groups


@dataclass
class StepMemory:
    """Bytes allocated above the step's start at its moments (one step).

    ``fwd_end``: after the forward, the loss's graph alive; ``fwd_peak``: the highest during
    the forward; ``head_peak``: the highest from the forward's end to the start of the last
    layer's backward (loss, LM head); ``layer_start[j]`` / ``layer_peak[j]``: at the start of
    layer ``j``'s backward and the highest during it (recompute included); ``end_peak``: the
    highest after layer 0's backward.  ``measured``: read from the allocator (GPU), else
    counted from saved bytes (:func:`counted_memory`)."""
    fwd_end: int
    fwd_peak: int
    head_peak: int
    layer_start: List[int]
    layer_peak: List[int]
    end_peak: int
    measured: bool = True

    @property
    def peak(self) -> int:
        """The step's highest."""
        return max([self.fwd_peak, self.head_peak, self.end_peak] + list(self.layer_peak))


class _Meter:
    """Reads the CUDA allocator at the step's moments (see the module docstring).

    Layer ``j``'s backward starts when the gradient of its output exists (a tensor hook
    registered in the layer's first forward call of the step: a checkpointed layer's
    recompute runs the forward again and must not register twice) and ends when the next
    one starts, or at the end of the backward.  Hooks run on autograd's device thread; the
    allocator's counters are host-side and thread-safe, so no sync is needed."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.L = len(layers)
        self.on = False
        self.handles = [layer.register_forward_hook(
            lambda m, a, o, i=i: self._forward_out(i, o)) for i, layer in enumerate(layers)]

    def _now(self) -> int:
        return torch.cuda.memory_allocated() - self.base

    def _high(self) -> int:
        return torch.cuda.max_memory_allocated() - self.base

    def start(self) -> None:
        self.on = True
        self.hooked = set()
        self.phase = None
        self.layer_start = [0] * self.L
        self.layer_peak = [0] * self.L
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def forward_end(self) -> None:
        self.fwd_end, self.fwd_peak = self._now(), self._high()
        self.head_peak = self.fwd_end
        self.phase = "head"
        torch.cuda.reset_peak_memory_stats()

    def _close_phase(self) -> None:
        high = self._high()
        if self.phase == "head":
            self.head_peak = high
        elif isinstance(self.phase, int):
            self.layer_peak[self.phase] = max(self.layer_peak[self.phase], high)

    def _forward_out(self, i: int, output) -> None:
        if not self.on or i in self.hooked or not torch.is_grad_enabled():
            return
        t = first_grad_tensor(output)
        if t is not None:
            self.hooked.add(i)
            t.register_hook(lambda g, i=i: self._backward_start(i))

    def _backward_start(self, i: int) -> None:
        if self.phase == i:
            return
        self._close_phase()
        torch.cuda.reset_peak_memory_stats()
        self.phase = i
        self.layer_start[i] = self._now()

    def finish(self) -> StepMemory:
        self._close_phase()       # layer 0's phase runs to the end (embedding backward)
        self.on = False
        return StepMemory(self.fwd_end, self.fwd_peak, self.head_peak, list(self.layer_start),
                          list(self.layer_peak), 0, measured=True)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def counted_memory(saved: "SavedGroups", none: "SavedGroups") -> StepMemory:
    """The :class:`StepMemory` of a step from counted saved bytes (the CPU, where no
    allocator can be asked): ``saved`` with the option measured, ``none`` without.  The
    forward ends holding every counted byte; layer ``j``'s backward starts holding what
    layers ``0..j``, the shared storages and the code before the layers saved, and its
    recompute re-creates what the option dropped (``none``'s bytes minus ``saved``'s).
    Transients the count cannot see (gradient buffers, kernel workspaces, the loss's
    logits) are zero here: on the GPU they are measured."""
    L = len(saved.by_layer)
    fixed = saved.shared_bytes + saved.pre_bytes
    start, peak, below = [0] * L, [0] * L, fixed
    for j in range(L):
        below += saved.layer_total(j)
        start[j] = below
        peak[j] = below + max(0, none.layer_total(j) - saved.layer_total(j))
    total = saved.total
    return StepMemory(total, total, total, start, peak, 0, measured=False)


@dataclass
class StepTiming:
    """Median seconds: ``fwd_s`` (step_fn), ``bwd_s`` (its backward), ``layer_fwd_s``
    (each layer's forward), ``pre_s`` (start of forward to the first layer);
    ``step_samples``: every timed step (forward + backward), in order; ``memory``: the
    last step's :class:`StepMemory` (GPU, when asked; else ``None``)."""
    fwd_s: float
    bwd_s: float
    layer_fwd_s: List[float] = field(default_factory=list)
    pre_s: float = 0.0
    step_samples: List[float] = field(default_factory=list)
    memory: Optional[StepMemory] = None

    @property
    def step_s(self) -> float:
        """Forward plus backward."""
        return self.fwd_s + self.bwd_s


class _Clock:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def time_step(layers: nn.ModuleList, step_fn: Callable[[], torch.Tensor], iters: int,
              warmup: int, cuda: bool, zero_grad: Callable[[], None],
              memory: bool = False) -> StepTiming:
    """``warmup`` untimed then ``iters`` timed steps (forward + ``loss.backward()``);
    per-layer forward times from marks at each layer's forward boundaries.  ``memory`` (GPU
    only): the last step also reads the allocator at the step's moments
    (:class:`StepMemory`; a few host calls per layer, no sync)."""
    clock = _Clock(cuda)
    marks: List[tuple] = []
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, i=i: marks.append(("in", i, clock.mark()))))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: marks.append(("out", i, clock.mark()))))
    meter = _Meter(layers) if memory and cuda else None
    fwd, bwd, per_layer, pre = [], [], [], []
    mem = None
    try:
        for it in range(warmup + iters):
            zero_grad()
            marks.clear()
            if cuda:
                torch.cuda.synchronize()
            last = it == warmup + iters - 1
            if meter is not None and last:
                gc.collect()
                meter.start()
            t0 = clock.mark()
            loss = step_fn()
            t1 = clock.mark()
            if meter is not None and last:
                meter.forward_end()
            layer_marks = list(marks)     # recompute in backward may add more
            loss.backward()
            t2 = clock.mark()
            if meter is not None and last:
                mem = meter.finish()
            if cuda:
                torch.cuda.synchronize()
            del loss
            if it < warmup:
                continue
            fwd.append(clock.seconds(t0, t1))
            bwd.append(clock.seconds(t1, t2))
            starts = {i: m for kind, i, m in layer_marks if kind == "in"}
            ends = {i: m for kind, i, m in layer_marks if kind == "out"}
            per_layer.append([clock.seconds(starts[i], ends[i]) if i in starts and i in ends
                              else 0.0 for i in range(len(layers))])
            pre.append(clock.seconds(t0, starts[0]) if 0 in starts else 0.0)
    finally:
        for h in handles:
            h.remove()
        if meter is not None:
            meter.remove()
    layer_fwd = [statistics.median(col) for col in zip(*per_layer)]
    return StepTiming(statistics.median(fwd), statistics.median(bwd), layer_fwd,
                      statistics.median(pre), [a + b for a, b in zip(fwd, bwd)], mem)


def activation_bytes_after_forward(step_fn: Callable[[], torch.Tensor],
                                   zero_grad: Callable[[], None]) -> int:
    """CUDA: allocated after ``step_fn()`` minus before, from a clean state (the previous
    graph freed, ``gc.collect()``, parameter grads allocated so they do not count)."""
    zero_grad()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = step_fn()
    torch.cuda.synchronize()
    act = torch.cuda.memory_allocated() - base
    loss.backward()
    del loss
    return int(act)


def pinned_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> tuple:
    """``(d2h_Bps, h2d_Bps)``: fastest of ``reps`` pinned copies each way after a warm-up."""
    n = nbytes // 4
    host = torch.empty(n, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(n, dtype=torch.float32, device=device)
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    clock = _Clock(True)

    def fastest(fn):
        best = float("inf")
        for _ in range(reps):
            a = clock.mark()
            fn()
            b = clock.mark()
            b.synchronize()
            best = min(best, clock.seconds(a, b))
        return best
    d2h = fastest(lambda: host.copy_(dev, non_blocking=True))
    h2d = fastest(lambda: dev.copy_(host, non_blocking=True))
    return n * 4 / d2h, n * 4 / h2d
