"""The CPU activation-offload context: saved-tensor hooks, layer schedule, streams.

Usage (the TransformerEngine contract)::

    ctx, sync = get_cpu_offload_context(True, num_layers=7, model_layers=8)
    for layer in layers:
        with ctx:               # each entry is the next layer
            x = layer(x)
        x = sync(x)             # registers the backward prehook that schedules reloads

Synchronization design
======================
Streams: ``compute`` (the current stream when a tensor is packed), ``d2h`` and ``h2d``
(two side streams owned by the context).  No host synchronization and no
``record_stream`` anywhere on the normal path.

Forward (pack hook, one :class:`~moe_offload.offload.record.Record` per storage range;
its states ``COPYING -> ON_HOST -> RELOADED -> ON_HOST ... -> FREED`` are named in
``record.py``):

1. *ready*: the event ``start_offload(t)`` recorded on compute where ``t`` became final,
   or an event recorded on compute at pack time.  ``d2h`` waits on it, so the copy reads
   finished data.  ``d2h`` also waits on the host block's ``last_event`` (the previous
   copy that used that pooled block), so a block is never overwritten while a reload of
   an older record still reads it.
2. The copy runs on ``d2h`` into the pinned block; *done* is recorded on ``d2h``.
3. Why the device storage stays alive: the record holds it (``record.gpu``) until the
   copy is done.  The copy runs on a stream the caching allocator does not know about,
   so the reference is dropped only when (a) ``done.query()`` is True at a layer
   boundary (the copy already finished: nothing to order), or (b) forced: records of
   layer i when layer ``i + max(2, L - k)`` is entered (``k`` of ``L`` layers offload;
   see ``_release_lag``), all of them when the last model layer exits (end of the
   forward) and when the backward starts.  Forcing does ``compute.wait_event(done)`` and then
   drops the reference; the allocator reuses the block only for later work on compute,
   which is ordered after the copy.  A record freed by autograd before release does
   the same wait.

Backward (prehook registered by ``sync`` on the layer's output node, and unpack hook):

4. Reload buffers are allocated on compute (the allocator's pools are per stream), then
   an *allocated* event is recorded on compute and ``h2d`` waits on it: the block may
   have been freed by kernels still queued on compute.
5. ``h2d`` also waits on the record's *done* event.  Otherwise a reload issued right
   after the forward (inline, or early prefetch) could read the host block before the
   D2H filled it (the Megatron-LM #7398 race).
6. The H2D copy runs on ``h2d``; *reload* is recorded there.  On unpack the *current*
   (compute) stream waits on that record's reload event only, per tensor / component.
7. Why the reloaded storage stays alive: the record holds it strongly from the reload
   until every live referrer has unpacked it in this pass, then only through a weakref
   (autograd's use keeps it alive; a later unpack, e.g. ``retain_graph``, reuses it if
   alive, otherwise reloads again).  Freed by compute-ordered code only after compute
   waited on *reload*.  A reloaded storage dropped before its unpack (graph freed,
   exception) first makes compute wait on *reload*, so the pending H2D cannot write into
   a block that compute reuses.
8. The host block stays with the record while autograd holds the graph (so unpacking
   twice works); it returns to the pool when the record dies, with ``last_event`` =
   the latest copy that touched it (see ``pool.py``).

In-place writes (autograd's version check, which torch skips for hooked saves):

9. Every saved tensor records its ``_version`` at pack.  An offloaded one also gets a
   *version holder*: a detached alias re-pointed at an empty storage, which shares the
   version counter and keeps no device memory alive (``record.version_holder``).  At
   unpack a changed version raises autograd's own ``RuntimeError`` text, on every path:
   offloaded, kept (threshold, resident layer, parameter) and opted out (the opt-out
   hooks check too).  Dedup keys carry the version: a tensor saved, written in place
   and saved again is two values, so the second save gets its own copy.  (On CUDA the
   first copy may race the write; such a record is never unpacked without raising.)

Entries (``__enter__``) and threads:

10. With grad disabled, or while a backward runs on this thread (``graph_task_id !=
    -1``: e.g. ``torch.utils.checkpoint`` recomputing a layer whose module hooks run
    inside the checkpointed function), an entry is *passive*: no layer, no step, no
    hooks (the checkpoint's own recomputation hooks stay innermost), and ``sync`` does
    nothing.  A forward abandoned between layers (an exception outside ``with ctx``)
    is noticed at the next entry: the previous layer's output graph is gone (a sentinel
    held only by its prehook died), so a new step starts at layer 0.
11. One context serves one thread at a time (its schedule is shared state): entering
    it while another thread has it entered raises, before installing anything.  The
    entered regions of a thread (enabled, opt-out, passive) live on one stack in
    ``marks.py``; exiting out of order unwinds every region above and raises.
    Unpack hooks and backward prehooks may run on autograd's device thread (CUDA),
    which sees none of those thread-local regions: whether an unpack happens inside a
    layer (an inner ``torch.autograd.grad``) is asked of the context, not the thread.

Parameters never move: their storages are registered (``params.py``) and a saved
tensor on such a storage (``w.detach()``) is kept.

Tensors left on the device are returned from the pack hook (inside a ``Kept``) as a
detached alias, never as themselves: a saved output returned as is forms a cycle
through C++ (tensor -> grad_fn -> saved variable -> tensor) that gc cannot break, and
the graph would leak.

Prefetch: the prehook for layer j issues reloads for layers j, j-1, ..., j-prefetch_layers
not yet issued in this backward pass (keyed by autograd's graph-task id, so a second
pass over a retained graph prefetches again).  An unpack of a record never prefetched
reloads inline: correct, slower (counted in ``stats()["inline_reloads"]``).
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
import weakref
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.autograd.graph import saved_tensors_hooks

from torch.nn.modules.module import register_module_forward_pre_hook

from . import marks
from .backend import CudaBackend, EmulateBackend
from .params import PARAM_STORAGES
from .pool import PinnedPool
from .record import (COPY, RANGE, Geometry, Kept, PackedComposite, Record, SavedRef,
                     State, Transport)

__all__ = ["get_cpu_offload_context", "CpuOffloadContext", "OptOutContext", "release_lag"]

log = logging.getLogger(__name__)


def _enabled_entered(ctx=None) -> bool:
    """Is an enabled context (``ctx``, or any) actively entered on this thread?  True
    inside an opt-out region nested in it; False in a passive entry (see __enter__)."""
    return any(isinstance(r.owner, CpuOffloadContext) and r.engine is not None
               and (ctx is None or r.owner is ctx) for r in marks.regions())


_STAT_KEYS = (
    "offloaded_tensors", "offloaded_bytes", "reloaded_tensors", "reloaded_bytes",
    "kept_on_device_tensors", "kept_on_device_bytes", "over_limit_tensors",
    "below_threshold_tensors", "below_threshold_bytes",
    "dedup_hits", "prefetched_reloads", "inline_reloads", "forced_releases",
    "forced_waits", "released_on_query",
)


def _identity(t):
    return t


def _keep_pack(t):
    """Opt-out pack hook: keep ``t`` on the device, remember its version."""
    if not isinstance(t, torch.Tensor):
        return t
    return Kept(t)


def _keep_unpack(packed):
    """Opt-out unpack hook: autograd's in-place check, then the tensor."""
    return packed.unpack() if isinstance(packed, Kept) else packed


