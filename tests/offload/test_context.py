"""Context entry rules: no_grad and backward-time entries are passive, abandoned steps,
one thread at a time, non-LIFO exits, threshold stats (CPU, emulate)."""
import threading

import pytest
import torch

from moe_offload.offload import get_cpu_offload_context, is_cpu_offload_enabled
from tests.offload._helpers import (SMALL, Block, assert_bitwise, forward_stack,
                                    no_saved_tensor_hooks, run_stack)

EMU = dict(emulate=True, min_offload_bytes=SMALL)


def _layers(L=3):
    torch.manual_seed(0)
    return [Block() for _ in range(L)]


def test_no_grad_forward_does_not_teach_layer_count():
    """model_layers=None: an evaluation forward under no_grad inside the context is not
    part of a step (else the first backward would learn 2L layers and every layer of the
    next steps would offload)."""
    L = 3
    layers = _layers(L)
    x = torch.randn(16, 32)
    ctx, sync = get_cpu_offload_context(True, **EMU)      # num_layers: all but last
    with torch.no_grad():
        forward_stack(layers, x, ctx, sync)
    assert ctx.stats()["kept_on_device_tensors"] == 0     # nothing saved, no layer
    forward_stack(layers, x.requires_grad_(), ctx, sync).sum().backward()
    assert ctx.model_layers == L
    ctx.reset_stats()
    forward_stack(layers, x, ctx, sync).sum().backward()
    assert ctx.stats()["offloaded_tensors"] == 2 * (L - 1)   # last layer resident


def test_exception_between_layers_does_not_shift_schedule():
    """A forward abandoned by an exception outside ``with ctx``: the next step starts at
    layer 0 (offloads the first layers, keeps the last resident)."""
    L = 4
    layers = _layers(L)
    ctx, sync = get_cpu_offload_context(True, 2, L, **EMU)

    def broken():
        h = torch.randn(16, 32, requires_grad=True)
        for i, layer in enumerate(layers):
            with ctx:
                h = layer(h)
            h = sync(h)
            if i == 1:
                raise KeyError("data loader failed")

    with pytest.raises(KeyError):
        broken()
    x = torch.randn(16, 32)
    ref_grads = run_stack(layers, x, None)[1]
    ctx.reset_stats()
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    h = xg
    stored = []
    for layer in layers:
        with ctx:
            h = layer(h)
        h = sync(h)
        stored.append(ctx.stats()["offloaded_tensors"])
    # layers 0 and 1 offload (2 saved storages each: x and the hidden), 2 and 3 do not
    assert stored == [2, 4, 4, 4]
    (h.float() ** 2).sum().backward()
    got = [xg.grad] + [p.grad for layer in layers for p in layer.parameters()]
    assert_bitwise(ref_grads, got)


def test_concurrent_entry_from_two_threads_raises_and_leaves_no_hooks():
    ctx, _ = get_cpu_offload_context(True, 1, 2, **EMU)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def owner():
        with ctx:
            entered.set()
            release.wait(10)
        seen["owner_clean"] = no_saved_tensor_hooks() and not is_cpu_offload_enabled()

    def intruder():
        try:
            with ctx:
                pass
        except RuntimeError as e:
            seen["error"] = str(e)
        seen["intruder_clean"] = no_saved_tensor_hooks() and not is_cpu_offload_enabled()
        ctx.__exit__(None, None, None)        # a stray exit (module post-hook) is a no-op

    t1 = threading.Thread(target=owner)
    t1.start()
    assert entered.wait(10)
    t2 = threading.Thread(target=intruder)
    t2.start()
    t2.join(10)
    release.set()
    t1.join(10)
    assert "another thread" in seen["error"]
    assert seen["intruder_clean"] and seen["owner_clean"]
    with ctx:                                 # usable again afterwards
        assert is_cpu_offload_enabled()
    assert no_saved_tensor_hooks()


def test_non_lifo_exit_raises_and_leaves_no_state():
    ctx, _ = get_cpu_offload_context(True, 1, 2, **EMU)
    opt, _ = get_cpu_offload_context(False)
    ctx.__enter__()
    opt.__enter__()
    assert not is_cpu_offload_enabled()
    with pytest.raises(RuntimeError, match="reverse order"):
        ctx.__exit__(None, None, None)
    assert not is_cpu_offload_enabled() and no_saved_tensor_hooks()
    opt.__exit__(None, None, None)             # already unwound: nothing happens
    assert not is_cpu_offload_enabled() and no_saved_tensor_hooks()
    with ctx:                                  # and the context works again
        assert is_cpu_offload_enabled()
    assert not is_cpu_offload_enabled() and no_saved_tensor_hooks()


def test_entry_inside_backward_is_passive():
    """An entry while autograd runs a backward (a recomputation calling the module's
    hooks) starts no step, installs no hooks and offloads nothing."""
    ctx, sync = get_cpu_offload_context(True, 1, 2, **EMU)
    x = torch.randn(64, 32, requires_grad=True)
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(c, t):
            return t.clone()

        @staticmethod
        def backward(c, g):
            with torch.enable_grad():
                with ctx:
                    seen["enabled"] = is_cpu_offload_enabled()
                    y = (g.detach().requires_grad_() * 3).sin()
                seen["step"] = ctx._step
            return g

    with ctx:
        h = Probe.apply(x).sin()
    step = ctx._step
    h = sync(h)
    before = ctx.stats()["offloaded_tensors"]
    h.sum().backward()
    assert seen == {"enabled": False, "step": step}
    assert ctx.stats()["offloaded_tensors"] == before


