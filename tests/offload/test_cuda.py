"""CUDA tests of the offload engine: memory, bitwise grads, stream races, soak.

Every piece of logic here also has an ``emulate=True`` CPU test; these check the real
streams, events, pinned pool and caching-allocator interplay.
"""
import gc
import random

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_offload.offload import get_cpu_offload_context, offloaded_checkpoint
from moe_offload.offload.backend import add_copy_delays
from tests.offload._helpers import Block, CompositeMatmul, assert_bitwise, run_stack

pytestmark = pytest.mark.cuda
DEV = "cuda"


def _grads_twice_equal(layers, x, **kw):
    """Reference run twice (determinism check), then the offloaded run."""
    _, ref1, _ = run_stack(layers, x, **kw)
    _, ref2, _ = run_stack(layers, x, **kw)
    assert_bitwise(ref1, ref2)
    return ref1


def test_memory_seven_of_eight_offloaded():
    T, H, F, L = 2048, 1024, 4096, 8
    layers = [Block(H, F, device=DEV) for _ in range(L)]
    x = torch.randn(T, H, device=DEV, requires_grad=True)
    layer_saved = T * H * 4 + T * F * 4            # x and a (fp32)
    out_bytes = T * H * 4

    with torch.no_grad():          # warm up: cuBLAS workspace is allocated once
        layers[0](x)

    def forward(ctx=None, sync=None):
        torch.cuda.synchronize()
        gc.collect()
        start = torch.cuda.memory_allocated()
        h = x
        for layer in layers:
            if ctx is None:
                h = layer(h)
            else:
                with ctx:
                    h = layer(h)
                h = sync(h)
        torch.cuda.synchronize()
        return h, torch.cuda.memory_allocated() - start

    h, base = forward()
    del h
    ctx, sync = get_cpu_offload_context(True, 7, 8)
    h, used = forward(ctx, sync)
    pinned = ctx.stats()["pinned_pool_bytes"]
    print(f"\nmemory: no-offload {base / 2**20:.1f} MiB, offload gpu {used / 2**20:.1f} MiB "
          f"+ pinned {pinned / 2**20:.1f} MiB; stats {ctx.stats()}")
    assert used <= 1.1 * layer_saved + out_bytes
    # Layer 0's input is the user's tensor: its pinned copy has no device counterpart.
    assert abs((used + pinned - T * H * 4) - base) <= 0.1 * base
    assert used + pinned - T * H * 4 == base       # exact here: fp32 sizes are classes
    h.sum().backward()
    torch.cuda.synchronize()
    s = ctx.stats()
    assert s["inline_reloads"] == 0 and s["d2h_copy_seconds"] > 0 and s["h2d_copy_seconds"] > 0
    print(f"copy bandwidth: D2H {s['offloaded_bytes'] / s['d2h_copy_seconds'] / 1e9:.1f} GB/s, "
          f"H2D {s['reloaded_bytes'] / s['h2d_copy_seconds'] / 1e9:.1f} GB/s")


def _splits(T, G, gen):
    cuts = sorted(random.Random(gen).sample(range(1, T), G - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [T])]


@pytest.mark.parametrize("kind", ["linear_gelu", "grouped_linear", "grouped_mlp",
                                  "grouped_mlp_fc1", "moe", "composite"])
def test_bitwise_grads_every_layer_type(kind):
    T, H, F, G = 512, 256, 512, 4
    call, loss = None, None
    dt = torch.bfloat16
    if kind == "linear_gelu":
        layers = [nn.Sequential(nn.Linear(H, F), nn.GELU(), nn.Linear(F, H)).to(DEV, dt)
                  for _ in range(4)]
    elif kind == "grouped_linear":
        from moe_offload.ops.grouped_linear import GroupedLinear
        layers = [GroupedLinear(G, H, H, device=DEV, dtype=dt) for _ in range(4)]
        splits = torch.tensor(_splits(T, G, 1), device=DEV)
        call = lambda layer, h: layer(h, splits)
    elif kind.startswith("grouped_mlp"):
        from moe_offload.ops.grouped_mlp import GroupedMLP
        rc = "fc1" if kind.endswith("fc1") else "activation"
        layers = [GroupedMLP(G, H, F, recompute=rc, device=DEV, dtype=dt) for _ in range(4)]
        splits = _splits(T, G, 2)
        call = lambda layer, h: layer(h, splits)
    elif kind == "moe":
        from moe_offload.ops.moe import MoE
        layers = [MoE(H, F, num_experts=G, top_k=2, device=DEV, dtype=dt) for _ in range(4)]
        loss = lambda h: (h.float() ** 2).sum() + sum(l.aux_loss for l in layers)
    else:
        ws = [nn.Linear(H, H, bias=False).to(DEV, dt) for _ in range(4)]
        layers = ws
        call = lambda layer, h: CompositeMatmul.apply(h, layer.weight.t(), 100)
    x = torch.randn(T, H, device=DEV, dtype=dt)
    kw = dict(call=call, loss=loss)
    ref = _grads_twice_equal(layers, x, **kw)
    _, got, ctx = run_stack(layers, x, dict(num_layers=3, model_layers=4,
                                            min_offload_bytes=1024), **kw)
    assert_bitwise(ref, got)
    s = ctx.stats()
    assert s["offloaded_tensors"] > 0 and s["reloaded_bytes"] >= s["offloaded_bytes"]


