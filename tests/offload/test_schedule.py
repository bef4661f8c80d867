"""Layer schedule, forced releases, prefetch, misuse errors, exceptions."""
import gc
import warnings

import pytest
import torch

from moe_offload.offload import get_cpu_offload_context, is_cpu_offload_enabled
from moe_offload.offload.backend import EmulateBackend
from tests.offload._helpers import (SMALL, Block, assert_bitwise, no_saved_tensor_hooks,
                                    run_stack)

EMU = dict(emulate=True, min_offload_bytes=SMALL)


class PendingBackend(EmulateBackend):
    """Emulation where copies never report done: every release must be forced."""

    def __init__(self):
        super().__init__()
        self.waits = 0

    def query(self, event):
        return False

    def wait_event(self, stream, event):
        self.waits += 1


def _enter_layers(ctx, sync, layers, h, after_each=None):
    for i, layer in enumerate(layers):
        with ctx:
            h = layer(h)
        h = sync(h)
        if after_each:
            after_each(i)
    return h


def test_num_layers_model_layers_schedule():
    L = 4
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 2, L, **EMU)
    h = _enter_layers(ctx, sync, layers, torch.randn(16, 32, requires_grad=True))
    gc.collect()
    assert [layer.hidden_storage() is None for layer in layers] == [True, True, False, False]
    h.sum().backward()


def test_model_layers_learned_at_first_backward_and_wrap():
    L = 3
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, **EMU)
    x = torch.randn(16, 32, requires_grad=True)
    _enter_layers(ctx, sync, layers, x).sum().backward()
    assert ctx.model_layers == L
    first = ctx.stats()["offloaded_tensors"]
    assert first == 2 * L                       # first forward: every layer offloads
    ctx.reset_stats()
    _enter_layers(ctx, sync, layers, x).sum().backward()
    assert ctx.stats()["offloaded_tensors"] == 2 * (L - 1)   # now the last stays
    # model_layers known: the 4th entry wraps to a new step (its layer 0 offloads).
    ctx2, sync2 = get_cpu_offload_context(True, 1, 2, **EMU)
    _enter_layers(ctx2, sync2, layers[:2] + layers[:1], x)
    assert ctx2.stats()["offloaded_tensors"] == 4
    # num_layers larger than the learned model_layers: a clear error at the next entry.
    ctx3, sync3 = get_cpu_offload_context(True, 5, **EMU)
    _enter_layers(ctx3, sync3, layers, x).sum().backward()
    with pytest.raises(ValueError, match="exceeds model_layers=3"):
        with ctx3:
            pass
    assert no_saved_tensor_hooks()


def test_forced_release_schedule_without_completed_copies():
    L = 5
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 4, L, **EMU)
    backend = ctx.backend = PendingBackend()
    ctx.pool.backend = backend
    alive = []

    def check(i):
        gc.collect()
        alive.append([layer.hidden_storage() is not None for layer in layers[:i + 1]])

    h = _enter_layers(ctx, sync, layers, torch.randn(16, 32, requires_grad=True), check)
    # k=4 of 5: layer i is force-released when layer i+2 is entered; all when the
    # last layer exits (end of the forward).
    assert alive[0] == [True]
    assert alive[1] == [True, True]
    assert alive[2] == [False, True, True]
    assert alive[3] == [False, False, True, True]
    assert alive[4] == [False, False, False, False, True]
    s = ctx.stats()
    assert s["forced_releases"] == 2 * 4 and s["released_on_query"] == 0
    h.sum().backward()


