"""Measurement helpers, the planner, and the bitwise flag of a whole run."""
from typing import Callable

import pytest
import torch

from moe_offload.bench import run as bench_run
from moe_offload.bench.config import BenchConfig
from moe_offload.bench.measure import (MemoryMeasurementError, grads_bitwise_equal, grads_of,
                                       loss_with_grad, measure_memory, time_steps)
from moe_offload.bench.models import make_split_sizes
from moe_offload.bench.strategies import Installed, Strategy, strategies_for
from moe_offload.bench.workloads import stack_workloads


def test_grads_bitwise_equal_detects_one_ulp():
    a = [torch.randn(4, 3), None, torch.randn(5)]
    b = [t.clone() if t is not None else None for t in a]
    assert grads_bitwise_equal(a, b)
    b[2][3] = torch.nextafter(b[2][3], torch.tensor(float("inf")))
    assert not grads_bitwise_equal(a, b)
    assert not grads_bitwise_equal([a[0], torch.zeros(1)], [a[0], None])
    assert not grads_bitwise_equal(a[:1], a)
    assert not grads_bitwise_equal([a[0]], [a[0].double()])


def test_grads_of_copies():
    x = torch.randn(3, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3))
    (x * w).sum().backward()
    got = grads_of([x, w])
    x.grad.add_(1)
    assert not torch.equal(got[0], x.grad) and torch.equal(got[1], w.grad)


def test_loss_with_grad_is_backward_with_dy():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(4, 4))
    dy = torch.randn(8, 4)
    torch.tanh(x @ w).backward(dy)
    ref = grads_of([x, w])
    x.grad = w.grad = None
    loss = loss_with_grad(torch.tanh(x @ w), dy)
    assert loss.shape == () and loss.requires_grad
    loss.backward()
    assert grads_bitwise_equal(grads_of([x, w]), ref)
    x.grad = w.grad = None
    loss_with_grad(torch.tanh(x @ w), dy * 2).backward()       # the seed really is dy
    assert not grads_bitwise_equal(grads_of([x, w]), ref)


def test_time_and_memory_on_cpu():
    x = torch.randn(64, 64, requires_grad=True)
    fwd = lambda: torch.tanh(x @ x)  # noqa: E731
    t = time_steps(fwd, lambda y: y.sum().backward(), 3, cuda=False)
    assert t.step_s > 0 and len(t.all_step_s) == 3
    m = measure_memory(fwd, lambda y: y.sum().backward(), cuda=False)
    assert m.act_bytes >= 64 * 64 * 4  # at least the saved tanh output
    assert m.peak_bytes >= m.act_bytes


def test_cpu_profiler_prints_nothing(capfd):
    """The CPU memory figures come from torch's profiler, whose back end (Kineto) writes
    ``USDT:... profiler_start`` / ``profiler_stop`` lines to stderr from C++; none may
    reach the screen, and the figures stay."""
    from moe_offload.bench.measure import trace_memory
    import sys
    x = torch.randn(64, 64, requires_grad=True)
    fwd = lambda: torch.tanh(x @ x)  # noqa: E731

    def bwd(y):
        print("from the step", file=sys.stderr, flush=True)   # the step's own output stays
        y.sum().backward()
    m = measure_memory(fwd, bwd, cuda=False)
    t = trace_memory([], fwd, bwd, cuda=False)
    out, err = capfd.readouterr()
    assert "USDT" not in out and "USDT" not in err and "profiler_st" not in out + err
    assert err.count("from the step") == 2
    assert m.act_bytes >= 64 * 64 * 4 and max(t["bytes"]) >= 64 * 64 * 4


def test_split_sizes():
    s = make_split_sizes(10, 4, "uniform", 0, torch.device("cpu"))
    assert s.tolist() == [3, 3, 2, 2]
    r = make_split_sizes(100, 4, "random", 0, torch.device("cpu"))
    assert int(r.sum()) == 100 and r.dtype == torch.int64
    with pytest.raises(ValueError):
        make_split_sizes(10, 4, "zipf", 0, torch.device("cpu"))


def _hooked(hook_of) -> Callable:
    """A strategy's ``install`` that registers ``hook_of(workload) -> handles`` (removed after)."""
    def install(w, ctx):
        handles = hook_of(w)
        return Installed(remove=lambda: [h.remove() for h in handles])
    return install


def _row_strategy(name, install):
    return Strategy(name, "offload", "ours", "", install, kinds=("stack",))


# Scales the last layer's output by (1 + 2**-20): every gradient changes in its last bits.
_PERTURBED = _row_strategy("perturbed", _hooked(lambda w: [w.layers[-1].register_forward_hook(
    lambda m, i, o: o * (1 + 2 ** -20))]))
# An honest no-op transport: copies the input first (grads must stay bitwise).
_COPYING = _row_strategy("copying", _hooked(lambda w: [w.layers[0].register_forward_pre_hook(
    lambda m, i: (i[0].clone(),))]))


