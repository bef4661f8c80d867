"""Pinned host-buffer pool, keyed by byte-size class.

MoE shapes change from step to step, so buffers are pooled by size class (sizes rounded
up to quarter-octave classes: 2^k * {1, 1.25, 1.5, 1.75}) and handed out as views of the
class buffer; a request may take a free block of up to twice its class.  In steady state
no ``cudaHostAlloc`` happens; ``allocs`` counts them.

Reuse safety: a block remembers the event of the last copy that touched it (the D2H
that wrote it, or the latest H2D that read it).  Only the copy engine ever touches a
block, so the next D2H into it makes the D2H *stream* wait on that event: a GPU-side
wait, no host sync.  ``trim()`` (used when ``retain_pinned_cpu_buffers=False``) is the
one place that synchronizes the host on a block's last event before letting go of it.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

_MIN_CLASS = 4096


def size_class(nbytes: int) -> int:
    """Smallest quarter-octave class (>= 4 KiB) holding ``nbytes``."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    top = 1 << (nbytes - 1).bit_length()      # power of two >= nbytes
    base = top >> 1
    for quarter in (5, 6, 7):                 # base * 1.25, 1.5, 1.75
        candidate = base * quarter // 4
        if candidate >= nbytes:
            return candidate
    return top


class Block:
    """One pooled host buffer; ``last_event`` is the last copy that used it."""

    __slots__ = ("buffer", "size_class", "last_event")

    def __init__(self, buffer: torch.Tensor, cls: int) -> None:
        self.buffer = buffer
        self.size_class = cls
        self.last_event = None


class PinnedPool:
    """Size-class pool of host buffers with an optional byte cap."""

    def __init__(self, backend, limit_bytes: Optional[int]) -> None:
        self.backend = backend
        self.limit_bytes = limit_bytes
        self.free: Dict[int, List[Block]] = {}
        self.total_bytes = 0      # bytes of all blocks owned by the pool (free or lent)
        self.lent = 0             # blocks currently held by records
        self.allocs = 0           # host allocations ever made
        self.host_ptrs = set()    # data_ptrs of our buffers: never offloaded again

    def acquire(self, nbytes: int) -> Optional[Block]:
        """A block of at least ``nbytes``, or None when the cap forbids a new one."""
        cls = size_class(nbytes)
        # Smallest free class that fits, up to 2x: a step with fewer tokens reuses the
        # buffers of a bigger one instead of allocating.
        for c in sorted(c for c, bucket in self.free.items() if bucket and cls <= c <= 2 * cls):
            self.lent += 1
            return self.free[c].pop()
        if self.limit_bytes is not None and self.total_bytes + cls > self.limit_bytes:
            return None
        block = Block(self.backend.empty_host(cls), cls)
        self.host_ptrs.add(block.buffer.data_ptr())
        self.total_bytes += cls
        self.allocs += 1
        self.lent += 1
        return block

    def release(self, block: Block) -> None:
        """Give a block back (its ``last_event`` must already be set)."""
        self.lent -= 1
        self.free.setdefault(block.size_class, []).append(block)

    def trim(self) -> None:
        """Drop every free block (waits on the host for each block's last copy)."""
        for bucket in self.free.values():
            for block in bucket:
                self.backend.synchronize(block.last_event)
                self.total_bytes -= block.size_class
                self.host_ptrs.discard(block.buffer.data_ptr())
        self.free.clear()
        if not self.backend.emulated and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()
