"""Dedup, views (exact geometry on reload), composite tensors and storage objects."""
import gc

import pytest
import torch

from moe_offload.offload import get_cpu_offload_context
from moe_offload.offload.saving import prepare_for_saving, restore_from_saved
from tests.offload._helpers import (SMALL, CompositeMatmul, PairStorage, StorageMatmul,
                                    assert_bitwise)

EMU = dict(emulate=True, min_offload_bytes=SMALL)


class Probe(torch.autograd.Function):
    """Saves the given tensors; backward records what it unpacked into ``seen``."""
    seen = []

    @staticmethod
    def forward(ctx, x, *ts):
        ctx.save_for_backward(*ts)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        Probe.seen = [(t.shape, t.stride(), t.clone()) for t in ctx.saved_tensors]
        return (g,) + (None,) * len(Probe.seen)


def _roundtrip(*tensors, **kw):
    ctx, _ = get_cpu_offload_context(True, **dict(EMU, **kw))
    expected = [(t.shape, t.stride(), t.clone()) for t in tensors]
    with ctx:
        y = Probe.apply(torch.ones(1, requires_grad=True), *tensors)
    del tensors
    y.sum().backward()
    for (s0, st0, v0), (s1, st1, v1) in zip(expected, Probe.seen):
        assert s0 == s1 and torch.equal(v0, v1)
        yield st0, st1
    yield ctx.stats()


def test_same_tensor_three_times_moves_once():
    t = torch.randn(4096)
    *strides, s = _roundtrip(t, t, t)
    assert s["offloaded_tensors"] == 1 and s["offloaded_bytes"] == 4096 * 4
    assert s["dedup_hits"] == 2


def test_two_halves_of_one_buffer_move_once():
    buf = torch.randn(2, 4096)
    *strides, s = _roundtrip(buf[0], buf[1])
    assert s["offloaded_tensors"] == 1 and s["offloaded_bytes"] == buf.numel() * 4


@pytest.mark.parametrize("make", [
    lambda b: b.t(),                              # full view, transposed
    lambda b: b.reshape(64, 256),                 # full view, reshaped
    lambda b: b[:, 10:120],                        # partial, >= 50%: storage moves
    lambda b: b[40:50],                            # partial dense < 50%: its range moves
    lambda b: b[10:40, ::8],                       # partial strided < 50%: contiguous copy
    lambda b: b[5].expand(7, 128),                 # stride-0 view
])
def test_views_restore_shape_and_strides(make):
    base = torch.randn(128, 128)
    view = make(base)
    strides_and_stats = list(_roundtrip(view, min_offload_bytes=0))
    (st0, st1), s = strides_and_stats
    assert st0 == st1                              # exact strides, holes included
    assert s["offloaded_tensors"] == 1


def test_partial_view_bytes():
    base = torch.randn(128, 128)
    *_, s = _roundtrip(base[40:50], min_offload_bytes=0)
    assert s["offloaded_bytes"] == 10 * 128 * 4       # only the view's range
    *_, s = _roundtrip(base[:, 10:120], min_offload_bytes=0)
    assert s["offloaded_bytes"] == 128 * 128 * 4      # whole storage


def test_composite_subclass_components_move_tiny_scale_stays():
    T, H, N = 96, 16, 8
    w = torch.randn(H, N, requires_grad=True)
    x = torch.randn(T, H)

    def run(offload):
        w.grad = None
        xi = x.clone().requires_grad_()
        ctx, sync = get_cpu_offload_context(True, num_layers=1, model_layers=1, **EMU) \
            if offload else (None, None)
        if offload:
            with ctx:
                y = CompositeMatmul.apply(xi, w, 32)       # uneven: 32 + 64 rows
            y = sync(y)
        else:
            y = CompositeMatmul.apply(xi, w, 32)
        (y ** 2).sum().backward()
        return [xi.grad, w.grad.clone()], ctx

    ref, _ = run(False)
    got, ctx = run(True)
    assert_bitwise(ref, got)
    s = ctx.stats()
    assert s["offloaded_tensors"] == 2                 # top and bottom, each on its own
    assert s["offloaded_bytes"] == T * H * 4
    assert s["kept_on_device_tensors"] == 2            # scale (4 bytes) and the small w
    assert s["reloaded_tensors"] == 2


def test_storage_object_components():
    T, H, N = 96, 16, 8
    w = torch.randn(H, N)
    x = torch.randn(T, H)

    def run(offload):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        if offload:
            ctx, sync = get_cpu_offload_context(True, num_layers=1, model_layers=1, **EMU)
            with ctx:
                y = sync(StorageMatmul.apply(xi, wi))
        else:
            ctx, y = None, StorageMatmul.apply(xi, wi)
        (y ** 2).sum().backward()
        return [xi.grad, wi.grad], ctx

    ref, _ = run(False)
    got, ctx = run(True)
    assert_bitwise(ref, got)
    s = ctx.stats()
    assert s["offloaded_bytes"] == T * H * 4           # the data component only
    assert s["kept_on_device_tensors"] == 2            # scale and the small w


def test_saving_helpers_roundtrip_and_errors():
    st = PairStorage(torch.randn(3), torch.ones(1))
    t = torch.randn(2)
    tensors, state = prepare_for_saving(None, t, st)
    assert len(tensors) == 3 and st.data is None
    none, t2, st2 = restore_from_saved(state, tensors)
    assert none is None and t2 is t and isinstance(st2, PairStorage)
    assert st2 is not st and st2.data is tensors[1] and st2.scale is tensors[2]
    assert st.data is None                     # the saved shell stays tensor-free
    with pytest.raises(TypeError):
        prepare_for_saving(3)
    with pytest.raises(ValueError):
        restore_from_saved(state, tensors[:2])


def test_small_view_of_shared_buffer_does_not_pin_it():
    """TE defect 4: data and a tiny scale share one bulk buffer; the scale is saved first.
    Both travel (the scale as its own few bytes) and the bulk buffer is freed."""
    import weakref
    bulk = torch.randn(4096 + 1)
    data, scale = bulk[:4096], bulk[4096:]
    ref = weakref.ref(bulk.untyped_storage())
    ctx, _ = get_cpu_offload_context(True, **EMU)
    with ctx:
        y = Probe.apply(torch.ones(1, requires_grad=True), scale, data)
    expected = bulk.clone()
    del bulk, data, scale
    gc.collect()
    assert ref() is None
    s = ctx.stats()
    assert s["offloaded_tensors"] == 2 and s["kept_on_device_tensors"] == 0
    y.sum().backward()
    assert torch.equal(Probe.seen[0][2], expected[4096:])
    assert torch.equal(Probe.seen[1][2], expected[:4096])


def test_restored_storage_does_not_outlive_its_backward():
    """restore_from_saved rebuilds into a copy of the shell: after the backward, the
    graph's saved state holds no component tensors (they die with the backward)."""
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    y = StorageMatmul.apply(x, w)
    y.sum().backward(retain_graph=True)
    shell = y.grad_fn.state[0][1]
    assert isinstance(shell, PairStorage) and shell.data is None and shell.scale is None
    y.sum().backward()                    # a second restore works from the same shell
    assert shell.data is None
