"""One record per offloaded byte range of a device storage, one ref per saved tensor.

A :class:`Record` owns everything about one transfer: the device storage it keeps alive
until the D2H copy is done, the pooled host block, the copy events and the reloaded
device copy.  Several saved tensors (the same tensor saved twice, two views of one
buffer) share one record; each of them is a :class:`SavedRef` (what the pack hook
returns to autograd) holding its own view geometry and the version it was saved at.
The record lives exactly as long as autograd keeps any of its refs: when the graph is
freed the record returns its host block to the pool.  Tensors the engine leaves on the
device are packed as :class:`Kept`.  See ``context.py`` for the stream/event design.

A record's life is an explicit state machine (:class:`State`)::

    COPYING --release--> ON_HOST --reload--> RELOADED --every ref unpacked--> ON_HOST
       |                    |                   |
       +------- graph freed (__del__) ----------+--> FREED

A record talks to its engine only through a :class:`Transport` (backend, pool, stats
sink and one callback), never through the context itself.
"""
from __future__ import annotations

import enum
import re
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch

RANGE, COPY = "range", "copy"

_set_version = torch._C._autograd._unsafe_set_version_counter


class State(enum.Enum):
    """Where a record's bytes are."""

    COPYING = "copying"      # D2H issued; the record still holds the device storage
    ON_HOST = "on_host"      # device reference dropped; the host block has the bytes
    RELOADED = "reloaded"    # H2D issued; the record holds the device copy
    FREED = "freed"          # the graph is gone; the host block is back in the pool


_MOVES = {
    State.COPYING: (State.ON_HOST, State.FREED),
    State.ON_HOST: (State.RELOADED, State.FREED),
    State.RELOADED: (State.ON_HOST, State.FREED),
    State.FREED: (),
}


class Transport:
    """What a record needs from its engine, and nothing more.

    ``backend``: streams/events/buffers (``backend.py``); ``pool``: the pinned pool;
    ``counters``: the stats dict the record increments; ``timings``: list that receives
    ``(counter, began, ended)`` copy-timing events (read later by the engine);
    ``on_device_released(key, record)``: called when the record lets go of the original
    device storage (the engine forgets the dedup key, whose data_ptr may be reused).
    """

    __slots__ = ("backend", "pool", "counters", "timings", "on_device_released")

    def __init__(self, backend, pool, counters: Dict[str, Any],
                 on_device_released: Callable[[Any, "Record"], None]) -> None:
        self.backend = backend
        self.pool = pool
        self.counters = counters
        self.timings: List[tuple] = []
        self.on_device_released = on_device_released


# -- autograd's version check ------------------------------------------------------------
# torch skips its saved-variable version check for tensors that went through
# saved_tensors_hooks, so the engine repeats it: the version is read at pack, compared at
# unpack, and the error text is autograd's own.

def version_holder(t: torch.Tensor) -> torch.Tensor:
    """A storage-free tensor sharing ``t``'s version counter (to read it at unpack).

    A detached alias shares the version counter; ``set_()`` then points it at an empty
    storage, so holding it keeps no device memory alive.  ``set_`` bumps the shared
    counter, so it is put back to the value it had (nothing else runs in between).
    """
    version = t._version
    holder = t.detach()
    holder.set_()
    _set_version((holder,), (version,))
    return holder


def producer_of(t: torch.Tensor):
    """``(node type, output_nr)`` of the node that made ``t``, or None for a leaf.

    Only the type is kept, never the node: a saved value holding its own graph node
    would form a reference cycle through C++ that gc cannot break."""
    fn = t.grad_fn
    return None if fn is None else (type(fn), t.output_nr)