def test_race_random_stream_delays():
    """60 random schedules (delays on D2H/H2D/compute, prefetch depth, layers offloaded)
    over plain layers, offloaded_checkpoint and torch checkpoint: 0 mismatches."""
    T, H, F, L = 256, 256, 512, 4
    layers = [Block(H, F, device=DEV) for _ in range(L)]
    x = torch.randn(T, H, device=DEV)
    calls = {
        "plain": None,
        "offloaded_checkpoint": lambda l, h: offloaded_checkpoint(l, h),
        # torchtune's recommended combination (it gave wrong grads under streams):
        "torch_checkpoint": lambda l, h: checkpoint(l, h, use_reentrant=False),
    }
    refs = {name: _grads_twice_equal(layers, x, call=call) for name, call in calls.items()}
    rng = random.Random(0)
    mismatches = 0
    for trial in range(60):
        mode = list(calls)[trial % 3]
        call = calls[mode] or (lambda l, h: l(h))
        ctx, sync = get_cpu_offload_context(True, rng.choice([2, 3, 4]), L,
                                            prefetch_layers=rng.choice([0, 1, 2]),
                                            min_offload_bytes=1024)
        add_copy_delays(ctx, d2h_cycles=rng.choice([0, 20_000, 200_000, 1_000_000]),
                        h2d_cycles=rng.choice([0, 20_000, 200_000, 1_000_000]))
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        h = xi
        for layer in layers:
            with ctx:
                h = call(layer, h)
            h = sync(h)
            if rng.random() < 0.3:                 # perturb compute too
                torch.cuda._sleep(rng.choice([10_000, 100_000]))
        (h.float() ** 2).sum().backward()
        got = [xi.grad] + [p.grad for layer in layers for p in layer.parameters()]
        expected = refs[mode]
        if not all(torch.equal(a, b) for a, b in zip(expected, got)):
            mismatches += 1
    assert mismatches == 0


def test_soak_flat_memory_and_pool():
    """200 steps: device memory, pool bytes and host allocations identical at every step
    end, with the cyclic gc off during the loop (an engine object kept only by a cycle
    would make memory grow), and a final gc.collect() frees no device memory.

    The gc.collect() before the loop matters: a failed earlier test leaves its frames
    (and the device tensors in them) as cyclic garbage that pytest releases only when the
    next test starts; a gc pass inside the loop then freed 4 MiB of that test's parameters
    plus three activations mid-soak, which read as the engine's memory dropping."""
    T, H, F, L = 256, 256, 512, 4
    layers = [Block(H, F, device=DEV) for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 3, L, min_offload_bytes=1024)
    mem, pool, allocs = [], [], []
    gc.collect()
    gc.disable()
    try:
        for step in range(200):
            x = torch.randn(T, H, device=DEV, requires_grad=True)
            h = x
            for layer in layers:
                with ctx:
                    h = layer(h)
                h = sync(h)
            (h ** 2).sum().backward()
            for layer in layers:
                layer.zero_grad(set_to_none=True)
            del x, h
            torch.cuda.synchronize()
            s = ctx.stats()
            mem.append(torch.cuda.memory_allocated())
            pool.append(s["pinned_pool_bytes"])
            allocs.append(s["pinned_allocs"])
        before_gc = torch.cuda.memory_allocated()
        found = gc.collect()
        torch.cuda.synchronize()
        after_gc = torch.cuda.memory_allocated()
    finally:
        gc.enable()
    odd = [(i, m) for i, m in enumerate(mem) if i >= 2 and m != mem[2]]
    print(f"\nsoak: mem {mem[2]}..{max(mem[2:])}, steps off {odd[:5]}, pool {pool[2]}.."
          f"{max(pool[2:])}, allocs {allocs[2]}..{allocs[-1]}, gc found {found} and freed "
          f"{before_gc - after_gc} B, stats {ctx.stats()}")
    assert max(mem[2:]) == min(mem[2:])
    assert after_gc == before_gc
    assert max(pool[2:]) == min(pool[2:]) and allocs[-1] == allocs[2]
    assert ctx.pool.lent == 0


