"""The planner's cost model on hand-made figures (pure Python)."""
import pytest

from moe_offload.offload import release_lag
from moe_offload.plan.solve import (Choice, LayerFigures, ModelFigures, moved_bytes,
                                    pooled_extras, predict, refine, resident_bytes, search,
                                    split_extra)

ATT, MLP, NORM = frozenset({"attention"}), frozenset({"experts"}), frozenset({"norm"})


def figures(L=4, fwd=1.0, bw=100.0, norm_extra=0.1):
    """Each layer: 1 s forward, 2 s backward; saves attention 50 B, experts 100 B, norms 80 B
    (20 B unmovable); with norms recomputed the norms save 30 B instead."""
    none = {(ATT, True): 50, (MLP, True): 100, (NORM, True): 80, (NORM, False): 20}
    norms = {(ATT, True): 50, (MLP, True): 100, (NORM, True): 30, (NORM, False): 20}
    layers = [LayerFigures(fwd, 2 * fwd, {"norms": norm_extra}, {"none": none, "norms": norms})
              for _ in range(L)]
    return ModelFigures(layers, 0.0, 0.0, 0.0, 0.0, act_none_bytes=L * 250 + 1000,
                        d2h_Bps=bw, h2d_Bps=bw)


def test_resident_and_moved_by_level():
    g = {(ATT, True): 50, (MLP, True): 100, (NORM, True): 80, (NORM, False): 20,
         (ATT | NORM, True): 7}
    assert resident_bytes(g, 0) == 257 and moved_bytes(g, 0) == 0
    # level 1 moves attention; a storage also saved by a norm moves but is not freed
    assert moved_bytes(g, 1) == 57 and resident_bytes(g, 1) == 207
    assert moved_bytes(g, 2) == 157 and resident_bytes(g, 2) == 107
    assert moved_bytes(g, 3) == 237 and resident_bytes(g, 3) == 20


def test_no_plan_predicts_the_measured_baseline():
    f = figures()
    p = predict(f, [Choice()] * 4, release_lag)
    assert p.step_s == pytest.approx(f.step_none_s) == pytest.approx(12.0)
    assert p.act_bytes == f.act_none_bytes and p.engine_layers == 0


def test_copies_inside_the_window_are_free_and_beyond_it_cost():
    f = figures(bw=100.0)   # one layer's 1 s forward hides 100 B
    hidden = predict(f, [Choice("none", 1)] * 2 + [Choice()] * 2, release_lag)
    assert hidden.step_s == pytest.approx(12.0) and hidden.act_bytes == f.act_none_bytes - 100
    slow = predict(figures(bw=10.0), [Choice("none", 3)] * 3 + [Choice()], release_lag)
    # 3 x 230 B at 10 B/s: the D2H stream needs 69 s, the forward ends when it is done
    assert slow.fwd_s == pytest.approx(69.0, rel=1e-6)
    assert slow.step_s > 69.0 + 8.0


def test_release_lag_makes_compute_wait():
    """Layers 0-1 offload 230 B each at 50 B/s (4.6 s per layer); the engine's lag is
    max(2, 4 - 2) = 2: layer 2 waits for layer 0's copies (4.6 s), layer 3 for layer 1's
    (9.2 s), so the forward ends at 10.2 s, not at the copies' 9.2 s."""
    f = figures(L=4, bw=50.0)
    p = predict(f, [Choice("none", 3)] * 2 + [Choice()] * 2, release_lag, prefetch_layers=1)
    assert p.fwd_s == pytest.approx(10.2)


def test_recompute_adds_its_extra_and_saves_bytes():
    f = figures(norm_extra=0.5)
    p = predict(f, [Choice("norms", 0)] * 4, release_lag)
    assert p.step_s == pytest.approx(12.0 + 4 * 0.5)
    assert p.act_bytes == f.act_none_bytes - 4 * 50


def test_search_covers_mixes_and_prefetch():
    f = figures(bw=100.0)
    cands = search(f, release_lag)
    mixes = {c.choices for c in cands}
    assert (Choice("norms", 2),) * 2 + (Choice(),) * 2 in mixes
    assert all(c.prefetch_layers >= 1 for c in cands if c.engine_layers)
    fastest_small = min((c for c in cands if c.act_bytes <= f.act_none_bytes - 400),
                        key=lambda c: c.step_s)
    assert fastest_small.step_s < 12.0 + 4 * 0.1 + 1e-9


def test_refine_improves_one_layer_at_a_time():
    """From the no-plan start, a budget of 250 B less than none is met by the cheapest
    per-layer changes: refine reaches it and never leaves the budget."""
    f = figures(bw=1e-3)          # offload is hopeless: only recompute can save bytes
    start = predict(f, [Choice("norms", 0)] * 4, release_lag)
    budget = f.act_none_bytes - 150

    def fits(p):
        return p.act_bytes <= budget
    got = refine(f, start, release_lag, lambda a, b: (a.step_s, a.act_bytes) < (b.step_s, b.act_bytes), fits)
    assert fits(got) and got.step_s < start.step_s
    assert sum(c.recompute == "norms" for c in got.choices) == 3     # 3 x 50 B = 150 B