def check_version(current: int, saved: int, dtype, device, size, producer) -> None:
    """Raise autograd's in-place ``RuntimeError`` when ``current != saved``."""
    if current == saved:
        return
    kind = torch.empty(0, dtype=dtype, device=device).type()
    shape = "[" + ", ".join(str(s) for s in size) + "]"
    made_by = ""
    if producer is not None:
        name = re.sub(r"Backward\d*$", "", producer[0].__name__)
        made_by = f", which is output {producer[1]} of {name},"
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{kind} {shape}]{made_by} is at version {current}; expected "
        f"version {saved} instead. Hint: the tensor was saved through moe_offload's "
        "offload hooks; enable anomaly detection to find the operation that failed to "
        "compute its gradient, with torch.autograd.set_detect_anomaly(True).")


class Kept:
    """A saved tensor left on the device (or a parameter), with its saved version."""

    __slots__ = ("tensor", "version", "producer")

    def __init__(self, t: torch.Tensor) -> None:
        producer = producer_of(t) if t.requires_grad else None
        # A saved output returned as itself would form a cycle through C++ (tensor ->
        # grad_fn -> saved variable -> tensor) that gc cannot break: keep a detached
        # alias (same storage and version counter, no grad_fn; autograd reattaches it).
        self.tensor = t if producer is None else t.detach()
        self.version = t._version
        self.producer = producer

    def unpack(self) -> torch.Tensor:
        t = self.tensor
        if t._version != self.version:
            check_version(t._version, self.version, t.dtype, t.device, t.shape,
                          self.producer)
        return t


# -- offloaded records ---------------------------------------------------------------------

class Geometry:
    """How to rebuild one saved tensor from its record's bytes."""

    __slots__ = ("dtype", "size", "stride", "abs_offset", "rel_offset")

    def __init__(self, dtype, size, stride, abs_offset: int, rel_offset: int) -> None:
        self.dtype = dtype
        self.size = tuple(size)
        self.stride = tuple(stride)
        self.abs_offset = abs_offset    # element offset in the original storage
        self.rel_offset = rel_offset    # element offset in the record's byte range


def view_of_storage(storage: torch.UntypedStorage, dtype, elem_offset: int, size, stride):
    """A tensor of ``dtype`` with exactly this geometry on ``storage`` (no copy)."""
    with torch.no_grad():
        return torch.empty(0, dtype=dtype, device=storage.device).set_(
            storage, elem_offset, size, stride)