def test_partial_offload_releases_late_and_at_end_of_forward():
    """k=2 of L=6 offload: a copy may take until layer i + (L - k) to land (hidden under
    the rest of the forward); everything is released when the last layer exits."""
    L = 6
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 2, L, **EMU)
    backend = ctx.backend = PendingBackend()
    ctx.pool.backend = backend
    alive = []

    def check(i):
        gc.collect()
        alive.append([layer.hidden_storage() is not None for layer in layers[:min(i + 1, 2)]])

    h = _enter_layers(ctx, sync, layers, torch.randn(16, 32, requires_grad=True), check)
    assert alive[:4] == [[True], [True, True], [True, True], [True, True]]
    assert alive[4] == [False, True]          # layer 0 forced at layer 0 + 4
    assert alive[5] == [False, False]         # end of forward: all released
    assert ctx.stats()["forced_releases"] == 2 * 2
    h.sum().backward()


def test_prefetch_and_inline_reloads():
    layers = [Block() for _ in range(4)]
    x = torch.randn(16, 32)
    _, ref, _ = run_stack(layers, x)
    for prefetch in (0, 1, 3):
        _, got, ctx = run_stack(layers, x, dict(EMU, num_layers=3, model_layers=4,
                                                prefetch_layers=prefetch))
        assert_bitwise(ref, got)
        s = ctx.stats()
        assert s["inline_reloads"] == 0 and s["prefetched_reloads"] == 6
    # Without sync nothing is prefetched: every unpack reloads inline, still exact.
    ctx, _ = get_cpu_offload_context(True, 3, 4, **EMU)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    h = xg
    for layer in layers:
        with ctx:
            h = layer(h)
    (h.float() ** 2).sum().backward()
    assert_bitwise(ref, [xg.grad] + [p.grad for layer in layers for p in layer.parameters()])
    assert ctx.stats()["inline_reloads"] == 6
    # The backward still counts as the step's end: model_layers is learned without sync.
    ctx3, _ = get_cpu_offload_context(True, **EMU)
    for _ in range(2):
        h = x.clone().requires_grad_()
        for layer in layers:
            with ctx3:
                h = layer(h)
        h.sum().backward()
        assert ctx3.model_layers == 4


def test_sync_misuse():
    ctx, sync = get_cpu_offload_context(True, **EMU)
    with ctx:
        y = torch.randn(4) * 2
    with pytest.raises(ValueError, match="require grad"):
        sync(y)
    with torch.no_grad():
        assert sync(y) is y
    with pytest.raises(TypeError):
        sync([1, 2])
    ctx2, sync2 = get_cpu_offload_context(True, **EMU)
    with pytest.raises(RuntimeError, match="before any layer"):
        sync2(torch.ones(1, requires_grad=True) * 2)


def test_exception_mid_forward_leaves_nothing_behind():
    layers = [Block() for _ in range(3)]
    ctx, sync = get_cpu_offload_context(True, 2, 3, **EMU)
    x = torch.randn(16, 32, requires_grad=True)

    def boom():
        h = x
        for i, layer in enumerate(layers):
            with ctx:
                h = layer(h)
                if i == 1:
                    raise KeyError("boom")
            h = sync(h)

    with pytest.raises(KeyError):
        boom()
    assert no_saved_tensor_hooks() and not is_cpu_offload_enabled()
    gc.collect()
    assert ctx.pool.lent == 0 and ctx.stats()["pinned_blocks_in_use"] == 0
    # The next forward starts a fresh step (layer 0) and works.
    ctx.reset_stats()
    _enter_layers(ctx, sync, layers, x).sum().backward()
    assert ctx.stats()["offloaded_tensors"] == 4


