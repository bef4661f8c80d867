"""Dominance / hideable / lower-bound checks as pure functions on synthetic figures."""
from moe_offload.bench.checks import (PUBLISHED, Point, comparisons, dominance_check,
                                      hideable_check, lower_bound_check)


def test_dominance_pass_both():
    peers = [Point("checkpoint", 1.21, 0.385)]
    ours = [Point("fast", 1.04, 0.38), Point("small", 1.20, 0.19)]
    (d,) = dominance_check(peers, ours)
    assert d["a_pass"] and d["a_configs"] == ["fast"]     # 1.04 <= 1.21/1.15 = 1.052
    assert d["b_pass"] and d["b_configs"] == ["small"]    # 0.19 <= 0.1925


def test_dominance_fail_both_at_the_edges():
    peers = [Point("checkpoint", 1.21, 0.385)]
    ours = [Point("not fast enough", 1.06, 0.30),      # 1.06 > 1.052
            Point("too much memory", 1.00, 0.40),      # act above the peer's
            Point("not small enough", 1.10, 0.20),     # 0.20 > 0.1925
            Point("too slow", 1.30, 0.10)]             # time above the peer's
    (d,) = dominance_check(peers, ours)
    assert not d["a_pass"] and d["a_configs"] == []
    assert not d["b_pass"] and d["b_configs"] == []


def test_dominance_one_result_per_peer():
    res = dominance_check(PUBLISHED, [Point("x", 2.0, 0.1)])
    assert [r["peer"] for r in res] == [p.name for p in PUBLISHED]
    by = {r["peer"]: r for r in res}
    assert by["save_on_cpu (published)"]["a_pass"]           # 2.0 <= 6.93/1.15, 0.1 <= 0.115
    assert not by["save_on_cpu (published)"]["b_pass"]       # 0.1 > 0.0575
    assert not by["checkpoint (published)"]["a_pass"]        # slower than 1.21


def test_hideable():
    assert hideable_check([Point("a", 1.02, 0.5)])["pass"]
    assert not hideable_check([Point("a", 1.04, 0.1), Point("b", 1.0, 0.51)])["pass"]


def test_lower_bound():
    assert lower_bound_check({"full": 1.09})["pass"]
    r = lower_bound_check({"full": 1.09, "all": 1.2})
    assert not r["pass"] and r["failing"] == ["all"]
    assert not lower_bound_check({})["pass"]
    assert not lower_bound_check({"full": None})["pass"]


def _row(stack, strategy, owner, t, a, tu=None, au=None, bitwise=True, step_over_lb=None):
    return {"stack": stack, "base_stack": stack.split("/")[0], "strategy": strategy, "owner": owner,
            "status": "ok", "time_x": t, "act_x": a, "time_x_vs_unfused": tu, "act_x_vs_unfused": au,
            "bitwise_equal": bitwise, "step_over_lb": step_over_lb}


def test_comparisons_from_rows():
    rows = [
        _row("fused", "none", "baseline", 1.0, 1.0, 0.9, 0.8),
        _row("fused", "save_on_cpu", "peer", 6.0, 0.1, 5.4, 0.08),
        _row("fused", "checkpoint", "peer", 1.3, 0.4, 1.17, 0.32),
        _row("fused", "offload_but_last", "ours", 1.8, 0.15, 1.62, 0.12, step_over_lb=1.05),
        _row("fused/fc1", "fc1_recompute+offload", "ours", 1.1, 0.18, 0.99, 0.144),
        _row("fused", "offload_broken", "ours", 1.0, 0.01, 0.9, 0.01, bitwise=False),
        _row("unfused", "none", "baseline", 1.0, 1.0, 1.0, 1.0),
        _row("unfused", "checkpoint", "peer", 1.21, 0.385, 1.21, 0.385),
        _row("unfused", "save_on_cpu", "peer", 6.93, 0.115, 6.93, 0.115),
    ]
    c = comparisons(rows)
    eng = {d["peer"]: d for d in c["engine_vs_engine"]["dominance"]}
    assert eng["fused:checkpoint"]["a_pass"]
    assert eng["fused:checkpoint"]["a_configs"] == ["fused/fc1:fc1_recompute+offload"]
    # Wrong gradients never count as a config.
    assert all("fused:offload_broken" not in d["a_configs"] + d["b_configs"] for d in eng.values())
    assert not c["engine_vs_engine"]["hideable"]["pass"]
    sys_ = {d["peer"]: d for d in c["system_vs_system"]["dominance"]}
    assert set(sys_) == {"unfused:checkpoint", "unfused:save_on_cpu"}
    assert sys_["unfused:checkpoint"]["b_pass"]          # 0.99 <= 1.21 and 0.144 <= 0.1925
    assert c["system_vs_system"]["hideable"]["pass"]     # 0.99x of unfused none, 0.144 act
    assert c["published"]["baseline"] == "unfused:none"
    assert c["lower_bound"]["pass"] and list(c["lower_bound"]["configs"]) == ["fused:offload_but_last"]
    assert "engine_vs_engine_peak" not in c                # no peak_x in these rows


