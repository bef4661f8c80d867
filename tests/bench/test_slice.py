"""The slice (--model slice / qwen3) through the one runner, on the CPU: a tiny Qwen3-MoE."""
import json

import pytest

from moe_offload.__main__ import main
from moe_offload.bench.config import build_parser, config_from_args

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(argv):
    parser = build_parser()
    args = parser.parse_args(["bench", *argv])
    return config_from_args(args, parser.subcommand_parsers["bench"], known_strategies=["none"])


def test_model_defaults_to_qwen3_unless_a_synthetic_flag_is_given():
    assert _cfg(["--device", "cpu"]).model == "qwen3"
    assert _cfg(["--device", "cpu"]).seq == 64
    assert _cfg(["--device", "cpu", "-T", "64"]).model == "mlp"
    assert _cfg(["--device", "cpu", "--preset", "tiny"]).model == "mlp"
    assert _cfg(["--device", "cpu", "--seq", "128"]).seq == 128
    with pytest.raises(SystemExit):
        _cfg(["--device", "cpu", "--model", "mlp", "--seq", "128"])


def test_qwen3_run_prints_table_plans_and_targets(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc = main(["bench", "--device", "cpu", "-L", "2", "--seq", "32", "--iters", "1", "--warmup", "0",
               "--strategies", "none,checkpoint,plan@checkpoint,plan@time", "--json", str(path),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model qwen3" in out and "targets (issues 11 and 16)" in out and "MemoryPlan: 2 layers" in out
    assert "PEAK MiB" in out and "peak budget" in out
    assert out.count("planner calibration") == 1 and "recompute: not probed (CPU" in out
    rows = {r["strategy"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"none", "checkpoint", "plan@checkpoint", "plan@time"}
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["note"])
        if r["bitwise_equal"] is not True:
            # Only a plan whose head changes the math (the chunked loss: its GEMMs run over
            # chunks of rows, a choice the planner makes by measured time) may differ, and
            # it is labelled with its measured error.
            assert r["plan"] and r["plan"]["math_changing"], name
            assert r["bitwise_equal"] is False and 0 < r["grad_max_rel_error"] < 1e-4, (name, r)
    plan = rows["plan@checkpoint"]["plan"]
    ck_peak = rows["checkpoint"]["peak_step_bytes"]
    assert plan["budget_bytes"] == ck_peak or rows["plan@checkpoint"]["requested_budget_bytes"] == ck_peak
    assert plan["predicted_peak_bytes"] <= plan["budget_bytes"]
    assert rows["plan@checkpoint"]["step_over_predicted"] > 0


def test_our_experts_rows_run_after_the_peers_and_compare_with_our_experts(tmp_path):
    """``experts:*`` switch the model to our experts for good: they run after the peers (on
    Hugging Face's experts), and their gradients are compared with a step on ours."""
    path = tmp_path / "r.json"
    assert main(["bench", "--device", "cpu", "-L", "2", "--seq", "32", "--iters", "1", "--warmup", "0",
                 "--strategies", "experts,checkpoint", "--json", str(path), "--no-progress"]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["none", "checkpoint", "experts:ours", "experts:ours+ckpt"]
    for r in rows:
        assert r["status"] == "ok" and r["bitwise_equal"] is True, r
    assert rows[-1]["act_bytes"] < rows[-2]["act_bytes"]          # checkpointing saved memory