def test_host_memory_limit_warns_once_and_stays_exact():
    layers = [Block() for _ in range(4)]
    x = torch.randn(64, 32)
    _, ref, _ = run_stack(layers, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, got, ctx = run_stack(layers, x, dict(EMU, num_layers=3, model_layers=4,
                                                host_memory_limit_bytes=20000))
    assert_bitwise(ref, got)
    limit_warnings = [w for w in caught if "host_memory_limit_bytes" in str(w.message)]
    assert len(limit_warnings) == 1
    s = ctx.stats()
    assert s["over_limit_tensors"] > 0 and s["offloaded_tensors"] > 0
    assert s["pinned_pool_bytes"] <= 20000


def test_overlapping_steps_prefetch_their_own_records():
    """Two forwards, then two backwards (e.g. micro-batches): each step's prehooks
    prefetch that step's records; grads equal the sequential runs."""
    layers = [Block() for _ in range(3)]
    xa, xb = torch.randn(16, 32), torch.randn(24, 32)
    _, ref_a, _ = run_stack(layers, xa)
    _, ref_b, _ = run_stack(layers, xb)
    ref = [a + b for a, b in zip(ref_a[1:], ref_b[1:])]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    ctx, sync = get_cpu_offload_context(True, 2, 3, **EMU)
    ga, gb = xa.clone().requires_grad_(), xb.clone().requires_grad_()
    ha = _enter_layers(ctx, sync, layers, ga)
    hb = _enter_layers(ctx, sync, layers, gb)
    (hb.float() ** 2).sum().backward()
    (ha.float() ** 2).sum().backward()
    assert_bitwise([ref_a[0], ref_b[0]] + ref,
                   [ga.grad, gb.grad] + [p.grad for layer in layers for p in layer.parameters()])
    s = ctx.stats()
    assert s["inline_reloads"] == 0 and s["prefetched_reloads"] == 8


def test_graph_dropped_without_backward_frees_everything():
    """Kept tensors (resident layer, opt-out region) must not form a reference cycle
    (an identity pack hook on a saved output does: tensor -> grad_fn -> saved -> tensor)."""
    layers = [Block() for _ in range(3)]
    ctx, sync = get_cpu_offload_context(True, 1, 3, **EMU)
    off, _ = get_cpu_offload_context(False)
    h = torch.randn(16, 32, requires_grad=True)
    for i, layer in enumerate(layers):
        with ctx:
            if i == 1:
                with off:
                    h = layer(h)
            else:
                h = layer(h)
        h = sync(h)
    assert all(layer.hidden_storage() is not None for layer in layers[1:])
    del h
    gc.collect()
    assert all(layer.hidden_storage() is None for layer in layers)
    assert ctx.pool.lent == 0


def test_unpack_inside_the_context_does_not_end_the_step():
    """torch.autograd.grad inside a layer (a gradient penalty) unpacks offloaded tensors
    during the forward: that must neither end the step nor learn model_layers early."""
    L = 3
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 2, **EMU)     # model_layers learned
    x = torch.randn(16, 32, requires_grad=True)
    for _ in range(2):
        h = x
        for i, layer in enumerate(layers):
            with ctx:
                h = layer(h)
                if i == 1:
                    torch.autograd.grad(h.pow(2).sum(), x, retain_graph=True)
            h = sync(h)
        h.sum().backward()
        assert ctx.model_layers == L
    assert no_saved_tensor_hooks()


def test_unpack_inside_the_context_from_autograds_thread_does_not_end_the_step():
    """On CUDA the autograd engine runs hooks on its own device thread, where this
    thread's entered regions are not visible.  An inner torch.autograd.grad whose hooks
    run on another thread (emulated here with a Python thread) must still be seen as
    inside the context: no early end of the forward, no wrong model_layers."""
    import threading
    L = 3
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 2, **EMU)     # model_layers learned
    x = torch.randn(16, 32, requires_grad=True)
    errors = []

    def penalty(h):
        try:
            torch.autograd.grad(h.pow(2).sum(), x, retain_graph=True)
        except BaseException as e:       # pragma: no cover - reported below
            errors.append(e)

    for _ in range(2):
        h = x
        for i, layer in enumerate(layers):
            with ctx:
                h = layer(h)
                if i == 1:
                    worker = threading.Thread(target=penalty, args=(h,))
                    worker.start()
                    worker.join()
            h = sync(h)
        h.sum().backward()
        assert not errors and ctx.model_layers == L
        assert ctx.stats()["forced_releases"] == 0
    assert no_saved_tensor_hooks()