def _with_rows(monkeypatch, *extra):
    base = [s for s in strategies_for("stack") if s.name == "none"]
    monkeypatch.setattr(bench_run, "strategies_for", lambda kind, recipe=None: base + list(extra))


def _tiny(**kw):
    return BenchConfig(**{**dict(tokens=64, hidden=32, ffn=32, experts=2, layers=2, dtype="fp32",
                                 device="cpu", recipe="none", stack="fused", iters=1, warmup=0,
                                 progress=False), **kw})


def test_run_bitwise_flag(monkeypatch):
    _with_rows(monkeypatch, _PERTURBED, _COPYING)
    rows = {r["strategy"]: r for r in bench_run.run_bench(_tiny())["rows"]}
    # none is checked against a second check step of itself (determinism of the kernels)
    assert rows["none"]["status"] == "ok" and rows["none"]["bitwise_equal"] is True
    assert rows["perturbed"]["status"] == "ok" and rows["perturbed"]["bitwise_equal"] is False
    assert rows["perturbed"]["grad_max_rel_error"] > 0
    assert rows["copying"]["status"] == "ok" and rows["copying"]["bitwise_equal"] is True


def test_failing_strategy_is_a_row(monkeypatch):
    def boom(w, ctx):
        raise RuntimeError("kaboom")
    _with_rows(monkeypatch, _row_strategy("boom", boom))
    rows = {r["strategy"]: r for r in bench_run.run_bench(_tiny(tokens=32, hidden=16, ffn=16))["rows"]}
    assert rows["boom"]["status"] == "error" and "kaboom" in rows["boom"]["note"]


def _fake_device_allocator(monkeypatch):
    """Run ``measure_memory``'s CUDA branch on the CPU: ``memory_allocated`` counts the
    bytes of every tensor object the interpreter still tracks -- like a device allocator,
    it sees cyclic garbage until the collector frees it, and memory a forward frees."""
    import gc

    def allocated():
        seen, n = set(), 0
        for o in gc.get_objects():
            if type(o) in (torch.Tensor, torch.nn.Parameter) and o.untyped_storage().data_ptr() not in seen:
                seen.add(o.untyped_storage().data_ptr())
                n += o.untyped_storage().nbytes()
        return n
    for name, fn in (("synchronize", lambda: None), ("reset_peak_memory_stats", lambda: None),
                     ("memory_allocated", allocated), ("max_memory_allocated", allocated)):
        monkeypatch.setattr(torch.cuda, name, fn)


def test_memory_starts_after_the_previous_step_is_collected(monkeypatch):
    """Cyclic garbage left by an earlier step is collected before the step starts, so a
    collection during the forward cannot make its activation figure look smaller."""
    import gc
    _fake_device_allocator(monkeypatch)
    x = torch.randn(64, 64, requires_grad=True)

    def fwd():
        gc.collect()                    # what an automatic collection may do mid-forward
        return torch.tanh(x @ x)
    gc.disable()
    try:
        cycle = [torch.ones(1 << 20)]
        cycle.append(cycle)             # 4 MiB, freed only by the collector
        del cycle
        m = measure_memory(fwd, lambda y: y.sum().backward(), cuda=True)
    finally:
        gc.enable()
    assert m.act_bytes >= 64 * 64 * 4


def _retains_across_steps(w) -> list:
    """Keeps 4 MiB from each backward until the next forward (as a graph stored on a
    module did): the next forward frees it and its activation figure would look small."""
    kept = {}

    def post(m, i, y):
        y.register_hook(lambda g: kept.__setitem__("t", torch.ones(1 << 20)))
    return [w.layers[0].register_forward_pre_hook(lambda m, i: kept.clear()),
            w.layers[-1].register_forward_hook(post)]


def test_memory_retained_from_the_previous_step_is_an_error_row(monkeypatch):
    _fake_device_allocator(monkeypatch)
    x = torch.randn(64, 64, requires_grad=True)
    state = {}

    def fwd():
        state.clear()
        return torch.tanh(x @ x)

    def bwd(y):
        y.sum().backward()
        state["kept"] = torch.ones(1 << 20)

    bwd(fwd())
    with pytest.raises(MemoryMeasurementError, match="below the forward output"):
        measure_memory(fwd, bwd, cuda=True, min_act_bytes=64 * 64 * 4)

    # In the bench: the row becomes an error row (the fake allocator on the CPU run).
    real = bench_run.measure_memory
    monkeypatch.setattr(bench_run, "measure_memory",
                        lambda f, b, cuda, min_act_bytes=0: real(f, b, True, min_act_bytes))
    _with_rows(monkeypatch, _row_strategy("retains", _hooked(_retains_across_steps)))
    rows = {r["strategy"]: r for r in bench_run.run_bench(_tiny())["rows"]}
    assert rows["none"]["status"] == "ok" and rows["none"]["act_bytes"] >= rows["none"]["output_bytes"]
    assert rows["retains"]["status"] == "error"
    assert "MemoryMeasurementError" in rows["retains"]["note"]


