"""One record per offloaded byte range of a device storage, one ref per saved tensor.

A :class:`Record` owns everything about one transfer: the device storage it keeps alive
until the D2H copy is done, the pooled host block, the copy events and the reloaded
device copy.  Several saved tensors (the same tensor saved twice, two views of one
buffer) share one record; each of them is a :class:`SavedRef` (what the pack hook
returns to autograd) holding its own view geometry.  The record lives exactly as long as
autograd keeps any of its refs: when the graph is freed the record returns its host
block to the pool.  See ``context.py`` for the stream/event design.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

RANGE, COPY = "range", "copy"


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

    __slots__ = ("eng", "key", "layer", "device", "mode", "start", "nbytes", "gpu",
                 "block", "compute", "done", "reload_event", "dev_strong", "dev_weak",
                 "live_refs", "unpacked", "gen", "step", "__weakref__")

    def __init__(self, eng, key, layer: int, device, mode: str, start: int, nbytes: int,
                 gpu: Any, block, compute) -> None:
        self.eng = eng
        self.key = key
        self.layer = layer
        self.device = device
        self.mode = mode
        self.start = start          # byte offset of the range in the device storage
        self.nbytes = nbytes
        self.gpu = gpu              # RANGE: the UntypedStorage; COPY: the source view
        self.block = block          # pool block; host bytes = block.buffer[:nbytes]
        self.compute = compute      # compute stream at pack time
        self.done = None            # D2H done event
        self.reload_event = None    # latest H2D event
        self.dev_strong: Optional[torch.UntypedStorage] = None
        self.dev_weak = None        # weakref to the last reloaded storage
        self.live_refs = 0
        self.unpacked = 0           # refs unpacked since the latest reload/promotion
        self.gen = 0                # bumped at every reload/promotion
        self.step = None            # the engine's step (set by the engine)

    # -- forward ---------------------------------------------------------------------
    def start_d2h(self, ready) -> None:
        """Copy device bytes into the host block on the D2H stream (see context.py)."""
        be = self.eng.backend
        be.ensure_streams(self.device)
        s = be.d2h_stream
        host = self.block.buffer[:self.nbytes]
        be.wait_event(s, ready)                    # the data is final
        be.wait_event(s, self.block.last_event)    # the block's previous copy finished
        with be.stream(s):
            be.sleep(s, self.eng.debug_delay_d2h())
            began = be.record_event(s, timing=True)
            if self.mode == RANGE:
                src = torch.empty(0, dtype=torch.uint8, device=self.device).set_(
                    self.gpu, self.start, (self.nbytes,), (1,))
            else:
                src = self.gpu.contiguous().view(-1).view(torch.uint8)
            host.copy_(src, non_blocking=True)
            self.done = be.record_event(s, timing=True)
        self.block.last_event = self.done
        self.eng.time_copy("d2h_copy_seconds", began, self.done)

    def release_gpu(self, force: bool) -> bool:
        """Drop the device reference once the D2H copy is done.

        ``force=False``: only if ``done.query()`` (no wait).  ``force=True``: make the
        compute stream wait on ``done`` first, so the caching allocator (which reuses
        the block in compute-stream order) cannot hand it out before the copy read it.
        """
        if self.gpu is None:
            return True
        be = self.eng.backend
        if not force and not be.query(self.done):
            return False
        if force:
            if not be.query(self.done):
                self.eng.counters["forced_waits"] += 1
            be.wait_event(self.compute, self.done)
        self.gpu = None
        self.eng.forget_key(self.key, self)
        return True

    # -- backward --------------------------------------------------------------------
    def _reload(self) -> None:
        be = self.eng.backend
        with be.stream(self.compute):              # allocate in the compute pool
            buf = be.empty_device(self.nbytes, self.device)
        allocated = be.record_event(self.compute)
        s = be.h2d_stream
        be.wait_event(s, allocated)   # the block may still be read by earlier compute
        be.wait_event(s, self.done)   # never race our own D2H (Megatron #7398)
        with be.stream(s):
            be.sleep(s, self.eng.debug_delay_h2d())
            began = be.record_event(s, timing=True)
            buf.copy_(self.block.buffer[:self.nbytes], non_blocking=True)
            self.reload_event = be.record_event(s, timing=True)
        self.block.last_event = self.reload_event
        self.eng.time_copy("h2d_copy_seconds", began, self.reload_event)
        storage = buf.untyped_storage()
        self.dev_strong = storage
        self.dev_weak = weakref.ref(storage)
        self.gen += 1
        self.unpacked = 0
        self.eng.counters["reloaded_tensors"] += 1
        self.eng.counters["reloaded_bytes"] += self.nbytes

    def prefetch(self, counter: str = "prefetched_reloads") -> None:
        """Make sure a device copy exists (or is on its way) for this backward pass."""
        if self.gpu is not None or self.dev_strong is not None:
            return
        alive = self.dev_weak() if self.dev_weak is not None else None
        if alive is not None:                      # still alive from an earlier pass
            self.dev_strong = alive
            self.gen += 1
            self.unpacked = 0
            return
        self._reload()
        self.eng.counters[counter] += 1

    def unpack(self, ref: "SavedRef") -> torch.Tensor:
        g = ref.geom
        if self.gpu is not None:                   # never released: original bytes
            if self.mode == COPY:
                return self.gpu
            return view_of_storage(self.gpu, g.dtype, g.abs_offset, g.size, g.stride)
        if self.dev_strong is None:
            self.prefetch("inline_reloads")      # not prefetched: reload now (slower)
        storage = self.dev_strong
        if storage is None:                         # pragma: no cover - defensive
            raise RuntimeError("moe_offload: record has no device copy after reload")
        be = self.eng.backend
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
        # Every live referrer has its tensor now (or died unpacked): the device copy
        # stays alive only through the unpacked tensors (weakref), so it is freed with
        # the last backward use.  Compute waits on the reload event first: when no
        # referrer was unpacked (graph freed, exception) nobody waited yet, and the
        # pending H2D must not write into a block compute may reuse.  (A repeated wait
        # on a completed event is free.)
        if self.dev_strong is not None and self.unpacked >= self.live_refs:
            self.eng.backend.wait_event(self.compute, self.reload_event)
            self.dev_strong = None

    def drop_ref(self, ref: "SavedRef") -> None:
        self.live_refs -= 1
        if ref.seen_gen == self.gen and self.gen:
            self.unpacked -= 1
        self._maybe_demote()

    def __del__(self) -> None:
        # The graph is gone.  Make compute wait for copies that may still touch device
        # memory we hold, then return the host block (its last_event is the later copy).
        try:
            be = self.eng.backend
            if self.gpu is not None:
                be.wait_event(self.compute, self.done)
                self.gpu = None
                self.eng.forget_key(self.key, self)
            if self.dev_strong is not None:
                be.wait_event(self.compute, self.reload_event)
                self.dev_strong = None
            self.eng.pool.release(self.block)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class SavedRef:
    """What the pack hook hands to autograd for one offloaded saved tensor."""

    __slots__ = ("record", "geom", "seen_gen")

    def __init__(self, record: Record, geom: Geometry) -> None:
        self.record = record
        self.geom = geom
        self.seen_gen = 0
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
