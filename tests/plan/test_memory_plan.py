"""plan_memory on CPU (emulate): bitwise gradients with every plan kind, predictions
against what the engine moved, budgets, errors, describe(), remove()."""
import copy
import pytest
import torch

from moe_offload import MemoryPlan, plan_memory
from moe_offload.plan import Choice, make_plan, measure_model
from moe_offload.plan.measure import count_saved
from moe_offload.plan.modules import Wrappers, install_loss_checkpoint, install_recompute

from ._models import bitwise, grads, moe_stack, tiny_qwen3

pytest.importorskip("transformers")
THRESHOLD = 1024


pytestmark = pytest.mark.usefixtures("one_thread")


def _measured(kind):
    model, step = tiny_qwen3() if kind == "qwen3" else moe_stack()
    ref = grads(model, step)
    figs = measure_model(model, step, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    return model, step, ref, figs


@pytest.fixture(scope="module")
def qwen3():
    return _measured("qwen3")


@pytest.fixture(scope="module")
def stack():
    return _measured("moe")


def _run(plan: MemoryPlan, model, step):
    handle = plan.apply()
    try:
        handle.reset_stats()
        got = grads(model, step)
        return got, handle.stats()
    finally:
        handle.remove()


def _measured_act(plan: MemoryPlan, model, step, moved: int) -> int:
    """Activation bytes the plan leaves: what its recompute wrappers save (counted like the
    planner does) minus what the engine actually moved to the host."""
    outside_none = count_saved(model, plan.layers, step, THRESHOLD).outside_bytes
    wr = Wrappers()
    try:
        for layer, c in zip(plan.layers, plan.choices):
            install_recompute(layer, c.recompute, wr)
        if plan.prediction.loss_checkpoint:
            install_loss_checkpoint(model, wr)
        saved = count_saved(model, plan.layers, step, THRESHOLD)
    finally:
        wr.remove()
    return (plan.figures.act_none_bytes - (_none_layers(plan) - _layers_total(saved))
            - (outside_none - saved.outside_bytes) - moved)


def _none_layers(plan) -> int:
    return sum(sum(lf.groups["none"].values()) for lf in plan.figures.layers)


def _layers_total(saved) -> int:
    return sum(saved.layer_total(i) for i in range(len(saved.by_layer)))


def _all_choices(figs):
    """Every recompute option with full offload, and every offload level on two of them."""
    opts = figs[1].layers[0].options
    return ([Choice(r, 3) for r in opts] + [Choice("none", o) for o in (0, 1, 2)]
            + [Choice(opts[-2], o) for o in (1, 2)])


@pytest.mark.parametrize("kind", ["qwen3", "moe"])
def test_every_uniform_choice_is_bitwise_and_predicted(kind, qwen3, stack):
    model, step, ref, figs = qwen3 if kind == "qwen3" else stack
    L = len(figs[0])
    for c in _all_choices(figs):
        # leading layers take the choice, the last layer stays plain (the engine's usual shape)
        plan = make_plan(model, figs, [c] * (L - 1) + [Choice()], min_offload_bytes=THRESHOLD)
        got, stats = _run(plan, model, step)
        assert bitwise(got, ref), f"{kind}: gradients differ under {c}"
        moved = int(stats["offloaded_bytes"])
        assert moved == sum(plan.prediction.moved_bytes), f"{kind} {c}: moved {moved}"
        act = _measured_act(plan, model, step, moved)
        assert abs(act - plan.predicted_activation_bytes) <= 0.02 * figs[1].act_none_bytes, (kind, c)


def test_mixed_choices_and_full_offload_bitwise(qwen3):
    model, step, ref, figs = qwen3
    mixes = [[Choice("layer", 3), Choice("norms+mlp", 2), Choice("norms", 1)],
             [Choice("norms", 0), Choice("norms+experts", 3), Choice("none", 0)],
             [Choice("norms+mlp", 3)] * 3]
    for choices in mixes:
        plan = make_plan(model, figs, choices, min_offload_bytes=THRESHOLD)
        got, stats = _run(plan, model, step)
        assert bitwise(got, ref), choices
        assert stats["offloaded_bytes"] > 0


def test_loss_checkpoint_is_bitwise_and_saves_the_fp32_log_softmax(qwen3):
    model, step, ref, figs = qwen3
    f = figs[1]
    # The checkpoint starts at the final norm's input: the fp32 log-softmax (32 tokens x
    # vocab 128 x 4 B) and the LM head's input are no longer saved (a checkpoint of the loss
    # alone would save the fp32 logits instead: no saving at all in this fp32 model).
    assert f.loss_extra_s is not None and f.loss_saved_bytes >= 32 * 128 * 4 + 32 * 64 * 4
    wr = Wrappers()
    try:
        install_loss_checkpoint(model, wr)
        head = model.loss_function
        step().backward()
        assert head.x is None          # nothing held past the step (its own norm calls ignored)
    finally:
        wr.remove()
    model.zero_grad(set_to_none=True)
    plan = make_plan(model, figs, [Choice()] * 3, loss_checkpoint=True, min_offload_bytes=THRESHOLD)
    assert plan.predicted_activation_bytes == f.act_none_bytes - f.loss_saved_bytes
    assert "loss checkpointed" in plan.describe()
    got, _ = _run(plan, model, step)
    assert bitwise(got, ref)
    assert "_loss_function" not in model.__dict__


def test_router_aux_loss_trains_under_plans(qwen3):
    """The router's gradient includes the aux loss: without it the router grads differ."""
    model, step, ref, figs = qwen3
    router = model.model.layers[0].mlp.gate.weight
    idx = [i for i, p in enumerate(model.parameters()) if p is router][0] + 1
    model.config.output_router_logits = False
    try:
        no_aux = grads(model, step)
    finally:
        model.config.output_router_logits = True
    assert not torch.equal(no_aux[idx], ref[idx])
    plan = make_plan(model, figs, [Choice("norms+mlp", 3)] * 3, min_offload_bytes=THRESHOLD)
    got, _ = _run(plan, model, step)
    assert torch.equal(got[idx], ref[idx])


@pytest.mark.parametrize("kind", ["qwen3", "moe"])
def test_budgets_respected(kind, qwen3, stack):
    model, step, ref, figs = qwen3 if kind == "qwen3" else stack
    act_none = figs[1].act_none_bytes
    full = make_plan(model, figs, [Choice()] * len(figs[0]), min_offload_bytes=THRESHOLD).predicted_peak_bytes
    for frac in (1.0, 0.7, 0.5, 0.3):
        try:        # exact: the chunked loss would change the bits
            plan = plan_memory(model, step, int(full * frac), figures=figs, min_offload_bytes=THRESHOLD,
                               exact=True)
        except ValueError:
            assert frac < 0.5
            continue
        assert plan.predicted_peak_bytes <= int(full * frac)
        got, stats = _run(plan, model, step)
        assert bitwise(got, ref)
        act = _measured_act(plan, model, step, int(stats["offloaded_bytes"]))
        assert abs(act - plan.predicted_activation_bytes) <= 0.02 * act_none


def test_impossible_budget_names_the_minimum(qwen3):
    model, step, _, figs = qwen3
    with pytest.raises(ValueError, match=r"smallest step peak any plan reaches: \d+ bytes"):
        plan_memory(model, step, 1, figures=figs, min_offload_bytes=THRESHOLD)
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        plan_memory(model, step, -1, figures=figs)
    with pytest.raises(ValueError, match="budget_bytes, max_time_x or max_step_s"):
        plan_memory(model, step, None, figures=figs)


def test_max_time_x_picks_least_memory_in_time(qwen3):
    model, step, _, figs = qwen3
    plan = plan_memory(model, step, None, max_time_x=1.0, figures=figs)
    assert plan.predicted_step_s <= figs[1].step_none_s * (1 + 1e-9)


def test_describe_and_remove(qwen3):
    model, step, ref, figs = qwen3
    plan = make_plan(model, figs, [Choice("norms", 2), Choice("layer", 3), Choice()],
                     min_offload_bytes=THRESHOLD)
    text = plan.describe()
    assert "layer recompute" in text and "predicted: step" in text
    assert "norms" in text and "layer inputs" in text and len(text.splitlines()) == 7
    assert "predicted peak above the step start" in text and plan.peak_moment in text
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    before = hooks()
    handle = plan.apply()
    assert any("forward" in m.__dict__ for m in model.modules()) and hooks() > before
    handle.remove()
    assert not any("forward" in m.__dict__ for m in model.modules()) and hooks() == before
    assert bitwise(grads(model, step), ref)


def test_make_plan_rejects_unmeasured_option(stack):
    model, step, _, figs = stack
    with pytest.raises(ValueError, match="was not measured"):
        make_plan(model, figs, [Choice("norms+experts", 0)] * 3)


def test_calibration_probes_measure_non_negative_per_byte_costs(qwen3):
    from moe_offload.plan.memory_plan import calibrate_offload, probe_plans
    model, step, ref, figs = qwen3
    f = copy.deepcopy(figs[1])
    probes = dict(probe_plans(f))
    assert [c.offload for c in probes["attention"]] == [1, 1, 0]
    assert [c.offload for c in probes["block"]] == [3, 3, 0]
    assert probes["block"][0].recompute == "norms+mlp"       # cheapest short of the layer
    out = calibrate_offload(model, figs[0], step, f, iters=1, warmup=0,
                            min_offload_bytes=THRESHOLD, emulate=True)
    assert set(out) >= {"attention", "block", "attention_s_per_GB", "block_s_per_GB"}
    assert f.attention_s_per_byte >= 0 and f.block_s_per_byte >= 0
    assert f.calibration is out
    assert bitwise(grads(model, step), ref)           # the probes left the model as it was


def test_recompute_costs_without_probes_come_from_the_measured_samples(qwen3):
    """The fallback (CPU, probes off): each option's extra is its pooled median step minus
    no plan's, from measure_model's own timed steps; no recompute calibration ran."""
    from moe_offload.plan.solve import pooled_extras
    f = qwen3[3][1]
    assert "recompute" not in f.calibration
    assert set(f.step_samples) >= {"none", "norms", "layer"}
    for opt, total in pooled_extras(f.step_samples).items():
        assert sum(lf.extra_s[opt] for lf in f.layers) == pytest.approx(total)


def test_calibrate_recompute_pools_probe_samples_and_sets_extras(qwen3):
    from moe_offload.plan.memory_plan import calibrate_recompute, recompute_probes
    from moe_offload.plan.solve import pooled_extras
    model, step, ref, figs = qwen3
    f = copy.deepcopy(figs[1])
    probes = dict(recompute_probes(f))
    assert list(probes)[0] == "none" and set(probes) == set(f.layers[0].options)
    assert all(c == Choice("layer", 0) for c in probes["layer"])
    n = {o: len(v) for o, v in f.step_samples.items()}
    for lf in f.layers:                       # a stale figure the probes must replace
        lf.extra_s["norms"] = 123.0
    out = calibrate_recompute(model, figs[0], step, f, iters=2, warmup=0,
                              min_offload_bytes=THRESHOLD, emulate=True)
    assert {o: len(v) for o, v in f.step_samples.items()} == {o: k + 2 for o, k in n.items()}
    extras = pooled_extras(f.step_samples)
    for opt, total in extras.items():
        assert out[opt]["extra_total_s"] == pytest.approx(total)
        assert sum(lf.extra_s[opt] for lf in f.layers) == pytest.approx(total)
    assert out["norms"]["before_total_s"] == pytest.approx(123.0 * len(f.layers))
    assert f.calibration["recompute"] is out
    assert bitwise(grads(model, step), ref)           # the probes left the model as it was
