"""fit and step_budget on CPU (emulate): the whole-step arithmetic, the plan it applies,
its error when nothing fits; and every measurement leaving the model as it found it."""
import pytest
import torch
from torch import nn

import moe_offload
from moe_offload import fit, plan_memory, step_budget
from moe_offload.plan import Choice, measure_model
from moe_offload.plan.measure import count_saved, counted_memory
from moe_offload.plan.modules import Wrappers, install_recompute

from ._models import bitwise, grads, tiny_qwen3

pytest.importorskip("transformers")
THRESHOLD = 1024


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def measured():
    model, step = tiny_qwen3()
    ref = grads(model, step)
    figs = measure_model(model, step, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    return model, step, ref, figs


# --- measuring leaves the model as it found it ---------------------------------------------

def _snapshot(model):
    return ([None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
            [b.clone() for b in model.buffers()], [m.training for m in model.modules()],
            torch.get_rng_state())


def test_planning_restores_grads_rng_buffers_and_modes():
    model, step = tiny_qwen3()
    model.config.attention_dropout = 0.1                 # the step draws random numbers
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    params = list(model.parameters())
    for i, p in enumerate(params):                       # a half-done accumulation
        p.grad = torch.full_like(p, 0.5) if i % 2 else None
    model.model.layers[1].eval()                         # a mixed training mode
    buf = next(model.buffers())
    before = _snapshot(model)
    plan_memory(model, step, 10 ** 9, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    after = _snapshot(model)
    for b, a in zip(before[0], after[0]):
        assert (b is None) == (a is None)
        if b is not None:
            assert a[0] is b[0] and torch.equal(a[0], b[1])   # same tensor, same values
    assert all(torch.equal(x, y) for x, y in zip(before[1], after[1]))
    assert before[2] == after[2] and torch.equal(before[3], after[3])
    assert buf is next(model.buffers())


def test_first_step_after_planning_equals_the_step_without_planning():
    """The silent wrong update: a plan followed by ``backward`` must give the gradient of
    one step, not the planner's plus the user's."""
    model, step = tiny_qwen3()
    model.zero_grad(set_to_none=True)
    ref = [g for g in grads(model, step)]
    model.zero_grad(set_to_none=True)
    plan_memory(model, step, 10 ** 9, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    assert all(p.grad is None for p in model.parameters())
    loss = step()
    loss.backward()
    assert bitwise([loss.detach()] + [p.grad for p in model.parameters()], ref)


# --- the peak model against counted bytes ---------------------------------------------------

@pytest.mark.parametrize("option", ["none", "norms", "norms+experts", "layer"])
def test_predicted_peak_of_a_uniform_option_is_the_counted_peak(measured, option):
    """On the CPU the figures come from counted bytes: a plan putting ``option`` on every
    layer must predict the peak that counting the step with that option gives directly."""
    model, step, _, (layers, f) = measured
    plan = moe_offload.plan.make_plan(model, (layers, f), [Choice(option, 0)] * len(layers),
                                      min_offload_bytes=THRESHOLD)
    wr = Wrappers()
    try:
        for layer in layers:
            install_recompute(layer, option, wr)
        saved = count_saved(model, layers, step, THRESHOLD)
    finally:
        wr.remove()
    none = count_saved(model, layers, step, THRESHOLD)
    # the one documented approximation: storages several layers save (rotary cos/sin) count
    # as fixed, also when an option (the whole-layer checkpoint) stops saving them
    fixed = none.shared_bytes - saved.shared_bytes
    assert plan.predicted_activation_bytes == saved.total + fixed
    assert plan.predicted_peak_bytes == max(counted_memory(saved, none).peak + fixed,
                                            plan.predicted_activation_bytes)


def test_budget_is_the_peak(measured):
    model, step, _, figs = measured
    f = figs[1]
    none = moe_offload.plan.make_plan(model, figs, [Choice()] * 3, min_offload_bytes=THRESHOLD)
    least = min(c.peak_bytes for c in moe_offload.plan.memory_plan.candidates(f))
    assert least < none.predicted_peak_bytes
    budget = (least + none.predicted_peak_bytes) // 2
    tight = plan_memory(model, step, budget, figures=figs, min_offload_bytes=THRESHOLD)
    assert tight.predicted_peak_bytes <= budget
    with pytest.raises(ValueError, match="smallest step peak"):
        plan_memory(model, step, least - 1, figures=figs, min_offload_bytes=THRESHOLD)
    assert "predicted peak" in tight.describe() and tight.peak_moment in tight.describe()
    assert f.tokens == 32


# --- step_budget ----------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_step_budget_counts_weights_grads_and_optimizer_state_before_and_after_a_step():
    model = _mlp()
    n = sum(p.numel() * 4 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = step_budget(model, opt, device_memory_bytes=10 ** 6, reserve_bytes=1000)
    assert (before.param_bytes, before.grad_bytes, before.optimizer_bytes) == (n, n, 2 * n)
    assert not before.optimizer_guessed and before.optimizer_step_bytes == n
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    after = step_budget(model, opt, device_memory_bytes=10 ** 6, reserve_bytes=1000)
    assert after.optimizer_bytes == 2 * n                 # counted from the state now
    assert after.activation_budget_bytes == 10 ** 6 - 4 * n - 1000
    fused = step_budget(model, torch.optim.AdamW(model.parameters(), fused=True),
                        device_memory_bytes=10 ** 6)
    single = step_budget(model, torch.optim.AdamW(model.parameters(), foreach=False),
                         device_memory_bytes=10 ** 6)
    assert fused.optimizer_step_bytes == 0
    assert single.optimizer_step_bytes == max(p.numel() * 4 for p in model.parameters())
    model[0].weight.requires_grad_(False)                 # a frozen base
    frozen = step_budget(model, torch.optim.SGD(model.parameters(), lr=1, momentum=0.9),
                         device_memory_bytes=10 ** 6)
    trainable = n - model[0].weight.numel() * 4
    assert frozen.grad_bytes == trainable and frozen.optimizer_bytes == trainable
    from moe_offload.plan.fit import RESERVE_FRACTION, RESERVE_MIN_BYTES
    assert frozen.reserve_bytes == max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * 10 ** 6))


def test_step_budget_guesses_an_unknown_optimizer_and_says_so():
    class Mine(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
    model = _mlp()
    b = step_budget(model, Mine(model.parameters()), device_memory_bytes=10 ** 7)
    assert b.optimizer_guessed and "assumed" in b.describe()
    with pytest.raises(ValueError, match="device_memory_bytes"):
        step_budget(model)                                # CPU: no device to ask


# --- fit -------------------------------------------------------------------------------------

def test_fit_applies_the_fastest_plan_that_fits_and_stays_bitwise(measured):
    model, step, ref, figs = measured
    b = step_budget(model, None, device_memory_bytes=1, reserve_bytes=0)
    free = fit(model, step, device_memory_bytes=b.static_bytes + 10 ** 8, reserve_bytes=0,
               figures=figs, min_offload_bytes=THRESHOLD, exact=True)   # bitwise: no chunked loss
    try:
        fastest = min(c.step_s for c in moe_offload.plan.memory_plan.candidates(figs[1], exact=True))
        assert free.plan.predicted_step_s <= fastest + 1e-12     # room for all: the fastest
        assert bitwise(grads(model, step), ref)
    finally:
        free.remove()
    least = min(c.peak_bytes for c in moe_offload.plan.memory_plan.candidates(figs[1]))
    room = (least + free.plan.predicted_peak_bytes) // 2
    tight = fit(model, step, device_memory_bytes=b.static_bytes + room, reserve_bytes=0,
                figures=figs, min_offload_bytes=THRESHOLD, exact=True)
    try:
        assert tight.plan.predicted_peak_bytes <= room
        assert tight.predicted_step_peak_bytes <= b.static_bytes + room
        assert any(c != Choice() for c in tight.plan.choices) or tight.plan.head != "none"
        assert bitwise(grads(model, step), ref)
        st = tight.stats()
        assert st["predicted_step_peak_bytes"] == tight.predicted_step_peak_bytes
        assert "activation peak budget" in tight.describe()
    finally:
        tight.remove()
    assert bitwise(grads(model, step), ref)


def _installed(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks, "loss_function" in model.__dict__


def test_fit_on_a_budget_nothing_meets_says_what_is_missing_and_installs_nothing(measured):
    model, step, _, figs = measured
    before = _installed(model)
    b = step_budget(model, None, device_memory_bytes=1, reserve_bytes=0)
    least = min(c.peak_bytes for c in moe_offload.plan.memory_plan.candidates(figs[1]))
    with pytest.raises(ValueError) as e:
        fit(model, step, device_memory_bytes=b.static_bytes + least // 2, reserve_bytes=0,
            figures=figs, min_offload_bytes=THRESHOLD)
    msg = str(e.value)
    assert "are missing" in msg and "tokens per step would fit" in msg and "(this batch has 32" in msg
    assert _installed(model) == before
    with pytest.raises(ValueError, match="before any activation"):
        fit(model, step, device_memory_bytes=b.static_bytes // 2, figures=figs)
    assert _installed(model) == before


def test_fit_respects_the_host_limit(measured):
    model, step, _, figs = measured
    b = step_budget(model, None, device_memory_bytes=1, reserve_bytes=0)
    cands = moe_offload.plan.memory_plan.candidates(figs[1])
    least = min(c.peak_bytes for c in cands)
    least_kept = min(c.peak_bytes for c in cands if not sum(c.moved_bytes))
    assert least < least_kept                   # offloading lowers the peak here
    h = fit(model, step, device_memory_bytes=b.static_bytes + least_kept, reserve_bytes=0,
            host_memory_bytes=0, figures=figs, min_offload_bytes=THRESHOLD)
    try:
        assert sum(h.plan.prediction.moved_bytes) == 0
    finally:
        h.remove()
    with pytest.raises(ValueError, match="are missing"):
        fit(model, step, device_memory_bytes=b.static_bytes + least, reserve_bytes=0,
            host_memory_bytes=0, figures=figs, min_offload_bytes=THRESHOLD)


def test_the_chunked_head_is_measured_offered_and_labelled(measured):
    """The chunked loss changes the summation order: it is a candidate (its measured
    saving shows in the prediction), ``exact=True`` leaves it out, a plan using it says so,
    and its gradients stay within fp32 rounding of the model without it."""
    model, step, ref, (layers, f) = measured
    assert f.heads["chunked"].exact is False and f.heads["checkpoint"].exact is True
    assert f.heads["chunked"].saved_bytes > 0
    plan = moe_offload.plan.make_plan(model, (layers, f), [Choice()] * 3, head="chunked",
                                      min_offload_bytes=THRESHOLD)
    assert not plan.exact and "chunked" in plan.describe()
    assert plan.predicted_activation_bytes == f.act_none_bytes - f.heads["chunked"].saved_bytes
    assert all(c.head != "chunked" for c in moe_offload.plan.memory_plan.candidates(f, exact=True))
    handle = plan.apply()
    try:
        got = grads(model, step)
    finally:
        handle.remove()
    for a, b in zip(got, ref):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert bitwise(grads(model, step), ref)       # removed: the model's own loss again