def test_below_threshold_is_counted():
    """A tiny model under the default threshold offloads nothing, and stats say why."""
    layers = _layers(2)
    _, _, ctx = run_stack(layers, torch.randn(4, 32), dict(emulate=True, num_layers=1,
                                                           model_layers=2))
    s = ctx.stats()
    # layer 0 saves x and its hidden (twice: relu output and mm input)
    assert s["offloaded_tensors"] == 0 and s["below_threshold_tensors"] == 3
    assert s["below_threshold_bytes"] == 4 * 32 * 4 + 2 * 4 * 64 * 4


# -- nothing of a step outlives it, and nothing needs the cyclic gc -----------------------
class _Tracked:
    """Weakrefs to every non-parameter storage the engine saw: packed (each saved tensor),
    unpacked (what autograd got back) and allocated (reload buffers)."""

    def __init__(self, ctx, params):
        import weakref
        self.refs = []
        self.seen = 0
        self.params = {p.untyped_storage().data_ptr() for p in params}
        pack, unpack, backend = ctx._pack, ctx._unpack, ctx.backend
        empty_device = backend.empty_device

        def note(t):
            if isinstance(t, torch.Tensor) and type(t) is torch.Tensor \
                    and t.untyped_storage().data_ptr() not in self.params:
                self.refs.append(weakref.ref(t.untyped_storage()))
                self.seen += 1
            return t

        ctx._pack = lambda t: pack(note(t))          # read by __enter__ (instance attr)
        ctx._unpack = lambda p: note(unpack(p))
        backend.empty_device = lambda n, d: note(empty_device(n, d))

    def alive(self) -> int:
        self.refs = [r for r in self.refs if r() is not None]
        return len(self.refs)


def _engine_and_tensor_objects() -> int:
    """Live objects of the engine's classes, and tensors (other threads of the test
    process, e.g. a progress bar's monitor, may allocate anything else meanwhile)."""
    import gc
    count = 0
    for o in gc.get_objects():
        cls = type(o)
        module = cls.__dict__.get("__module__")     # a string for Python classes
        if issubclass(cls, torch.Tensor) or (isinstance(module, str)
                                             and module.startswith("moe_offload.offload")):
            count += 1
    return count


def _strided_layer(layer, h):       # a small strided view: travels as a contiguous copy
    return (h[:, ::2] @ layer.w1[::2]).relu() @ layer.w2


@pytest.mark.parametrize("case", ["plain", "retain_graph", "inline_reload", "strided",
                                  "composite", "opt_out", "no_grad_between"])
def test_steps_leave_nothing_alive_and_need_no_gc(case):
    """After each step's backward, no tensor the engine packed, reloaded or handed back is
    alive, the live engine objects and tensors are the same at every step end, and the
    cyclic gc finds nothing (with gc disabled during the steps: a record, ref, holder,
    Kept, layer or step kept only by a cycle would show up here; on CUDA it showed as
    memory that dropped at whichever step the gc happened to run)."""
    import gc
    from tests.offload._helpers import CompositeMatmul
    torch.manual_seed(0)
    layers = [Block() for _ in range(4)]
    kw = dict(EMU, num_layers=3, model_layers=4)
    if case == "inline_reload":
        kw["prefetch_layers"] = 0
    ctx, sync = get_cpu_offload_context(True, **kw)
    opt_out, _ = get_cpu_offload_context(False)
    tracked = _Tracked(ctx, [p for layer in layers for p in layer.parameters()])

    def call(layer, h):
        if case == "strided":
            return _strided_layer(layer, h)
        if case == "composite":
            return CompositeMatmul.apply(h, layer.w1, 10).relu() @ layer.w2
        if case == "opt_out" and layer is layers[1]:
            with opt_out:
                return layer(h)
        return layer(h)

    def step():
        x = torch.randn(16, 32, requires_grad=True)
        if case == "no_grad_between":
            with torch.no_grad():
                forward_stack(layers, x, ctx, sync)
        h = x
        for layer in layers:
            with ctx:
                h = call(layer, h)
            h = sync(h)
        loss = (h ** 2).sum()
        loss.backward(retain_graph=case == "retain_graph")
        if case == "retain_graph":
            loss.backward()
        for layer in layers:
            layer.zero_grad(set_to_none=True)

    step()                                     # warm-up: pool blocks, lazy torch state
    step()
    gc.collect()
    gc.disable()
    counts = []
    try:
        for _ in range(4):
            step()
            assert tracked.alive() == 0
            counts.append(_engine_and_tensor_objects())
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert tracked.seen > 0
    assert found == 0, f"cyclic garbage after the steps: {sorted(set(garbage))}"
    assert len(set(counts)) == 1, counts
    s = ctx.stats()
    assert s["offloaded_tensors"] > 0 and s["reloaded_tensors"] > 0
    assert ctx.pool.lent == 0


def test_parameter_flagged_subclass_is_kept_whole():
    """``nn.Parameter(subclass)`` returns the subclass flagged ``_is_param`` (FSDP2's
    DTensor parameters): the pack hook keeps it whole, never decomposes or moves it;
    plain parameters and their views too, while a plain activation moves."""
    from moe_offload.offload.record import Kept, SavedRef
    from tests.offload._helpers import split_scaled
    ctx, _ = get_cpu_offload_context(True, 1, 1, emulate=True, min_offload_bytes=0)
    p_sub = torch.nn.Parameter(split_scaled(torch.randn(8, 4), 3))
    assert type(p_sub) is not torch.nn.Parameter and p_sub._is_param
    w = torch.nn.Parameter(torch.randn(8, 4))
    with ctx:
        assert isinstance(ctx._pack(p_sub), Kept)
        assert isinstance(ctx._pack(w), Kept) and isinstance(ctx._pack(w.t()), Kept)
        assert isinstance(ctx._pack(torch.randn(8, 4) * 2), SavedRef)
    assert ctx.stats()["offloaded_tensors"] == 1