def test_calibrated_offload_cost_is_per_byte_by_level():
    f = figures(bw=1e12)          # copies free: only the calibrated cost remains
    f.attention_s_per_byte, f.block_s_per_byte = 0.01, 0.001
    base = predict(f, [Choice()] * 4, release_lag).step_s
    # level 1 moves 50 B of attention; level 3 adds 100 B experts + 80 B movable norms
    one = predict(f, [Choice("none", 1)] + [Choice()] * 3, release_lag).step_s
    assert one - base == pytest.approx(50 * 0.01)
    three = predict(f, [Choice("none", 3)] + [Choice()] * 3, release_lag).step_s
    assert three - base == pytest.approx(50 * 0.01 + 180 * 0.001)
    assert f.offload_cost_s(f.layers[0], Choice("none", 0)) == 0.0


def test_pooled_extras_are_median_differences_never_negative():
    samples = {"none": [10.0, 11.0, 30.0], "norms": [12.0, 13.0, 12.5, 40.0],
               "layer": [9.0, 9.5], "norms+mlp": []}
    got = pooled_extras(samples)
    # medians: none 11 (the 30 s outlier does not move it), norms 12.75, layer 9.25
    assert got == {"norms": pytest.approx(1.75), "layer": 0.0}
    assert pooled_extras({"norms": [1.0]}) == {}          # no baseline: nothing measured


def test_split_extra_by_forward_share_and_only_where_measured():
    f = figures(L=3)
    f.layers[0].fwd_s = 2.0                                # shares 2:1:1
    del f.layers[2].groups["norms"]                       # layer 2 does not offer norms
    f.layers[2].extra_s.pop("norms")
    split_extra(f, "norms", 0.9)
    assert [lf.extra_s.get("norms") for lf in f.layers] == [pytest.approx(0.6), pytest.approx(0.3),
                                                            None]
    # the measured total is what an all-layer plan of that option predicts on top of none
    p = predict(f, [Choice("norms"), Choice("norms"), Choice()], release_lag)
    assert p.step_s == pytest.approx(f.step_none_s + 0.9)
    for lf in f.layers:
        lf.fwd_s = 0.0                                   # no forward time: equal shares
    split_extra(f, "norms", 0.9)
    assert f.layers[0].extra_s["norms"] == pytest.approx(0.45)


# --- the peak model (module docstring "Peak"), on hand-made figures -------------------------

from moe_offload.plan.solve import HeadFigures  # noqa: E402


def peak_figures(L=4, bw=100.0):
    """``figures()`` with backward memory: each layer's backward starts holding 10 B besides
    activations (``C_j``) and needs 40 B more while it runs without recompute, 90 B with the
    norms recomputed (they come back); the loss needs 300 B above the forward's end while
    it runs forward, 500 B backward; 7 B are saved before the layers."""
    f = figures(L=L, bw=bw)
    for lf in f.layers:
        lf.bwd_fixed = 10
        lf.bwd_transient = {"none": 40, "norms": 90}
    f.heads["none"] = HeadFigures(fwd_transient=300, bwd_transient=500)
    f.heads["checkpoint"] = HeadFigures(extra_s=0.5, saved_bytes=200, fwd_transient=50,
                                        bwd_transient=120)
    f.pre_bytes = 7
    return f


def test_peak_of_no_plan_is_the_loss_backward():
    f = peak_figures()
    p = predict(f, [Choice()] * 4, release_lag)
    # act 2000 + the loss's 500 B backward transient; layer 3's backward: 10 + 4 x 250 + 40
    assert p.peak_bytes == 2000 + 500 and p.peak_moment == "loss backward"


def test_peak_moves_to_a_layer_backward_when_the_head_is_checkpointed():
    f = peak_figures()
    for lf in f.layers:
        lf.bwd_transient = {"none": 900, "norms": 950}
    p = predict(f, [Choice()] * 4, release_lag, head="checkpoint")
    assert p.act_bytes == 2000 - 200
    # loss: 1800 + 120; layer 3: 10 + 1000 + 900 = 1910 < 1920; layer 3 is the highest layer
    assert p.peak_bytes == 1920 and p.peak_moment == "loss backward"
    for lf in f.layers:
        lf.bwd_transient["none"] = 1000
    p = predict(f, [Choice()] * 4, release_lag, head="checkpoint")
    assert p.peak_bytes == 10 + 1000 + 1000 and p.peak_moment == "backward of layer 3 (none)"


