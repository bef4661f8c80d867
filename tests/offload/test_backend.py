"""The stream/event protocol, checked on a logging backend (CPU).

The emulate backend's events are no-ops, so these tests replace it with one that
names streams and events and logs every record/wait, then check the orderings the
design in ``context.py`` promises.
"""
import gc

import torch

from moe_offload.offload import get_cpu_offload_context
from moe_offload.offload.backend import EmulateBackend
from tests.offload._helpers import SMALL, Block


class Ev:
    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def __repr__(self):
        return f"Ev({self.stream}#{self.n})"


class LoggingBackend(EmulateBackend):
    """Emulation with named streams and distinct events; logs every call."""

    def __init__(self, done=True):
        super().__init__()
        self.d2h_stream, self.h2d_stream = "d2h", "h2d"
        self.log = []
        self.done = done

    def current_stream(self):
        return "compute"

    def record_event(self, stream, timing=False):
        ev = Ev(stream, len(self.log))
        self.log.append(("record", stream, ev))
        return ev

    def wait_event(self, stream, event):
        self.log.append(("wait", stream, event))

    def query(self, event):
        return self.done

    def before_copy(self, stream, direction):
        self.log.append(("copy", stream, None))     # called right before each copy


def _setup(done=True, L=3):
    layers = [Block() for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, L - 1, L, emulate=True, min_offload_bytes=SMALL)
    ctx.backend = ctx.pool.backend = LoggingBackend(done)
    return layers, ctx, sync


def _forward(layers, ctx, sync):
    h = torch.randn(16, 32, requires_grad=True)
    for layer in layers:
        with ctx:
            h = layer(h)
        h = sync(h)
    return h


def _index(log, entry):
    return next(i for i, e in enumerate(log) if e == entry)


def test_d2h_waits_ready_and_h2d_waits_allocated_and_done():
    layers, ctx, sync = _setup()
    h = _forward(layers, ctx, sync)
    log = ctx.backend.log
    d2h_copies = [i for i, e in enumerate(log) if e[:2] == ("copy", "d2h")]
    assert len(d2h_copies) == 4                       # x and a of layers 0 and 1
    for i in d2h_copies:
        waits = [e for e in log[max(0, i - 3):i] if e[:2] == ("wait", "d2h")]
        assert waits and waits[0][2].stream == "compute"   # the ready event
    n_fwd = len(log)
    h.sum().backward()
    log = log[n_fwd:]
    h2d_copies = [i for i, e in enumerate(log) if e[:2] == ("copy", "h2d")]
    assert len(h2d_copies) == 4
    for i in h2d_copies:
        before = log[i - 3:i]
        assert before[0][:2] == ("record", "compute")                 # allocated
        assert before[1] == ("wait", "h2d", before[0][2])              # h2d waits on it
        assert before[2][:2] == ("wait", "h2d") and before[2][2].stream == "d2h"  # done
        reload_ev = log[i + 2][2]                                      # began, then reload
        assert log[i + 2][:2] == ("record", "h2d")
        assert ("wait", "compute", reload_ev) in log[i:]              # unpack waits


def test_forced_release_waits_on_done_on_compute():
    layers, ctx, sync = _setup(done=False, L=4)
    h = _forward(layers, ctx, sync)
    log = ctx.backend.log
    dones = [log[i + 2][2] for i, e in enumerate(log) if e[:2] == ("copy", "d2h")]
    assert len(dones) == 6
    for ev in dones:
        assert ("wait", "compute", ev) in log
    h.sum().backward()


def test_reload_dropped_before_unpack_makes_compute_wait():
    layers, ctx, sync = _setup()
    h = _forward(layers, ctx, sync)
    step = ctx._step
    ctx._on_layer_backward(step, 1)                  # prefetch layers 1 and 0
    log = ctx.backend.log
    reloads = [log[i + 2][2] for i, e in enumerate(log) if e[:2] == ("copy", "h2d")]
    assert len(reloads) == 4
    n = len(log)
    del h                                            # free the graph: nothing unpacked
    gc.collect()
    for ev in reloads:
        assert ("wait", "compute", ev) in log[n:]
    assert ctx.pool.lent == 0


def test_delayed_copies_wraps_and_forwards():
    """The test-only delay wrapper forwards every call and runs before each copy."""
    from moe_offload.offload.backend import DelayedCopies, add_copy_delays
    layers, ctx, sync = _setup()
    logging = ctx.backend
    add_copy_delays(ctx, d2h_cycles=10, h2d_cycles=20)
    add_copy_delays(ctx, d2h_cycles=30)               # replaces, does not stack
    assert isinstance(ctx.backend, DelayedCopies) and ctx.backend.inner is logging
    assert ctx.backend.d2h_cycles == 30 and ctx.backend.h2d_cycles == 0
    _forward(layers, ctx, sync).sum().backward()
    copies = [e for e in logging.log if e[0] == "copy"]
    assert {e[1] for e in copies} == {"d2h", "h2d"}