_PARAMETER = torch.nn.Parameter


def _is_parameter(t: torch.Tensor) -> bool:
    """``isinstance(t, nn.Parameter)`` without its Python-level metaclass hook (about
    0.5 us) for plain tensors.  A parameter is an instance of a ``Parameter`` class, or a
    tensor subclass instance flagged ``_is_param`` (what ``nn.Parameter(subclass)``
    returns, e.g. FSDP2's DTensor parameters)."""
    cls = type(t)
    if cls is torch.Tensor:
        return False
    return issubclass(cls, _PARAMETER) or bool(getattr(t, "_is_param", False))


class _Layer:
    """One layer of one step: whether it offloads, and weakrefs to its records."""

    __slots__ = ("index", "offloaded", "records", "prefetched_task", "output_alive")

    def __init__(self, index: int, offloaded: bool) -> None:
        self.index = index
        self.offloaded = offloaded
        self.records: List[weakref.ref] = []
        self.prefetched_task: Optional[int] = None
        # Set by sync: a weakref to an object held only by the prehook on the layer
        # output's grad_fn.  Dead means that graph is gone: the forward was abandoned.
        self.output_alive: Optional[weakref.ref] = None

    def alive(self):
        for r in self.records:
            rec = r()
            if rec is not None:
                yield rec


class _Step:
    """The layers entered in one forward pass (captured by the backward prehooks)."""

    __slots__ = ("layers", "backward_started")

    def __init__(self) -> None:
        self.layers: List[_Layer] = []
        self.backward_started = False