def _contiguous_strides(size) -> tuple:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class Record:
    """State of one transfer (see module docstring)."""

    __slots__ = ("tx", "key", "layer", "device", "mode", "start", "nbytes", "gpu",
                 "block", "compute", "done", "reload_event", "dev_strong", "dev_weak",
                 "live_refs", "unpacked", "gen", "step", "state", "src", "holder",
                 "__weakref__")

    def __init__(self, tx: Transport, key, layer: int, device, mode: str, start: int,
                 nbytes: int, gpu: Any, block, compute) -> None:
        self.tx = tx
        self.key = key
        self.layer = layer
        self.device = device
        self.mode = mode
        self.start = start          # byte offset of the range in the device storage
        self.nbytes = nbytes
        self.gpu = gpu              # COPYING only: RANGE: the UntypedStorage; COPY: the view
        self.block = block          # pool block; host bytes = block.buffer[:nbytes]
        self.compute = compute      # compute stream at pack time
        self.done = None            # D2H done event
        self.reload_event = None    # latest H2D event
        self.dev_strong: Optional[torch.UntypedStorage] = None   # RELOADED only
        self.dev_weak = None        # weakref to the last reloaded storage (ON_HOST cache)
        self.live_refs = 0
        self.unpacked = 0           # refs unpacked since the latest reload/promotion
        self.gen = 0                # bumped at every reload/promotion
        self.step = None            # the engine's step (set by the engine)
        self.state = State.COPYING
        # The first saved tensor (weakly) and its version holder: a dedup hit on the
        # very same tensor object (an output saved by two ops) shares the holder.
        self.src = None
        self.holder = None

    def _move(self, to: State) -> None:
        if to not in _MOVES[self.state]:
            raise RuntimeError(f"moe_offload: record cannot go from {self.state.name} "
                               f"to {to.name}")
        self.state = to

    # -- forward ---------------------------------------------------------------------
    def start_d2h(self, ready) -> None:
        """Copy device bytes into the host block on the D2H stream (see context.py)."""
        be = self.tx.backend
        be.ensure_streams(self.device)
        s = be.d2h_stream
        host = self.block.buffer[:self.nbytes]
        be.wait_event(s, ready)                    # the data is final
        be.wait_event(s, self.block.last_event)    # the block's previous copy finished
        with be.stream(s):
            be.before_copy(s, "d2h")
            began = be.record_event(s, timing=True)
            if self.mode == RANGE:
                src = torch.empty(0, dtype=torch.uint8, device=self.device).set_(
                    self.gpu, self.start, (self.nbytes,), (1,))
            else:
                src = self.gpu.contiguous().view(-1).view(torch.uint8)
            host.copy_(src, non_blocking=True)
            self.done = be.record_event(s, timing=True)
        self.block.last_event = self.done
        if began is not None:
            self.tx.timings.append(("d2h_copy_seconds", began, self.done))

    def release_gpu(self, force: bool) -> bool:
        """COPYING -> ON_HOST: drop the device reference once the D2H copy is done.

        ``force=False``: only if ``done.query()`` (no wait).  ``force=True``: make the
        compute stream wait on ``done`` first, so the caching allocator (which reuses
        the block in compute-stream order) cannot hand it out before the copy read it.
        """
        if self.state is not State.COPYING:
            return True
        be = self.tx.backend
        if not force and not be.query(self.done):
            return False
        if force:
            if not be.query(self.done):
                self.tx.counters["forced_waits"] += 1
            be.wait_event(self.compute, self.done)
        self.gpu = None
        self._move(State.ON_HOST)
        self.tx.on_device_released(self.key, self)
        return True

    # -- backward --------------------------------------------------------------------
    def _reload(self) -> None:
        be = self.tx.backend
        with be.stream(self.compute):              # allocate in the compute pool
            buf = be.empty_device(self.nbytes, self.device)
        allocated = be.record_event(self.compute)
        s = be.h2d_stream
        be.wait_event(s, allocated)   # the block may still be read by earlier compute
        be.wait_event(s, self.done)   # never race our own D2H (Megatron #7398)
        with be.stream(s):
            be.before_copy(s, "h2d")
            began = be.record_event(s, timing=True)
            buf.copy_(self.block.buffer[:self.nbytes], non_blocking=True)
            self.reload_event = be.record_event(s, timing=True)
        self.block.last_event = self.reload_event
        if began is not None:
            self.tx.timings.append(("h2d_copy_seconds", began, self.reload_event))
        storage = buf.untyped_storage()
        self.dev_weak = weakref.ref(storage)
        self._hold(storage)
        self.tx.counters["reloaded_tensors"] += 1
        self.tx.counters["reloaded_bytes"] += self.nbytes

    def _hold(self, storage) -> None:
        """ON_HOST -> RELOADED: hold a device copy until every live ref unpacked it."""
        self._move(State.RELOADED)
        self.dev_strong = storage
        self.gen += 1
        self.unpacked = 0

    def prefetch(self, counter: str = "prefetched_reloads") -> None:
        """Make sure a device copy exists (or is on its way) for this backward pass."""
        if self.state is not State.ON_HOST:
            return
        alive = self.dev_weak() if self.dev_weak is not None else None
        if alive is not None:                      # still alive from an earlier pass
            self._hold(alive)
            return
        self._reload()
        self.tx.counters[counter] += 1

    def unpack(self, ref: "SavedRef") -> torch.Tensor:
        g = ref.geom
        if ref.holder._version != ref.version:
            check_version(ref.holder._version, ref.version, g.dtype, self.device, g.size,
                          ref.producer)
        if self.state is State.COPYING:            # never released: original bytes
            if self.mode == COPY:
                return self.gpu
            return view_of_storage(self.gpu, g.dtype, g.abs_offset, g.size, g.stride)
        if self.state is State.ON_HOST:
            self.prefetch("inline_reloads")        # not prefetched: reload now (slower)
        storage = self.dev_strong
        be = self.tx.backend
        be.wait_event(be.current_stream(), self.reload_event)
        if self.mode == COPY:
            out = view_of_storage(storage, g.dtype, 0, g.size, _contiguous_strides(g.size))
            if g.stride != out.stride():
                # A strided view with holes travelled as a contiguous copy.  Give it back
                # its exact strides (a GEMM may pick another kernel for another leading
                # dimension, and offload must not change a single bit): one device copy
                # on the compute stream, which already waited on the reload.
                strided = torch.empty_strided(g.size, g.stride, dtype=g.dtype, device=out.device)
                strided.copy_(out)
                out = strided
        else:
            out = view_of_storage(storage, g.dtype, g.rel_offset, g.size, g.stride)
        if ref.seen_gen != self.gen:
            ref.seen_gen = self.gen
            self.unpacked += 1
        self._maybe_demote()
        return out

    def _maybe_demote(self) -> None:
        # RELOADED -> ON_HOST.  Every live referrer has its tensor now (or died
        # unpacked): the device copy stays alive only through the unpacked tensors
        # (weakref), so it is freed with the last backward use.  Compute waits on the
        # reload event first: when no referrer was unpacked (graph freed, exception)
        # nobody waited yet, and the pending H2D must not write into a block compute may
        # reuse.  (A repeated wait on a completed event is free.)
        if self.state is State.RELOADED and self.unpacked >= self.live_refs:
            self.tx.backend.wait_event(self.compute, self.reload_event)
            self.dev_strong = None
            self._move(State.ON_HOST)

    def drop_ref(self, ref: "SavedRef") -> None:
        self.live_refs -= 1
        if ref.seen_gen == self.gen and self.gen:
            self.unpacked -= 1
        self._maybe_demote()

    def __del__(self) -> None:
        # The graph is gone.  Make compute wait for copies that may still touch device
        # memory we hold, then return the host block (its last_event is the later copy).
        try:
            be = self.tx.backend
            if self.state is State.COPYING:
                be.wait_event(self.compute, self.done)
                self.gpu = None
                self.tx.on_device_released(self.key, self)
            elif self.state is State.RELOADED:
                be.wait_event(self.compute, self.reload_event)
                self.dev_strong = None
            self._move(State.FREED)
            self.tx.pool.release(self.block)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class SavedRef:
    """What the pack hook hands to autograd for one offloaded saved tensor.

    ``holder`` shares the saved tensor's version counter without its storage (see
    :func:`version_holder`), so an in-place write after the save is detected at unpack.
    """

    __slots__ = ("record", "geom", "seen_gen", "version", "producer", "holder")

    def __init__(self, record: Record, geom: Geometry, t: torch.Tensor) -> None:
        self.record = record
        self.geom = geom
        self.seen_gen = 0
        self.version = t._version
        self.producer = producer_of(t) if t.requires_grad else None
        src = record.src() if record.src is not None else None
        if src is t:
            self.holder = record.holder          # same tensor: same version counter
        else:
            self.holder = version_holder(t)
            if record.src is None:
                record.src, record.holder = weakref.ref(t), self.holder
        record.live_refs += 1

    def __del__(self) -> None:
        try:
            self.record.drop_ref(self)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class PackedComposite:
    """A ``__tensor_flatten__`` subclass, packed component by component."""

    __slots__ = ("cls", "meta", "size", "stride", "inner")

    def __init__(self, cls, meta, size, stride, inner: dict) -> None:
        self.cls = cls
        self.meta = meta
        self.size = size
        self.stride = stride
        self.inner = inner
