"""The planner on synthetic figures (the medium preset's H100 numbers and hand-sized cases)."""
import math

import pytest

from moe_offload.plan.stack import (LayerCosts, Plan, candidate_plans, costs_from_measurements,
                                       plan_for_budget, plan_hidden, plan_memory, prefetch_for,
                                       simulate)

MiB = 1 << 20


def h100() -> LayerCosts:
    """bench.log of the medium preset (T=16384 H=4096 F=2048 E=8 L=8 bf16, 55 GB/s)."""
    return costs_from_measurements(
        num_layers=8, none_fwd_s=9.88e-3, none_bwd_s=17.96e-3, none_act_bytes=2147491840,
        act_saved_bytes=8 * 256 * MiB, fc1_saved_bytes=8 * 128 * MiB, x_bytes=128 * MiB,
        output_bytes=128 * MiB, d2h_Bps=55e9, h2d_Bps=55e9, fc1_bwd_s=24.18e-3, ckpt_bwd_s=27.77e-3)


def simple(**kw) -> LayerCosts:
    base = dict(fwd_s=1.0, bwd_s=2.0, act_bytes=200, fc1_bytes=100, output_bytes=100, num_layers=4,
                d2h_Bps=1e12, h2d_Bps=1e12, fc1_extra_s=0.5)
    base.update(kw)
    return LayerCosts(**base)


def test_costs_from_measurements_h100():
    c = h100()
    assert (c.act_bytes, c.fc1_bytes, c.input_bytes) == (256 * MiB, 128 * MiB, 128 * MiB)
    assert c.kept_bytes == 1024                      # 8 KiB of small saved tensors / 8 layers
    assert c.fwd_s == pytest.approx(1.235e-3) and c.bwd_s == pytest.approx(2.245e-3)
    assert c.fc1_extra_s == pytest.approx(0.7775e-3) and c.ckpt_extra_s == pytest.approx(1.22625e-3)


def test_memory_matches_the_measured_rows():
    c = h100()
    assert plan_memory(c, 0, "activation") == 2147491840                     # none
    assert plan_memory(c, 0, "activation", range(8)) == 1073750016           # fc1_recompute
    assert plan_memory(c, 7, "activation") == 402661376                      # offload_full (7/8)
    assert plan_memory(c, 1, "activation") == 2013274112                     # 1 layer: only fc1 out frees
    assert plan_memory(c, 8, "checkpoint") == 128 * MiB                      # only the output


def test_simulate_by_hand():
    c = simple()
    assert simulate(c, 0, "activation") == (4.0, 12.0)
    assert simulate(c, 0, "activation", [0, 1, 2, 3]) == (4.0, 14.0)          # + 4 x 0.5
    assert simulate(c, 4, "checkpoint", (), 4) == pytest.approx((4.0, 16.0))  # + 4 x fwd
    # Slow copies, 1 layer offloaded: its x is the stack input (never moved), its fc1 out
    # (100 B) is ready at t=1 and copied by 1 + 100/10 = 11; entering layer 3 (= 0 + max(2,
    # L-k)) at t=3 forces its release: compute waits until 11, so the forward ends at 12.
    slow = simple(d2h_Bps=10.0, h2d_Bps=10.0, input_bytes=100)
    fwd, step = simulate(slow, 1, "activation", (), 1)
    assert fwd == pytest.approx(12.0)
    # Backward: layers 3, 2 run 12..16; reaching layer 1 issues layer 0's reload (p=1) at 16,
    # landing at 26; layer 1 ends at 18, layer 0 runs 26..28.  With p=3 it is issued at 12
    # (lands 22) and layer 0 runs 22..24.
    assert step == pytest.approx(28.0)
    assert simulate(slow, 1, "activation", (), 3)[1] == pytest.approx(24.0)
    # Without the input exclusion layer 0 also copies its x first (0..10), fc1 out 10..20;
    # the forced release at layer 3 waits until 20.
    assert simulate(simple(d2h_Bps=10.0), 1, "activation", (), 1)[0] == pytest.approx(21.0)