def test_peak_comparison_reads_peak_x():
    """The step-peak comparison judges the same rows by ``peak_x``: a plan that beats the
    checkpoint peer's peak passes there even where its activation memory does not."""
    rows = [_row("fused", "none", "baseline", 1.0, 1.0), _row("fused", "checkpoint", "peer", 1.3, 0.4),
            _row("fused", "plan@checkpoint", "ours", 1.1, 0.45)]
    for r, peak in zip(rows, (1.0, 0.6, 0.55)):
        r["peak_x"] = peak
    c = comparisons(rows)
    assert not c["engine_vs_engine"]["dominance"][0]["a_pass"]          # act 0.45 > 0.4
    peak = c["engine_vs_engine_peak"]["dominance"][0]
    assert peak["a_pass"] and peak["a_configs"] == ["fused:plan@checkpoint"]   # 0.55 <= 0.6


def test_impossible_when_the_memory_bound_is_below_the_output():
    # save_on_cpu keeps only the output (128 of 3072 MiB): half of it is below the output.
    floor = 128 / 3072
    peers = [Point("save_on_cpu", 9.18, floor), Point("checkpoint", 1.29, 1024 / 3072)]
    ours = [Point("ckpt_all", 1.6, floor), Point("slow_small", 2.0, 0.10)]
    soc, ckpt = dominance_check(peers, ours, floor_act_x=floor, floor_bytes=128 * 2**20)
    assert soc["a_status"] == "PASS" and soc["a_configs"] == ["ckpt_all"]
    assert soc["b_status"] == "IMPOSSIBLE" and not soc["b_pass"]
    assert "0.0208 is below the stack output 0.0417 (128.0 MiB)" in soc["b_why"]
    assert ckpt["b_status"] == "FAIL" and "b_why" not in ckpt  # 0.167 is above the floor
    # Without a floor the same figures are a plain FAIL.
    (soc2,) = dominance_check(peers[:1], ours)
    assert soc2["b_status"] == "FAIL" and soc2["floor_act_x"] is None
    # A config that passes wins over the floor (a wrong floor must not hide a pass).
    (soc3,) = dominance_check(peers[:1], [Point("x", 1.0, 0.001)], floor_act_x=floor)
    assert soc3["b_status"] == "PASS"


def test_comparisons_floor_from_the_none_rows_and_printed():
    from moe_offload.bench.report import format_checks
    MiB = 2**20
    rows = [
        dict(_row("fused", "none", "baseline", 1.0, 1.0, 0.94, 2 / 3), act_bytes=2048 * MiB,
             output_bytes=128 * MiB),
        _row("fused", "save_on_cpu", "peer", 8.3, 0.0625, 7.8, 128 / 3072),
        _row("fused", "offload_recompute_all", "ours", 1.8, 0.0625, 1.7, 128 / 3072),
        dict(_row("unfused", "none", "baseline", 1.0, 1.0, 1.0, 1.0), act_bytes=3072 * MiB,
             output_bytes=128 * MiB),
        _row("unfused", "save_on_cpu", "peer", 9.18, 128 / 3072, 9.18, 128 / 3072),
    ]
    c = comparisons(rows)
    (eng,) = c["engine_vs_engine"]["dominance"]
    assert eng["floor_act_x"] == 0.0625 and eng["a_status"] == "PASS"
    assert eng["b_status"] == "IMPOSSIBLE"
    (sys_,) = c["system_vs_system"]["dominance"]
    assert sys_["floor_act_x"] == 128 / 3072 and sys_["b_status"] == "IMPOSSIBLE"
    pub = {d["peer"]: d for d in c["published"]["dominance"]}
    assert pub["save_on_cpu (published)"]["b_status"] != "IMPOSSIBLE"  # 0.0575 > 0.0417
    text = format_checks(c)
    assert "(b) time <= peer and act <= 0.5 peer:   IMPOSSIBLE  act <= 0.5 x 0.0625 = 0.0312" in text
    assert "(a) act <= peer and time <= peer/1.15: PASS  fused:offload_recompute_all" in text


