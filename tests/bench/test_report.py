"""The printed report: one table for every workload."""
import pytest
import torch


def test_table_has_peak_columns_and_plan_lines():
    from moe_offload.bench.measure import max_rel_error
    from moe_offload.bench.report import format_table
    mib = 2 ** 20
    rows = [{"strategy": "checkpoint", "owner": "peer", "status": "ok", "step_s": 0.2, "time_x": 1.3,
             "act_bytes": 100 * mib, "act_x": 0.14, "peak_step_bytes": 300 * mib, "peak_x": 0.25,
             "d2h_bytes": 0, "h2d_bytes": 0, "bitwise_equal": True, "stack": "qwen3"},
            {"strategy": "plan@checkpoint", "owner": "ours", "status": "ok", "step_s": 0.16, "time_x": 1.02,
             "act_bytes": 120 * mib, "act_x": 0.17, "peak_step_bytes": 297 * mib, "peak_x": 0.247,
             "d2h_bytes": 5e8, "h2d_bytes": 5e8, "bitwise_equal": False, "grad_max_rel_error": 2e-3,
             "step_over_predicted": 1.01, "note": "", "stack": "qwen3",
             "plan": {"choices": ["0:norms/1"], "prefetch_layers": 1, "budget_bytes": 300 * mib,
                      "predicted_s": 0.158, "predicted_peak_bytes": 290 * mib, "peak_moment": "loss backward",
                      "math_changing": True, "head": "chunked"}},
            {"strategy": "torchtune+ckpt", "owner": "peer", "status": "skipped", "note": "no torchtune",
             "stack": "qwen3"}]
    text = format_table(rows, published=False)
    assert "PEAK MiB" in text and "peak x" in text
    lines = text.splitlines()
    assert "300.0" in lines[2] and "0.250" in lines[2] and lines[2].endswith("yes")
    assert "published" not in text
    assert lines[3].endswith("math")
    assert "peak budget 300.0 MiB" in lines[4] and "peak 290.0 MiB (loss backward)" in lines[4]
    assert "x1.024" in lines[4] and "max rel grad error 2.0e-03" in lines[4]
    assert "[skipped] no torchtune" in lines[5]
    a, b = [torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 4.0])]
    assert max_rel_error(a, b) == pytest.approx(0.5)
