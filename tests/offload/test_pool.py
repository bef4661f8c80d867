"""Pinned pool: size classes, reuse across steps (varying token counts), trim, cap."""
import gc

import torch

from moe_offload.offload import get_cpu_offload_context
from moe_offload.offload.backend import EmulateBackend
from moe_offload.offload.pool import PinnedPool, size_class
from tests.offload._helpers import SMALL, Block, forward_stack

EMU = dict(emulate=True, min_offload_bytes=SMALL)


def test_pool_reused_across_steps_and_trimmed():
    layers = [Block() for _ in range(3)]
    ctx, sync = get_cpu_offload_context(True, 2, 3, **EMU)
    for T in (16, 24, 16, 24, 20, 16):          # varying token counts (MoE-like)
        x = torch.randn(T, 32, requires_grad=True)
        forward_stack(layers, x, ctx, sync).sum().backward()
        if T == 24 and ctx.stats()["pinned_allocs"] > 0:
            allocs_after_warmup = ctx.stats()["pinned_allocs"]
    gc.collect()
    assert ctx.stats()["pinned_allocs"] == allocs_after_warmup    # no new host allocs
    assert ctx.pool.lent == 0 and ctx.stats()["pinned_pool_bytes"] > 0
    ctx2, sync2 = get_cpu_offload_context(True, 2, 3, retain_pinned_cpu_buffers=False, **EMU)
    x = torch.randn(16, 32, requires_grad=True)
    forward_stack(layers, x, ctx2, sync2).sum().backward()
    gc.collect()
    assert ctx2.stats()["pinned_pool_bytes"] == 0


def test_size_classes():
    assert size_class(1) == 4096 and size_class(4096) == 4096
    assert size_class(4097) == 5120 and size_class(6000) == 6144
    assert size_class(7000) == 7168 and size_class(8000) == 8192
    for n in (5000, 10 ** 6, 3 * 10 ** 7 + 1):
        c = size_class(n)
        assert n <= c <= 1.25 * n + 4096


def test_acquire_release_and_limit():
    pool = PinnedPool(EmulateBackend(), limit_bytes=3 * 4096)
    a = pool.acquire(100)
    b = pool.acquire(5000)                       # class 5120: 4096 + 5120 owned
    assert pool.acquire(4096) is None            # would pass the cap
    assert pool.lent == 2 and pool.allocs == 2
    pool.release(a)
    assert pool.acquire(10) is a                 # reused, no new allocation
    pool.release(a)
    pool.release(b)
    assert pool.acquire(4000) is a               # smallest free class that fits
    pool.release(a)
    pool.trim()
    assert pool.total_bytes == 0 and not pool.host_ptrs