def test_unverified_rows_do_not_count():
    """A row whose reference gradients are missing (bitwise_equal None although it has a
    reference) is no configuration of ours; one verified bitwise is."""
    from moe_offload.bench.checks import _points
    base = dict(status="ok", owner="ours", base_stack="fused", stack="fused",
                time_x=1.0, act_x=0.5)
    rows = [dict(base, strategy="a", reference="none", bitwise_equal=None),
            dict(base, strategy="b", reference="none", bitwise_equal=True),
            dict(base, strategy="c", reference="none", bitwise_equal=False),
            dict(base, strategy="d", reference=None, bitwise_equal=None)]
    assert [p.name for p in _points(rows, "ours")] == ["b", "d"]


def test_slice_targets():
    from moe_offload.bench.checks import target_checks
    rows = [
        {"strategy": "checkpoint", "status": "ok", "act_bytes": 100, "peak_step_bytes": 300,
         "time_x": 1.3, "act_x": 0.14, "peak_x": 0.25},
        {"strategy": "plan@checkpoint", "status": "ok", "act_bytes": 99, "peak_step_bytes": 295,
         "time_x": 1.08, "act_x": 0.139, "peak_x": 0.24, "step_s": 1.0, "step_over_predicted": 1.02,
         "plan": {"predicted_bytes": 97, "predicted_peak_bytes": 290}, "bitwise_equal": True},
        {"strategy": "plan@time", "status": "ok", "act_bytes": 60, "peak_step_bytes": 200, "time_x": 1.05,
         "act_x": 0.3, "peak_x": 0.2, "step_over_predicted": 1.2,
         "plan": {"predicted_bytes": 60, "predicted_peak_bytes": 150}, "bitwise_equal": False},
    ]
    got = {c["target"].split(":")[0]: c for c in target_checks(rows)}
    assert got["at checkpointing's peak"]["status"] == "PASS"
    assert got["at <= 1.03x none's time"]["status"] == "FAIL"
    assert got["at save_on_cpu+ckpt's peak"]["status"] == "n/a"
    peak = got["predicted peak within 5% of measured (every plan row)"]
    assert peak["status"] == "FAIL" and "plan@checkpoint +1.7%" in peak["detail"] and "+33.3%" in peak["detail"]
    assert got["predicted step time within 5% of measured (every plan row)"]["status"] == "FAIL"
    bit = got["gradients bitwise equal to none (every plan row but labelled math changes)"]
    assert bit["status"] == "FAIL" and "plan@time" in bit["detail"]
    rows[2]["plan"].update(math_changing=True, head="chunked")     # a labelled math change passes
    rows[2]["grad_max_rel_error"] = 3e-3
    bit = {c["target"]: c for c in target_checks(rows)}[
        "gradients bitwise equal to none (every plan row but labelled math changes)"]
    assert bit["status"] == "PASS" and "math-changing head chunked" in bit["detail"] and "3.0e-03" in bit["detail"]
    rows[1]["peak_step_bytes"] = 320           # over checkpointing's measured peak: the target fails
    assert target_checks(rows)[0]["status"] == "FAIL"
    rows[1]["peak_step_bytes"] = 295
    rows.append({"strategy": "plan@save_on_cpu+ckpt", "status": "ok", "time_x": 1.1, "act_x": 0.01,
                 "peak_x": 0.1, "act_bytes": 10, "peak_step_bytes": 100, "requested_budget_bytes": 50,
                 "note": "below the least peak any plan reaches", "step_over_predicted": 1.0,
                 "plan": {"predicted_bytes": 10, "predicted_peak_bytes": 100}, "bitwise_equal": True})
    got = {c["target"].split(":")[0]: c for c in target_checks(rows)}
    assert got["at save_on_cpu+ckpt's peak"]["status"] == "FAIL"       # a budget out of reach
    assert "out of reach" in got["at save_on_cpu+ckpt's peak"]["detail"]
