"""Nested opt-out, policies, marks, and context misuse."""
import pytest
import torch

from moe_offload.offload import (get_cpu_offload_context, is_cpu_offload_enabled,
                                 mark_activation_offload, mark_not_offload, start_offload)
from moe_offload.offload import marks
from tests.offload._helpers import SMALL, PairStorage, no_saved_tensor_hooks, split_scaled

EMU = dict(emulate=True, min_offload_bytes=SMALL)


def _save(*tensors):
    """A graph node saving exactly ``tensors`` (returns an output to keep it alive)."""
    class Save(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *ts):
            ctx.save_for_backward(*ts)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            ctx.saved_tensors
            return (g,) + (None,) * len(tensors)
    return Save.apply(torch.ones(1, requires_grad=True), *tensors)


def test_nested_disabled_context_opts_out():
    ctx, _ = get_cpu_offload_context(True, emulate=True, min_offload_bytes=SMALL)
    off, off_sync = get_cpu_offload_context(enabled=False)
    a, b, c = (torch.randn(1024) for _ in range(3))
    with ctx:
        assert is_cpu_offload_enabled()
        y1 = _save(a)
        with off:
            assert not is_cpu_offload_enabled()
            y2 = _save(b)                          # stays on device
        assert is_cpu_offload_enabled()
        y3 = _save(c)                              # outer resumes
    assert not is_cpu_offload_enabled()
    s = ctx.stats()
    assert s["offloaded_tensors"] == 2 and s["kept_on_device_tensors"] == 0
    assert off_sync(a) is a and off.stats()["offloaded_tensors"] == 0
    (y1 + y2 + y3).sum().backward()


def test_enabled_inside_enabled_raises():
    ctx, _ = get_cpu_offload_context(True, emulate=True)
    other, _ = get_cpu_offload_context(True, emulate=True)
    with ctx:
        with pytest.raises(RuntimeError, match="another"):
            with other:
                pass
        with pytest.raises(RuntimeError):
            with ctx:
                pass
    assert no_saved_tensor_hooks()
    assert not is_cpu_offload_enabled()


def test_policy_marked_vs_auto():
    a, b = torch.randn(1024), torch.randn(1024)
    mark_activation_offload(a)
    for policy, expected in (("auto", 2), ("marked", 1)):
        ctx, _ = get_cpu_offload_context(True, policy=policy, **EMU)
        with ctx:
            y = _save(a, b)
        assert ctx.stats()["offloaded_tensors"] == expected, policy
        y.sum().backward()


def test_mark_not_offload_and_view_of_marked():
    a, b = torch.randn(1024), torch.randn(2048)
    mark_not_offload(a, None, b)
    ctx, _ = get_cpu_offload_context(True, **EMU)
    with ctx:
        y = _save(a, b[:1024], torch.randn(1024))
    s = ctx.stats()
    assert s["offloaded_tensors"] == 1 and s["kept_on_device_tensors"] == 2
    y.sum().backward()


def test_marks_reach_composite_components():
    q = split_scaled(torch.randn(48, 8), 16)
    mark_not_offload(q)
    assert all(marks.is_marked_not_offload(t) for t in (q.top, q.bottom, q.scale))
    st = PairStorage(torch.randn(4), torch.ones(1))
    mark_activation_offload(st)
    assert marks.is_marked_offload(st.data) and marks.is_marked_offload(st.scale)

    class OnlyPrepare(PairStorage):
        component_tensors = None
    op = OnlyPrepare(torch.randn(4), torch.ones(1))
    del OnlyPrepare.component_tensors
    mark_not_offload(op)
    assert marks.is_marked_not_offload(op.data) and op.scale is not None
    with pytest.raises(TypeError):
        mark_not_offload(object())


def test_start_offload_outside_and_inside_context():
    t = torch.randn(4)
    start_offload(t)                      # no context: nothing happens
    assert not hasattr(t, marks.READY_EVENT_ATTR)
    ctx, _ = get_cpu_offload_context(True, **EMU)
    with ctx:
        start_offload(t, None)            # emulate: the event is a no-op (None)
    assert getattr(t, marks.READY_EVENT_ATTR)[0] == t._version


def test_parameters_host_and_small_never_move():
    p = torch.nn.Parameter(torch.randn(1024))
    ctx, _ = get_cpu_offload_context(True, **EMU)
    lazy_conj = torch.randn(512, dtype=torch.complex64).conj()   # conj bit: kept
    with ctx:
        y = _save(p, p.t(), torch.randn(16), lazy_conj)
    s = ctx.stats()
    assert s["offloaded_tensors"] == 0 and s["kept_on_device_tensors"] == 4
    # Not emulated on a CPU tensor: a host tensor is never moved.
    ctx2, _ = get_cpu_offload_context(True, min_offload_bytes=0)
    with ctx2:
        y2 = _save(torch.randn(1024))
    assert ctx2.stats()["offloaded_tensors"] == 0
    (y + y2).sum().backward()


def test_argument_errors():
    with pytest.raises(ValueError, match="exceeds"):
        get_cpu_offload_context(True, 5, 4)
    with pytest.raises(NotImplementedError):
        get_cpu_offload_context(True, offload_weights=True)
    with pytest.raises(ValueError):
        get_cpu_offload_context(True, policy="sometimes")
    with pytest.raises(ValueError):
        get_cpu_offload_context(True, prefetch_layers=-1)


def test_contexts_are_per_thread():
    """Like torch's saved-tensor hooks, an entered context belongs to its thread."""
    import threading
    ctx, _ = get_cpu_offload_context(True, **EMU)
    other, _ = get_cpu_offload_context(True, **EMU)
    seen = {}

    def worker():
        seen["enabled_before"] = is_cpu_offload_enabled()
        with other:                                   # no RuntimeError: other thread
            seen["enabled_inside"] = is_cpu_offload_enabled()

    with ctx:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert is_cpu_offload_enabled()
    assert seen == {"enabled_before": False, "enabled_inside": True}


def test_region_stack_is_the_one_active_engine_state():
    ctx, _ = get_cpu_offload_context(True, **dict(emulate=True, min_offload_bytes=SMALL))
    opt, _ = get_cpu_offload_context(False)
    assert marks.regions() == [] and marks.active_engine() is None
    with ctx:
        assert [r.owner for r in marks.regions()] == [ctx]
        assert marks.active_engine() is ctx and marks.owner_entered(ctx)
        with opt:
            assert [r.owner for r in marks.regions()] == [ctx, opt]
            assert marks.active_engine() is None and marks.owner_entered(ctx)
        assert marks.active_engine() is ctx
    assert marks.regions() == [] and no_saved_tensor_hooks()


def test_set_active_engine_stands_in_a_fake_engine():
    class Fake:
        def __init__(self):
            self.ready = []

        def record_ready(self, t):
            self.ready.append(t)

    fake = Fake()
    previous = marks.set_active_engine(fake)
    try:
        t = torch.randn(3)
        marks.start_offload(t)
        assert is_cpu_offload_enabled() and fake.ready == [t]
    finally:
        marks.set_active_engine(previous)
    assert not is_cpu_offload_enabled()


def test_exit_region_out_of_order_unwinds_everything_above():
    from torch.autograd.graph import saved_tensors_hooks
    ident = lambda t: t
    outer = marks.enter_region("outer", None, saved_tensors_hooks(ident, ident))
    marks.enter_region("inner", None, saved_tensors_hooks(ident, ident))
    with pytest.raises(RuntimeError, match="reverse order"):
        marks.exit_region(outer)
    assert marks.regions() == [] and no_saved_tensor_hooks()
    marks.exit_region(outer)                   # gone already: a no-op
