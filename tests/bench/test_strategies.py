"""The one strategy registry: peers and ours installed on a workload, bitwise and removed."""
import pytest
import torch

from moe_offload.bench.strategies import (STRATEGIES, TIME_MARGIN, TIME_TOL, Context, sac_policy_ops,
                                          strategies_for, strategy_names, time_limit)
from moe_offload.bench.workloads import QWEN3_TINY, build_qwen3, model_workload

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_name(name):
    return next(s for s in STRATEGIES if s.name == name)


def test_one_registry_serves_every_workload():
    names = [s.name for s in STRATEGIES]
    assert len(names) == len(set(names))
    hf = [s.name for s in strategies_for("hf")]
    assert hf[:5] == ["none", "checkpoint", "sac", "save_on_cpu+ckpt", "hf_offload"]
    assert {"plan@half-sac", "plan@time", "plan@hf_offload", "experts:ours"} <= set(hf)
    stack = [s.name for s in strategies_for("stack", "fp8")]
    assert {"none", "save_on_cpu", "checkpoint", "offload_all", "fp8", "fp8+offload",
            "plan@half-none"} <= set(stack) and "<recipe>" not in " ".join(stack)
    assert "fp8" not in [s.name for s in strategies_for("stack")]      # no recipe: no recipe rows
    full = {s.name: s for s in strategies_for("full")}
    assert set(full) == {"none", "checkpoint", "hf_offload", "sac", "save_on_cpu+ckpt", "liger+ckpt",
                         "torchtune+ckpt", "ours"}
    assert full["liger+ckpt"].loss == "liger" and full["ours"].install is None
    for s in STRATEGIES:       # each says why it cannot run here, or nothing
        why = s.requires() if s.requires else None
        assert why is None or isinstance(why, str) and why
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        assert "liger_kernel" in full["liger+ckpt"].requires()
    valid = strategy_names("fp8")
    assert {"peer", "ours", "planned", "checkpoint", "fp8+offload"} <= set(valid)
    assert "fp8+offload" not in strategy_names(None)       # --recipe none: no recipe rows


def test_peers_are_bitwise_and_removed():
    model, ids = build_qwen3(QWEN3_TINY, 16, "cpu", torch.float32, 0, layers=2)
    params = list(model.parameters())

    def grads(step):
        for p in params:
            p.grad = None
        step().backward()
        return [p.grad.clone() for p in params]
    base = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    ref = grads(base)
    w = model_workload(model, model.model.layers, cuda=False)
    for name in ("checkpoint", "sac", "save_on_cpu+ckpt"):
        inst = _by_name(name).install(w, Context())
        try:
            got = grads(inst.wrap(base))
        finally:
            inst.remove()
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), name
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not getattr(model, "is_activation_checkpointing", False)
    assert not hasattr(model, "_require_grads_hook")          # HF's input-grad hook is gone too
    assert torch.ops.aten.mm.default in sac_policy_ops()


def test_hf_offload_peer_installs_and_is_removed():
    """HF's checkpointing with its offload switch: installed (the switch is consumed by
    transformers, not handed on to torch.utils.checkpoint) and removed without a trace."""
    import functools
    model, _ = build_qwen3(QWEN3_TINY, 16, "cpu", torch.float32, 0, layers=2)
    w = model_workload(model, model.model.layers, cuda=True)      # its switch, without a device
    inst = _by_name("hf_offload").install(w, Context())
    funcs = [getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()]
    funcs = [f for f in funcs if f is not None]
    assert funcs and getattr(model, "is_gradient_checkpointing", True)
    assert not any(isinstance(f, functools.partial) and "offload" in (f.keywords or {}) for f in funcs)
    inst.remove()
    assert not getattr(model, "is_gradient_checkpointing", False)
    assert not hasattr(model, "_require_grads_hook")


def test_plan_at_time_limit_is_against_none_not_our_no_plan_step():
    limit, why = time_limit(0.16465, 0.13866)        # the first H200 run's figures
    assert limit == pytest.approx(TIME_TOL * 0.16465 * (1 - TIME_MARGIN))
    assert limit > 0.16 and "none 164.65 ms" in why
    limit, why = time_limit(None, 0.13866)           # no none row: our own no-plan step
    assert limit == pytest.approx(TIME_TOL * 0.13866 * (1 - TIME_MARGIN)) and "no plan" in why