_CLAIMED = object()     # CpuOffloadContext._region while __enter__ runs


class _OutputAlive:
    """Held only by a layer output's backward prehook (see ``_Layer.output_alive``)."""

    __slots__ = ("__weakref__",)


class OptOutContext:
    """The context returned for ``enabled=False``.

    Inside an enabled offload context it really opts the region out: it installs
    keep-on-device saved-tensor hooks (only the innermost pair runs), so tensors saved
    inside stay on the device, and :func:`is_cpu_offload_enabled` is False there.  Those
    hooks still do autograd's in-place version check (torch skips it for hooked saves).
    Outside any offload context it does nothing.  Regions must exit in reverse order of
    entry (see ``marks.exit_region``).
    """

    def __init__(self) -> None:
        self._regions = []   # stack: one entry per (possibly nested) entry

    def __enter__(self) -> "OptOutContext":
        if marks.active_engine() is not None:
            hooks = saved_tensors_hooks(_keep_pack, _keep_unpack)
            self._regions.append(marks.enter_region(self, None, hooks))
        else:
            self._regions.append(None)
        return self

    def __exit__(self, *exc) -> None:
        region = self._regions.pop() if self._regions else None
        if region is not None:
            marks.exit_region(region)

    def stats(self) -> dict:
        """All counters zero: a disabled context moves nothing."""
        return {k: 0 for k in _STAT_KEYS + ("pinned_pool_bytes", "pinned_allocs")}

    def reset_stats(self) -> None:
        """Nothing to reset."""