def test_peak_counts_reloads_in_flight_and_the_recompute_transient():
    """Layers 0-2 offload everything (230 B moved, 20 B resident each); layer 3 keeps its
    250 B.  With prefetch p the backward of layer j holds the reloads of layers j-p..j."""
    f = peak_figures()
    f.heads["none"] = HeadFigures()
    for lf in f.layers:
        lf.bwd_transient = {"none": 400, "norms": 900}
    plan = [Choice("none", 3)] * 3 + [Choice()]
    for p_ in (1, 2):
        pred = predict(f, plan, release_lag, prefetch_layers=p_)
        # layer 2: C + resident 20 (0), 20 (1) -> layers 2-p..2 whole: 250 each
        whole = min(p_, 2) + 1
        expect_2 = 10 + whole * 250 + (3 - whole) * 20 + 400
        expect_3 = 10 + 250 + sum(250 if i >= 3 - p_ else 20 for i in range(3)) + 400
        assert pred.peak_bytes == max(expect_2, expect_3, pred.act_bytes)
    # the norms option: its own, larger, transient on the layer that uses it
    pred = predict(f, [Choice("norms", 0)] + [Choice()] * 3, release_lag)
    assert pred.act_bytes == 2000 - 50
    assert pred.peak_bytes == max(10 + 4 * 250 - 50 + 400, 10 + 200 + 900, pred.act_bytes)
    for lf in f.layers:
        lf.bwd_transient["norms"] = 1900
    f.__dict__.pop("_bytes", None)
    pred = predict(f, [Choice("norms", 0)] + [Choice()] * 3, release_lag)
    assert pred.peak_bytes == 10 + 200 + 1900 and pred.peak_moment == "backward of layer 0 (norms)"


def test_forward_peak_holds_unreleased_copies():
    """Offloading 1 of 8 layers: the engine releases layer 0 at the entry of layer
    max(2, 8 - 1) = 7, so the forward holds all of layer 0 until then."""
    f = figures(L=8, bw=1e9)
    f.pre_bytes = 7
    for lf in f.layers:
        lf.bwd_fixed, lf.bwd_transient = 0, {"none": 0}
    pred = predict(f, [Choice("none", 3)] + [Choice()] * 7, release_lag, prefetch_layers=1)
    # entering layer 7 (before the release): 7 + 250 (layer 0 whole) + 6 x 250
    assert pred.peak_bytes == max(7 + 7 * 250, pred.act_bytes)
    assert pred.act_bytes == f.act_none_bytes - 230


def test_peak_limit_picks_a_shallower_prefetch():
    f = peak_figures(L=6, bw=230 / 3)      # a reload takes 3 s, a layer's backward 2 s
    f.heads["none"] = HeadFigures()
    f.act_none_bytes = 6 * 250              # nothing outside the layers
    for lf in f.layers:
        lf.bwd_transient = {"none": 0, "norms": 0}
    plan = [Choice("none", 3)] * 3 + [Choice()] * 3     # reloads issued early have time
    free = predict(f, plan, release_lag)
    assert free.prefetch_layers == 3        # 22 s; p = 1: 25 s, p = 2: 23 s
    # layer 5's backward with p reloads issued: 10 + 3 x 250 + 3 x 20 + (p - 2) x 230
    limit = predict(f, plan, release_lag, prefetch_layers=2).peak_bytes
    assert limit == 10 + 750 + 60 and free.peak_bytes == limit + 230
    tight = predict(f, plan, release_lag, peak_limit=limit)
    assert tight.prefetch_layers == 2 and tight.peak_bytes <= limit


def test_search_candidates_carry_every_head_and_scaled_figures_scale():
    f = peak_figures()
    cands = search(f, release_lag)
    assert {c.head for c in cands} == {"none", "checkpoint"}
    g = f.scaled(2.0)
    assert g.act_none_bytes == 2 * f.act_none_bytes and g.layers[0].bwd_fixed == 20
    assert g.heads["none"].bwd_transient == 1000 and g.layers[0].fwd_s == 2.0
    a = predict(f, [Choice("norms", 1)] * 4, release_lag, prefetch_layers=1)
    b = predict(g, [Choice("norms", 1)] * 4, release_lag, prefetch_layers=1)
    assert b.peak_bytes == 2 * a.peak_bytes and b.step_s == pytest.approx(2 * a.step_s)
    assert f.layers[0].bwd_fixed == 10            # the original is untouched


def test_scaled_keeps_the_transients_of_a_chunked_head():
    """A loss computed a fixed number of tokens at a time has the same transient at any
    length: scaling it with the tokens over-predicted the H100 run's peak by 24%."""
    f = peak_figures()
    f.heads["chunked"] = HeadFigures(saved_bytes=300, fwd_transient=70, bwd_transient=90,
                                     exact=False, fixed_transient=True)
    g = f.scaled(4.0)
    assert (g.heads["chunked"].fwd_transient, g.heads["chunked"].bwd_transient) == (70, 90)
    assert g.heads["chunked"].saved_bytes == 1200 and not g.heads["chunked"].exact
    assert g.heads["none"].bwd_transient == 4 * 500
    p = predict(g, [Choice()] * 4, release_lag, head="chunked")
    assert p.peak_bytes == max(g.act_none_bytes - 1200 + 90, 4 * (10 + 4 * 250 + 40))