def test_hf_offload_without_the_switch_is_a_skipped_row(monkeypatch):
    """transformers 5.17 has no checkpointing offload switch: ``offload=True`` in the
    checkpointing kwargs reaches torch.utils.checkpoint.  The row says so and is skipped
    (not an error row), and nothing stays installed."""
    from moe_offload.bench.strategies import Skip
    model, _ = build_qwen3(QWEN3_TINY, 16, "cpu", torch.float32, 0, layers=2)

    def enable_5_17(activation_checkpointing_kwargs=None):     # no offload argument
        import functools
        from torch.utils.checkpoint import checkpoint
        for layer in model.model.layers:
            layer._gradient_checkpointing_func = functools.partial(checkpoint, **activation_checkpointing_kwargs)
            layer.gradient_checkpointing = True
    monkeypatch.setattr(model, "activation_checkpointing_enable", enable_5_17)
    monkeypatch.setattr(model, "gradient_checkpointing_enable",
                        lambda gradient_checkpointing_kwargs=None: enable_5_17(gradient_checkpointing_kwargs))
    undone = []
    monkeypatch.setattr(model, "activation_checkpointing_disable", lambda: undone.append(True))
    monkeypatch.setattr(model, "gradient_checkpointing_disable", lambda: undone.append(True))
    with pytest.raises(Skip, match="no checkpointing offload switch"):
        _by_name("hf_offload").install(model_workload(model, model.model.layers, cuda=True), Context())
    assert undone == [True]


def test_budgets_below_the_least_peak(monkeypatch):
    """A budget below the least peak any plan reaches runs that least peak and says so; a
    half budget whose full budget is below it too would run the very same plan: skipped."""
    from moe_offload.bench.config import BenchConfig
    from moe_offload.bench.strategies import Skip
    from moe_offload.bench.workloads import stack_workloads
    cfg = BenchConfig(tokens=64, hidden=32, ffn=32, experts=2, layers=2, dtype="fp32", device="cpu",
                      recipe="none", stack="fused", iters=1, warmup=0, progress=False)
    w = stack_workloads(cfg, (1e9, 1e9))["fused"]
    ctx = Context(peak_of={"checkpoint": 1})
    inst = _by_name("plan@checkpoint").install(w, ctx)
    try:
        assert inst.fields["requested_budget_bytes"] == 1 and inst.plan.predicted_peak_bytes > 1
        assert "below the least peak any plan reaches" in inst.fields["note"]
    finally:
        inst.remove()
    with pytest.raises(Skip, match="same plan as plan@checkpoint"):
        _by_name("plan@half-checkpoint").install(w, ctx)


def test_a_failing_experts_switch_leaves_plans_on_hf_experts(monkeypatch):
    import moe_offload.integrations.transformers as integration
    model, _ = build_qwen3(QWEN3_TINY, 16, "cpu", torch.float32, 0, layers=2)

    def broken(m):
        raise AttributeError("an older transformers")
    monkeypatch.setattr(integration, "use_moe_offload_experts", broken)
    w = model_workload(model, model.model.layers, cuda=False)
    assert w.use_our_experts() is False and w.state == ""
    assert "AttributeError: an older transformers" in w.experts_error


def test_torchtune_gets_a_new_context_per_wrapped_step(monkeypatch):
    """The full-depth run wraps once per length; a context whose step ran out of memory keeps
    its tracker, so each wrap builds its own."""
    import sys
    import types
    made = []

    class FakeOffload:
        def __init__(self):
            made.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    training = types.ModuleType("torchtune.training")
    training.OffloadActivations = FakeOffload
    monkeypatch.setitem(sys.modules, "torchtune", types.ModuleType("torchtune"))
    monkeypatch.setitem(sys.modules, "torchtune.training", training)
    model, ids = build_qwen3(QWEN3_TINY, 16, "cpu", torch.float32, 0, layers=2)
    inst = _by_name("torchtune").install(model_workload(model, model.model.layers, cuda=False), Context())
    try:
        step = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
        a, b = inst.wrap(step), inst.wrap(step)
        a()
        a()
        b()
        assert len(made) == 2
    finally:
        inst.remove()