@pytest.mark.parametrize("delay", [0, 1_000_000])
def test_inplace_after_save_raises_on_cuda(delay):
    """Autograd's in-place error on the real streams (offloaded and resident), also
    when the D2H copy is still in flight at the write."""
    from tests.offload.test_record import PREFIX
    for num_layers in (1, 0):
        ctx, _ = get_cpu_offload_context(True, num_layers, 1, min_offload_bytes=1024)
        add_copy_delays(ctx, d2h_cycles=delay, h2d_cycles=delay)
        x = torch.randn(256, 256, device=DEV, requires_grad=True)
        a = x * 2.0
        with ctx:
            y = a.sin()
        with torch.no_grad():
            a.add_(1)
        with pytest.raises(RuntimeError, match="^" + PREFIX[:40]):
            y.sum().backward()


@pytest.mark.parametrize("delay", [0, 1_000_000])
def test_dedup_keyed_on_version_cuda(delay):
    """Saved, written in place, saved again (the first copy may still be in flight):
    the second save gets its own copy; exact gradient."""
    def program(ctx=None):
        x = torch.randn(512, 512, device=DEV, dtype=torch.float64, requires_grad=True)
        with ctx if ctx is not None else torch.enable_grad():
            a = x * 1.0
            y1 = a.sin()
            with torch.no_grad():
                a.add_(1024.0)
            y2 = a.cos()
        y2.sum().backward()
        del y1
        return x.grad

    torch.manual_seed(0)
    ref = program()
    ctx, _ = get_cpu_offload_context(True, 1, 1, min_offload_bytes=1024)
    add_copy_delays(ctx, d2h_cycles=delay, h2d_cycles=delay)
    torch.manual_seed(0)
    assert torch.equal(ref, program(ctx))
    assert ctx.stats()["offloaded_tensors"] == 2


def test_param_detach_stays_on_cuda():
    from tests.offload.test_params import SaveDetachedLinear
    torch.manual_seed(0)
    layers = [SaveDetachedLinear(256, device=DEV) for _ in range(2)]
    x = torch.randn(256, 256, device=DEV)
    ref = run_stack(layers, x, None)[1]
    _, got, ctx = run_stack(layers, x, dict(num_layers=1, model_layers=2,
                                            min_offload_bytes=1024))
    assert_bitwise(ref, got)
    assert ctx.stats()["offloaded_tensors"] == 1


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("hooks_inside", [True, False])
def test_checkpointed_layers_cuda(hooks_inside, reentrant):
    """A layer's own checkpointing re-entering the context in backward: passive."""
    from moe_offload.offload import offload_module_list
    from tests.offload.test_layer_calls import CheckpointedLayer, _train
    torch.manual_seed(0)
    layers = nn.ModuleList(CheckpointedLayer(hooks_inside, reentrant) for _ in range(3)).to(DEV)
    x0 = torch.randn(512, 32, device=DEV)
    ref, _ = _train(layers, x0)
    handle = offload_module_list(layers, num_layers=2, min_offload_bytes=1024)
    try:
        got, fwd = _train(layers, x0, handle)
        assert_bitwise(ref, got)
        assert handle.stats()["offloaded_tensors"] == fwd["offloaded_tensors"]
    finally:
        handle.remove()


def test_inner_autograd_grad_on_device_thread_does_not_end_the_step():
    """An inner torch.autograd.grad inside a layer: on CUDA its hooks run on autograd's
    device thread; the step must go on (model_layers learned right, no early release)."""
    L = 3
    layers = [Block(256, 512, device=DEV) for _ in range(L)]
    ctx, sync = get_cpu_offload_context(True, 2, min_offload_bytes=1024)
    x = torch.randn(256, 256, device=DEV, requires_grad=True)
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