def test_plans_restore_the_stack_and_keep_grads_bitwise():
    """Rows of ours are plans of the general planner applied to the stack: mixed fc1
    recompute, offload levels and checkpointed layers keep every gradient bitwise, move
    bytes exactly when a layer offloads, and leave the stack as it was."""
    from moe_offload.plan import Choice, make_plan
    w = stack_workloads(_tiny(layers=4), (1e9, 1e9))["fused"]
    figs = w.figures()
    assert all(p.grad is None for p in w.params)
    assert figs[1].layers[0].options == ["none", "norms+fc1", "layer"]

    def grads():
        w.clear_grads()
        w.step().backward()
        return grads_of(w.params)

    ref = grads()
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, i: seen.append(m.mlp.recompute))
             for layer in w.layers]
    fc1, keep = Choice("norms+fc1", 3), Choice("none", 0)
    for choices in ([fc1, fc1, keep, Choice("norms+fc1", 0)], [keep, Choice("norms+fc1", 0), keep, keep],
                    [Choice("layer", 3)] * 4):
        seen.clear()
        plan = make_plan(w.model, figs, choices, min_offload_bytes=1024)
        handle = plan.apply()
        try:
            handle.reset_stats()
            assert grads_bitwise_equal(grads(), ref), choices
            if choices[0].recompute != "layer":
                assert seen == ["fc1" if c.recompute == "norms+fc1" else "activation" for c in choices]
            s = handle.stats()
            d2h, h2d = s.get("offloaded_bytes", 0), s.get("reloaded_bytes", 0)
            assert (d2h > 0) == (plan.prediction.engine_layers > 0) and d2h == h2d
        finally:
            handle.remove()
        assert all(layer.mlp.recompute == "activation" for layer in w.layers)
        assert all("forward" not in layer.__dict__ for layer in w.layers)
    for h in hooks:
        h.remove()


def test_the_general_planner_plans_a_synthetic_stack_within_its_peak_budget():
    """The stacks' rows are planned by ``plan_memory`` on the stack's measured figures:
    every budget between no plan's peak and the least any plan reaches gets a plan predicted
    within it, smaller budgets never get a faster plan than the least-peak one allows, and
    a budget below that least peak is refused with the minimum in the message."""
    from moe_offload.plan import plan_memory
    from moe_offload.plan.memory_plan import candidates
    stack = stack_workloads(_tiny(layers=4), (1e9, 1e9))["fused"]
    figs = stack.figures()
    peaks = sorted({c.peak_bytes for c in candidates(figs[1], 0)})    # each at its least-peak prefetch
    low, high = peaks[0], peaks[-1]
    assert low < high
    for budget in peaks:
        plan = plan_memory(stack.layers, None, budget, figures=figs, min_offload_bytes=1024)
        assert plan.predicted_peak_bytes <= budget and plan.budget_bytes == budget
    tight = plan_memory(stack.layers, None, low, figures=figs, min_offload_bytes=1024)
    loose = plan_memory(stack.layers, None, high, figures=figs, min_offload_bytes=1024)
    assert loose.predicted_step_s <= tight.predicted_step_s
    with pytest.raises(ValueError, match=f"smallest step peak any plan reaches: {low} bytes"):
        plan_memory(stack.layers, None, low - 1, figures=figs, min_offload_bytes=1024)


def test_planned_rows_run_after_every_peer():
    cfg = BenchConfig(tokens=64, hidden=32, ffn=32, experts=2, layers=2, dtype="fp32", device="cpu",
                      stack="both", recipe="none", strategies=["plan@half-checkpoint"])
    plan = [(stack, s.name) for stack, s in bench_run.plan_runs(cfg)]
    assert plan[-1] == ("fused", "plan@half-checkpoint")
    # needs: none and the peer itself run too, on both stacks for the peer.
    assert {("fused", "none"), ("fused", "checkpoint"), ("unfused", "checkpoint"),
            ("unfused", "none")} <= set(plan)
    assert ("fused", "offload_but_last") not in plan


def test_check_step_is_strictly_deterministic(monkeypatch):
    from torch.nn.attention import SDPBackend
    from moe_offload.bench.measure import check_attention_backends, deterministic_check
    assert check_attention_backends(True) == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    with deterministic_check(False):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()   # strict, not warn
        counts = torch.histc(torch.tensor([0.0, 1.0, 1.0]), bins=2, min=0, max=1)
        assert counts.tolist() == [1.0, 2.0]
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled()) == before
    with deterministic_check(False, "math"):         # the fallback: math SDPA, warn only
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.raises(ValueError, match="mode"):
        with deterministic_check(False, "loose"):
            pass
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG"):
        with deterministic_check(True):
            pass


def test_a_check_step_that_raises_in_strict_mode_falls_back_to_math():
    from moe_offload.bench.measure import first_check_step
    w = torch.nn.Parameter(torch.ones(3))

    def step():
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError("some_op does not have a deterministic implementation")
        return (w * 2).sum()
    grads, mode, errors = first_check_step(step, [w], cuda=False)
    assert mode == "math" and torch.equal(grads[0], torch.full((3,), 2.0))
    assert "strict" in errors[0] and "some_op" in errors[0]