class CpuOffloadContext:
    """An enabled offload context; each ``with`` entry is the next layer.

    Built by :func:`get_cpu_offload_context`, which documents the arguments.
    """

    def __init__(self, num_layers: Optional[int], model_layers: Optional[int], *,
                 policy: str, min_offload_bytes: int, retain_pinned_cpu_buffers: bool,
                 prefetch_layers: int, host_memory_limit_bytes: Optional[int],
                 emulate: bool) -> None:
        self.num_layers = num_layers
        self.model_layers = model_layers
        self.policy = policy
        self.min_offload_bytes = min_offload_bytes
        self.retain_pinned_cpu_buffers = retain_pinned_cpu_buffers
        self.prefetch_layers = prefetch_layers
        backend = EmulateBackend() if emulate else CudaBackend()
        self.pool = PinnedPool(backend, host_memory_limit_bytes)
        self.counters = {k: 0 for k in _STAT_KEYS}
        self.counters["hook_seconds"] = 0.0
        self.counters["d2h_copy_seconds"] = 0.0
        self.counters["h2d_copy_seconds"] = 0.0
        # Everything a record may touch: backend, pool, counters, copy timings, and the
        # callback that forgets a dedup key.  Records never see the context itself.
        self.transport = Transport(backend, self.pool, self.counters, self._forget_key)
        self._live = {}                  # dedup key -> weakref(Record) while it holds GPU
        self._step: Optional[_Step] = None
        self._layer: Optional[_Layer] = None
        self._region = None              # this entry's marks.Region; None: not entered
        self._passive = False            # this entry installed nothing (see __enter__)
        self._thread = None              # ident of the thread that entered
        self._lock = threading.Lock()
        self._module_hook = None
        self._params_learned = False     # set at the first backward (see __enter__)
        self._aborted = False
        self._warned_limit = False

    @property
    def backend(self):
        """Streams, events and buffers (``backend.py``); shared with the records."""
        return self.transport.backend

    @backend.setter
    def backend(self, backend) -> None:
        self.transport.backend = backend
        self.pool.backend = backend

    def _harvest_timings(self) -> None:
        pending = []
        for counter, began, ended in self.transport.timings:
            if self.backend.query(ended):
                self.counters[counter] += self.backend.elapsed_seconds(began, ended)
            else:
                pending.append((counter, began, ended))
        self.transport.timings[:] = pending

    def _forget_key(self, key, record: Record) -> None:
        """Drop a dedup key when its record lets go of the device storage (the
        storage's data_ptr may be reused by an unrelated tensor afterwards)."""
        ref = self._live.get(key)
        if ref is not None and ref() in (None, record):
            del self._live[key]

    # -- public -----------------------------------------------------------------------
    def stats(self) -> dict:
        """Cumulative counters (since creation or :meth:`reset_stats`).

        ``offloaded_*``: D2H transfers (a deduplicated storage counts once);
        ``reloaded_*``: H2D transfers (each reload, also repeated ones);
        ``kept_on_device_*``: saved tensors (or composite components) the engine saw and
        left on the device for any reason (parameter, host tensor, below threshold,
        unmarked, resident layer, over the host limit); ``below_threshold_*``: of those,
        the ones of offloaded layers kept only because their storage is smaller than
        ``min_offload_bytes`` (a tiny model under the default threshold offloads
        nothing, and says so here); ``over_limit_tensors``: kept
        because the pinned pool hit ``host_memory_limit_bytes``; ``pinned_pool_bytes``:
        host bytes owned by the pool now; ``pinned_allocs``: host allocations ever made.
        Overlap figures: ``prefetched_reloads`` vs ``inline_reloads`` (unpacks that had to
        reload on demand), ``forced_waits`` (force-releases whose copy had not finished
        yet: the compute stream had to wait for the D2H), ``released_on_query``,
        ``forced_releases``, ``dedup_hits``, ``hook_seconds`` (host time in hooks) and
        ``d2h_copy_seconds``/``h2d_copy_seconds`` (GPU time of the copies, read from
        timing events once they completed; never waits; 0 under ``emulate``).
        """
        self._harvest_timings()
        out = dict(self.counters)
        out["pinned_pool_bytes"] = self.pool.total_bytes
        out["pinned_allocs"] = self.pool.allocs
        out["pinned_blocks_in_use"] = self.pool.lent
        return out

    def reset_stats(self) -> None:
        """Zero the cumulative counters (pool figures are current state and stay)."""
        self._harvest_timings()
        self.transport.timings.clear()   # pending copy timings belong to the old window
        for k in self.counters:
            self.counters[k] = 0.0 if k.endswith("_seconds") else 0
        self.pool.allocs = 0

    # -- layer boundaries ------------------------------------------------------------
    def __enter__(self) -> "CpuOffloadContext":
        """Enter the next layer.

        Two kinds of entry install nothing and leave the schedule alone (*passive*):
        with grad disabled (nothing is saved, and a ``no_grad`` forward must not count
        as layers of the step: with ``model_layers=None`` it would teach the wrong layer
        count), and while autograd runs a backward on this thread (a checkpoint's
        recomputation calling the layer's module hooks again must not start a step or
        offload what checkpointing recomputes).  One context belongs to one thread at a
        time: entering it from a second thread while it is entered raises.
        """
        me = threading.get_ident()
        with self._lock:
            if self._region is not None:
                if self._thread == me:
                    raise RuntimeError(
                        "moe_offload: this CPU offload context is already entered (exit "
                        "each layer before entering the next)")
                raise RuntimeError(
                    "moe_offload: this CPU offload context is entered by another thread; "
                    "one context serves one thread at a time (build one context per "
                    "thread)")
            passive = (not torch.is_grad_enabled()
                       or self.backend.graph_task_id() != -1)
            if not passive and _enabled_entered():
                raise RuntimeError(
                    "moe_offload: an enabled CPU offload context was entered while "
                    "another enabled one is active (nested offload contexts are not "
                    "supported; use get_cpu_offload_context(enabled=False)[0] to opt a "
                    "region out)")
            self._region = _CLAIMED
            self._thread = me
        try:
            if passive:
                self._passive = True
                self._region = marks.enter_region(self, None, None)
                return self
            self._passive = False
            self._begin_layer()
            if not self._params_learned:
                # First step only: learn the parameters of every module called inside
                # the layers (params.py), so their detached aliases never move.  A
                # global hook takes every module call off torch's fast path, so it is
                # not kept for later steps.
                self._module_hook = register_module_forward_pre_hook(
                    PARAM_STORAGES.module_pre_hook)
            hooks = saved_tensors_hooks(self._pack, self._unpack)
            self._region = marks.enter_region(self, self, hooks)
        except BaseException:
            self._drop_module_hook()
            self._region = None
            raise
        return self

    def _drop_module_hook(self) -> None:
        if self._module_hook is not None:
            self._module_hook.remove()
            self._module_hook = None

    def __exit__(self, exc_type, exc, tb) -> None:
        region = self._region
        if region is None or region is _CLAIMED or self._thread != threading.get_ident():
            # Never entered by this thread (e.g. __enter__ raised inside a module
            # pre-hook and torch still runs the post-hook): leave everything untouched.
            return
        self._drop_module_hook()
        with self._lock:
            self._region = None
            self._thread = None
        if self._passive:
            marks.exit_region(region)
            return
        try:
            marks.exit_region(region)      # raises on a non-LIFO exit, after cleaning
        except RuntimeError:
            self._aborted = True
            raise
        if exc_type is not None:
            self._aborted = True      # the next entry starts a fresh step
        self._release_completed()
        layer = self._layer
        if (exc_type is None and layer is not None and self.model_layers is not None
                and layer.index == self.model_layers - 1):
            self._end_of_forward()

    def _is_offloaded(self, index: int) -> bool:
        if self.model_layers is None:
            return self.num_layers is None or index < self.num_layers
        n = self.num_layers if self.num_layers is not None else self.model_layers - 1
        return index < n

    def _begin_layer(self) -> None:
        step = self._step
        if self.num_layers is not None and self.model_layers is not None \
                and self.num_layers > self.model_layers:
            raise ValueError(f"num_layers={self.num_layers} exceeds model_layers="
                             f"{self.model_layers} (learned at the first backward)")
        new_step = (step is None or step.backward_started or self._aborted
                    or (self.model_layers is not None
                        and len(step.layers) >= self.model_layers)
                    or self._abandoned(step))
        if new_step:
            if step is not None:
                self._force_release(step.layers)
            step = self._step = _Step()
            self._aborted = False
        index = len(step.layers)
        layer = _Layer(index, self._is_offloaded(index))
        step.layers.append(layer)
        self._layer = layer
        self._release_completed()
        self._harvest_timings()
        lag = self._release_lag()
        if index >= lag:
            self._force_release(step.layers[index - lag:index - lag + 1])

    @staticmethod
    def _abandoned(step: _Step) -> bool:
        """The previous layer's output graph is gone (an exception between layers, or
        a forward dropped before its backward): the next entry starts a new step."""
        if not step.layers:
            return False
        alive = step.layers[-1].output_alive
        return alive is not None and alive() is None

    def _release_lag(self) -> int:
        """How many layers after layer i its device copies are force-released.

        The copies of layer i are dropped as soon as they are done (``query``); this is
        the latest point, where the compute stream waits for them.  With ``k`` of ``L``
        layers offloaded, ``max(2, L - k)``: the device never holds more unreleased
        offloaded layers than resident ones (so the peak stays within about twice the
        resident set), while a partial offload gets the whole rest of the forward to
        hide its copies.  Full offload (``L - k <= 2``) keeps two layers in flight.
        """
        if self.model_layers is None:
            return 2
        return release_lag(self.num_layers, self.model_layers)

    def _end_of_forward(self) -> None:
        """The last model layer exited: every offloaded copy is released now, so the
        memory after the forward is the resident layers plus the output (compute waits
        here for copies still in flight)."""
        if self._step is not None:
            self._force_release(self._step.layers)

    def _release_completed(self) -> None:
        if self._step is None:
            return
        for layer in self._step.layers:
            for rec in layer.alive():
                if rec.state is State.COPYING and rec.release_gpu(force=False):
                    self.counters["released_on_query"] += 1

    def _force_release(self, layers) -> None:
        for layer in layers:
            for rec in layer.alive():
                if rec.state is State.COPYING:
                    rec.release_gpu(force=True)
                    self.counters["forced_releases"] += 1

    # -- pack --------------------------------------------------------------------------
    def record_ready(self, t: torch.Tensor) -> None:
        """Called by ``start_offload``: stash a ready event recorded on the current
        stream on ``t`` (device tensors only)."""
        if not self.backend.is_device_tensor(t):
            return
        event = self.backend.record_event(self.backend.current_stream())
        try:
            # The version pins the event to this content: after an in-place write the
            # stale event is ignored and a fresh one is recorded at pack time.
            setattr(t, marks.READY_EVENT_ATTR, (t._version, event))
        except (AttributeError, RuntimeError):  # pragma: no cover
            pass

    def _pack(self, t):
        t0 = time.perf_counter()
        try:
            return self._pack_obj(t)
        finally:
            self.counters["hook_seconds"] += time.perf_counter() - t0

    def _keep(self, t: torch.Tensor, nbytes: Optional[int] = None):
        self.counters["kept_on_device_tensors"] += 1
        try:
            if nbytes is None:
                nbytes = t.numel() * t.element_size()
            self.counters["kept_on_device_bytes"] += nbytes
        except Exception:  # pragma: no cover - exotic tensors
            pass
        return Kept(t)

    def _pack_obj(self, t):
        # Hot path: every saved tensor of every layer passes here.  A plain tensor is
        # told apart by ``type(t) is torch.Tensor`` (one pointer compare); parameter
        # checks avoid ``isinstance(x, nn.Parameter)`` (see ``_is_parameter``), and a
        # storage below the threshold is kept before any view geometry is computed.
        cls = type(t)
        if cls is not torch.Tensor:
            if not isinstance(t, torch.Tensor):
                return t
            if not _is_parameter(t) and hasattr(cls, "__tensor_flatten__"):
                attrs, meta = t.__tensor_flatten__()
                inner = {name: self._pack_obj(getattr(t, name)) for name in attrs}
                return PackedComposite(cls, meta, t.size(), t.stride(), inner)
        base = t._base
        if _is_parameter(t) or (base is not None and _is_parameter(base)):
            PARAM_STORAGES.see(t)      # so that detached aliases of it never move
            return self._keep(t)
        layer = self._layer
        if (cls is not torch.Tensor or layer is None or not layer.offloaded
                or not self.backend.is_device_tensor(t)
                or t.layout != torch.strided
                or t.numel() == 0 or t.is_conj() or t.is_neg() or t.is_quantized
                or marks.is_marked_not_offload(t)
                or (self.policy == "marked" and not marks.is_marked_offload(t))):
            return self._keep(t)
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return self._keep(t)
        ptr = storage.data_ptr()
        if self.backend.emulated and ptr in self.pool.host_ptrs:
            return self._keep(t)                  # our own host buffer: never again
        if PARAM_STORAGES.contains(ptr, t.device):
            return self._keep(t)                  # a parameter's storage (params.py)
        # The threshold is on the storage the tensor would keep alive, not on the view:
        # a tiny scale view into a bulk buffer travels (its own few bytes), or else it
        # would pin the whole buffer on the device (TE's shared-buffer defect).
        storage_bytes = storage.nbytes()
        if storage_bytes < self.min_offload_bytes:
            nbytes = t.numel() * t.element_size()
            self.counters["below_threshold_tensors"] += 1
            self.counters["below_threshold_bytes"] += nbytes
            return self._keep(t, nbytes)
        # Dedup keys carry the version: a tensor saved, written in place, then saved
        # again is two different values (the first copy predates the write).
        version = t._version
        es = t.element_size()
        size, stride, off = tuple(t.shape), tuple(t.stride()), t.storage_offset()
        span = 1 + sum((sz - 1) * st for sz, st in zip(size, stride))
        whole_key = ("storage", ptr, t.device, version)
        if 2 * span * es >= storage_bytes:        # covers >= 50%: move the storage once
            mode, start, nbytes = RANGE, 0, storage_bytes
            key = whole_key
        elif span <= t.numel():                   # small dense (or overlapping, e.g.
            # expanded) view: its byte span holds no holes; move the span, restore exact
            mode, start, nbytes = RANGE, off * es, span * es
            key = ("range", ptr, t.device, version, start, nbytes)
        else:                                     # small strided view: contiguous copy
            mode, start, nbytes = COPY, 0, t.numel() * es
            key = ("copy", ptr, t.device, version, off, size, stride, t.dtype)
        # dedup: the whole storage, or this exact range
        for k in ((key,) if key is whole_key else (whole_key, key)):
            ref = self._live.get(k)
            rec = ref() if ref is not None else None
            if rec is not None and rec.state is State.COPYING:
                self.counters["dedup_hits"] += 1
                return SavedRef(rec, Geometry(t.dtype, size, stride, off,
                                              (off * es - rec.start) // es), t)
        block = self.pool.acquire(nbytes)
        if block is None:
            self.counters["over_limit_tensors"] += 1
            if not self._warned_limit:
                self._warned_limit = True
                warnings.warn(
                    f"moe_offload: pinned host pool reached host_memory_limit_bytes="
                    f"{self.pool.limit_bytes}; further saved tensors stay on the device "
                    "(counted in stats()['over_limit_tensors'])", RuntimeWarning,
                    stacklevel=3)
            return self._keep(t)
        stamped = getattr(t, marks.READY_EVENT_ATTR, None)
        if stamped is not None and stamped[0] == version:
            ready = stamped[1]
        else:
            ready = self.backend.record_event(self.backend.current_stream())
        gpu = storage if mode == RANGE else t.detach()     # no grad_fn: no cycle
        rec = Record(self.transport, key, layer.index, t.device, mode, start, nbytes, gpu,
                     block, self.backend.current_stream())
        rec.step = self._step
        rec.start_d2h(ready)
        self._live[key] = weakref.ref(rec)
        layer.records.append(weakref.ref(rec))
        self.counters["offloaded_tensors"] += 1
        self.counters["offloaded_bytes"] += nbytes
        return SavedRef(rec, Geometry(t.dtype, size, stride, off, (off * es - start) // es),
                        t)

    # -- unpack / backward -----------------------------------------------------------
    def _unpack(self, packed):
        t0 = time.perf_counter()
        try:
            return self._unpack_obj(packed)
        finally:
            self.counters["hook_seconds"] += time.perf_counter() - t0

    def _unpack_obj(self, packed):
        if isinstance(packed, SavedRef):
            step = packed.record.step
            if (step is not None and not step.backward_started
                    and not self._actively_entered()):
                # No sync() was used for this step.  An unpack *inside* the context (e.g.
                # torch.autograd.grad for a gradient penalty within a layer) is not the
                # backward of the step: it must not end the forward or learn model_layers.
                self._backward_started(step)
            return packed.record.unpack(packed)
        if isinstance(packed, Kept):
            return packed.unpack()
        if isinstance(packed, PackedComposite):
            inner = {name: self._unpack_obj(p) for name, p in packed.inner.items()}
            return packed.cls.__tensor_unflatten__(inner, packed.meta, packed.size,
                                                   packed.stride)
        return packed

    def _actively_entered(self) -> bool:
        """Is a layer of this context entered (not passively) right now, by any thread?

        Asked by the unpack hook and the backward prehook.  It is a property of the
        context, not of the calling thread: on CUDA the autograd engine runs hooks on its
        own device thread, where the forward thread's regions (``marks.regions()``,
        thread-local) are invisible, so an inner ``torch.autograd.grad`` inside a layer
        would otherwise look like the step's backward.  One context serves one thread at
        a time, so "entered by someone" means "entered by the thread this backward runs
        for"."""
        region = self._region
        return region is not None and region is not _CLAIMED and not self._passive

    def _backward_started(self, step: _Step) -> None:
        if step.backward_started:
            return
        step.backward_started = True
        self._params_learned = True
        if self.model_layers is None:
            self.model_layers = len(step.layers)
            log.debug("moe_offload: learned model_layers=%d", self.model_layers)
        self._force_release(step.layers)
        if not self.retain_pinned_cpu_buffers:
            try:   # free the pool's idle blocks once this backward has finished
                torch.autograd.Variable._execution_engine.queue_callback(self.pool.trim)
            except RuntimeError:                   # not inside a backward pass
                self.pool.trim()

    def _on_layer_backward(self, step: _Step, index: int) -> None:
        """Prehook body: the backward reached the output of layer ``index``."""
        if self._actively_entered():
            return     # an inner autograd.grad during the forward, not the step's backward
        t0 = time.perf_counter()
        self._backward_started(step)
        task = self.backend.graph_task_id()
        for j in range(index, max(index - self.prefetch_layers, 0) - 1, -1):
            layer = step.layers[j]
            if not layer.offloaded or layer.prefetched_task == task:
                continue
            layer.prefetched_task = task
            for rec in layer.alive():
                rec.prefetch()
        self.counters["hook_seconds"] += time.perf_counter() - t0

    def sync(self, x: torch.Tensor) -> torch.Tensor:
        """Mark the end of the layer just exited; returns ``x`` unchanged.

        Registers a prehook on ``x.grad_fn`` that schedules this layer's reloads
        (and ``prefetch_layers`` earlier ones) when the backward reaches it.  The next
        layer's entry checks that this graph node is still alive: when it is gone (the
        forward was abandoned, e.g. by an exception between layers) a new step starts.
        """
        if not torch.is_grad_enabled() or self.backend.graph_task_id() != -1:
            return x   # no graph, or a recomputation inside backward (see __enter__)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"sync expects a tensor, got {type(x).__name__}")
        if not x.requires_grad:
            raise ValueError("sync: the layer output does not require grad while grad "
                             "mode is on; pass the tensor that flows to the next layer")
        step, layer = self._step, self._layer
        if step is None or layer is None:
            raise RuntimeError("sync called before any layer was entered")
        if x.grad_fn is not None:
            # The hook holds the step (layers + weakrefs to records; no cycle with the
            # graph), so overlapping steps (two forwards, then two backwards) each
            # prefetch their own records.
            index = layer.index
            alive = _OutputAlive()
            layer.output_alive = weakref.ref(alive)
            x.grad_fn.register_prehook(
                lambda grad_outputs, alive=alive: self._on_layer_backward(step, index))
        return x


def release_lag(num_layers: Optional[int], model_layers: int) -> int:
    """The engine's release rule, for planners: the copies of offloaded layer ``i`` are
    force-released (the compute stream waits for them) when layer ``i + lag`` is entered,
    ``lag = max(2, model_layers - k)`` with ``k = num_layers`` (``None``: all but the last),
    and every copy is released when the last model layer exits."""
    k = num_layers if num_layers is not None else model_layers - 1
    return max(2, model_layers - k)


def get_cpu_offload_context(
        enabled: bool = True, num_layers: Optional[int] = None,
        model_layers: Optional[int] = None, offload_activations: bool = True,
        offload_weights: bool = False, *, policy: str = "auto",
        min_offload_bytes: int = 256 * 1024, retain_pinned_cpu_buffers: bool = True,
        prefetch_layers: int = 1, host_memory_limit_bytes: Optional[int] = None,
        emulate: bool = False, double_buffering: bool = False,
) -> Tuple[Any, Callable[[torch.Tensor], torch.Tensor]]:
    """Build ``(context, sync)`` for layer-wise CPU activation offload.

    Drop-in for TransformerEngine's function of the same name (same positional order).

    Args:
        enabled: False returns an opt-out context (identity hooks inside an enabled
            context; nothing outside) and an identity ``sync``.
        num_layers: how many leading layers offload; None means all but the last.
        model_layers: layers per step; None means learned at the first backward (during
            the first forward every entered layer below ``num_layers`` offloads, and with
            both None every layer does).  An entry past ``model_layers`` starts a new step.
        offload_activations: False behaves like ``enabled=False``.
        offload_weights: parameters are never offloaded; True raises NotImplementedError.
        policy: "auto" offloads every eligible saved tensor; "marked" only tensors passed
            to ``mark_activation_offload``.
        min_offload_bytes: smaller transfers stay on the device.
        retain_pinned_cpu_buffers: keep the pinned pool across steps (False frees the
            free blocks at the end of each backward).
        prefetch_layers: reloads issued ahead during backward (0: reload on demand).
        host_memory_limit_bytes: cap of the pinned pool; past it tensors stay on the
            device (one warning, counted in stats).
        emulate: run the full state machine on CPU tensors (no streams): for tests/CI.
        double_buffering: accepted for TransformerEngine compatibility and ignored (the
            size-class pinned pool already reuses host buffers across layers and steps).

    Never moved: parameters (and views of them), tensors whose storage is below
    ``min_offload_bytes``, host tensors, tensors marked with ``mark_not_offload``,
    tensors without storage (``__tensor_flatten__`` subclasses are decomposed and each
    component decided on its own).  The threshold applies to the storage a tensor keeps
    alive: a small view into a large shared buffer is moved (its own bytes), so it does
    not pin the buffer.  Views covering >= 50% of their storage move the whole storage
    once; smaller views move their byte span (exact strides on reload) or, when the
    span has holes, a contiguous copy (restored contiguous).
    """
    if offload_weights:
        raise NotImplementedError(
            "moe_offload never offloads parameters: offload_weights=True is not supported")
    if policy not in ("auto", "marked"):
        raise ValueError(f"policy must be 'auto' or 'marked', got {policy!r}")
    for name, value in (("num_layers", num_layers), ("model_layers", model_layers)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    if model_layers is not None and model_layers < 1:
        raise ValueError(f"model_layers must be >= 1, got {model_layers}")
    if num_layers is not None and model_layers is not None and num_layers > model_layers:
        raise ValueError(f"num_layers={num_layers} exceeds model_layers={model_layers}")
    if not isinstance(prefetch_layers, int) or prefetch_layers < 0:
        raise ValueError(f"prefetch_layers must be an int >= 0, got {prefetch_layers!r}")
    if min_offload_bytes < 0:
        raise ValueError(f"min_offload_bytes must be >= 0, got {min_offload_bytes}")
    if host_memory_limit_bytes is not None and host_memory_limit_bytes < 0:
        raise ValueError("host_memory_limit_bytes must be >= 0 or None")
    if not enabled or not offload_activations:
        return OptOutContext(), _identity
    ctx = CpuOffloadContext(
        num_layers, model_layers, policy=policy, min_offload_bytes=min_offload_bytes,
        retain_pinned_cpu_buffers=retain_pinned_cpu_buffers,
        prefetch_layers=prefetch_layers, host_memory_limit_bytes=host_memory_limit_bytes,
        emulate=emulate)
    return ctx, ctx.sync