def test_hidden_transfers_cost_nothing_and_stalls_add_up():
    c = h100()
    none = simulate(c, 0, "activation")[1]
    assert simulate(c, 2, "activation", (), 4)[1] == pytest.approx(none, rel=0.01)
    fwd, _ = simulate(c, 8, "fc1", range(8), 4)
    # Layer 1's x (layer 0's output) is ready after one forward; then 7 copies back to back.
    assert fwd == pytest.approx(c.fwd_s + 7 * 128 * MiB / 55e9)


def test_budget_at_checkpoint_mixes_offload_and_fc1():
    c = h100()
    plan = plan_for_budget(c, 1 << 30)
    assert isinstance(plan, Plan) and plan.predicted_bytes <= 1 << 30
    assert plan.offloaded_layers >= 1 and plan.fc1_layers
    fc1_all = simulate(c, 0, "activation", range(8))[1]
    assert plan.predicted_s < fc1_all                 # cheaper than fc1 everywhere (34 ms)
    assert plan.predicted_s <= 38.33e-3 / 1.15        # the (a) criterion vs the measured checkpoint
    assert plan.prefetch_layers >= 1


def test_plan_is_the_fastest_that_fits_and_monotone():
    c = h100()
    plans = candidate_plans(c)
    last = math.inf
    for budget in sorted({p.predicted_bytes for p in plans}, reverse=True):
        best = plan_for_budget(c, budget)
        assert best.predicted_bytes <= budget
        assert all(best.predicted_s <= p.predicted_s for p in plans if p.predicted_bytes <= budget)
        assert best.predicted_s >= last or last == math.inf or best.predicted_s == pytest.approx(last)
        last = best.predicted_s


def test_smallest_budgets():
    c = h100()
    tiny = plan_for_budget(c, 128 * MiB)              # save_on_cpu's act: only the output fits
    assert tiny.offloaded_layers == 8 and tiny.offload_mode == "checkpoint"
    assert tiny.predicted_bytes == 128 * MiB
    assert plan_for_budget(c, 64 * MiB) is None       # below the output: impossible
    assert plan_for_budget(c, 0) is None


def test_no_fc1_mode_never_plans_fc1():
    c = simple(fc1_extra_s=None, kept_bytes=1)
    assert all(not p.fc1_layers and p.offload_mode != "fc1" for p in candidate_plans(c))
    # Offloaded layers still keep their small tensors: only checkpoint reaches the output.
    assert plan_memory(c, 4, "activation") == c.output_bytes + 4
    assert plan_for_budget(c, c.output_bytes).offload_mode == "checkpoint"
    with pytest.raises(ValueError, match="fc1"):
        plan_memory(c, 0, "activation", [1])
    with pytest.raises(ValueError, match="fc1"):
        plan_hidden(c, fc1_all=True)


def test_prefetch_depth_follows_the_h2d_to_backward_ratio():
    assert prefetch_for(simple(), 0, "activation") == 0
    assert prefetch_for(simple(), 2, "activation") == 2          # ceil(tiny) + 1
    slow = simple(h2d_Bps=200 / 5.0)                              # one reload = 5 s, backward 2 s
    assert prefetch_for(slow, 3, "activation") >= math.ceil(5 / 2) + 1


def test_plan_hidden():
    c = h100()
    none = simulate(c, 0, "activation")[1]
    hid = plan_hidden(c)
    assert hid.offloaded_layers >= 1 and hid.predicted_s <= 1.02 * none
    assert hid.predicted_bytes < plan_memory(c, 0, "activation")
    f = plan_hidden(c, fc1_all=True)
    assert f.fc1_layers == tuple(range(8)) and f.offload_mode == "fc1" and f.offloaded_layers >= 2
    assert f.prefetch_layers == f.offloaded_layers                      # deep prefetch
    assert f.predicted_s <= 1.02 * simulate(c, 0, "activation", range(8))[1]


@pytest.mark.parametrize("kw, needle", [
    (dict(num_layers=0), "num_layers"), (dict(d2h_Bps=0), "bandwidth"),
    (dict(fwd_s=-1), "fwd_s"), (dict(fc1_bytes=300), "fc1_bytes"),
])
def test_bad_costs(kw, needle):
    with pytest.raises(ValueError, match=needle):
        simple(**kw)


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="offload_mode"):
        simulate(simple(), 1, "magic")
    with pytest.raises(ValueError, match="offloaded layers"):
        plan_memory(simple(), 5, "activation")
