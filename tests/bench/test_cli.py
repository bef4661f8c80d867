"""The ``python -m moe_offload`` command line, run in-process on the CPU (tiny preset).

The default strategy set includes our engine, which runs its ``emulate`` path here."""
import builtins
import contextlib
import io
import json

import pytest
import torch

from moe_offload.__main__ import main
from moe_offload.bench.plot import PLOT_HINT
from moe_offload.bench.report import ROW_KEYS, SCHEMA, TOP_LEVEL_KEYS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full default tiny run with --json and --plot (shared: it is the slow part)."""
    d = tmp_path_factory.mktemp("bench")
    json_path, png_path = d / "bench.json", d / "bench.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # --recipe none: the quantized rows have their own, smaller test below.
        rc = main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "0",
                   "--recipe", "none", "--json", str(json_path), "--plot", str(png_path),
                   "--no-progress"])
    return rc, buf.getvalue(), json_path, png_path


def test_tiny_run_prints_table_and_checks(tiny_run):
    rc, out, _, _ = tiny_run
    assert rc == 0
    assert "strategy" in out and "step ms" in out and "act x" in out
    for name in ("none", "save_on_cpu", "checkpoint", "offload_but_last", "offload_recompute_all",
                 "fc1_recompute"):
        assert f" {name} " in out
    assert "published, not measured" in out
    assert "Pareto / dominance checks" in out
    assert "engine vs engine" in out and ("PASS" in out or "FAIL" in out)


def test_tiny_run_json_has_documented_keys(tiny_run):
    _, _, json_path, _ = tiny_run
    report = json.loads(json_path.read_text())
    assert tuple(report) == TOP_LEVEL_KEYS
    assert report["schema"] == SCHEMA
    for key in ("torch", "device", "date", "bandwidth"):
        assert key in report["env"]
    assert report["env"]["bandwidth"]["d2h_Bps"] > 0
    assert report["config"]["preset"] == "tiny" and report["config"]["device"] == "cpu"
    rows = {(r["stack"], r["strategy"]): r for r in report["rows"]}
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert len(ok) >= 8
    for r in ok:
        missing = [k for k in ROW_KEYS if k not in r]
        assert not missing, (r["strategy"], missing)
    none = rows[("fused", "none")]
    assert none["act_bytes"] > 0 and none["time_x"] == 1.0 and none["act_x"] == 1.0
    # Our engine (emulate path) really moved bytes, both ways, and kept grads bitwise.
    for name in ("offload_but_last", "offload_all", "offload_recompute_all"):
        r = rows[("fused", name)]
        assert r["status"] == "ok", r["note"]
        assert r["d2h_bytes"] > 0 and r["h2d_bytes"] > 0
        assert r["engine_stats"]["offloaded_bytes"] == r["d2h_bytes"]
        assert r["bitwise_equal"] is True
        assert r["lb_s"] > 0 and r["step_over_lb"] > 0
    # Offloading everything leaves less allocated after forward than no offload.
    assert rows[("fused", "offload_all")]["act_bytes"] < none["act_bytes"]
    # Checkpointing saves only layer inputs.
    assert rows[("fused", "checkpoint")]["act_x"] < 0.6
    assert rows[("fused", "checkpoint")]["bitwise_equal"] is True
    assert set(report["checks"]) >= {"engine_vs_engine", "published", "lower_bound"}
    dom = report["checks"]["engine_vs_engine"]["dominance"]
    assert {d["peer"] for d in dom} == {"fused:save_on_cpu", "fused:checkpoint"}
    assert [p["name"] for p in report["published"]][0].startswith("save_on_cpu")
    assert any("t_s" in tr and len(tr["t_s"]) == len(tr["bytes"]) for tr in report["traces"].values())


def test_tiny_run_plot_is_png(tiny_run):
    pytest.importorskip("matplotlib")
    _, out, _, png_path = tiny_run
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png_path}" in out


def test_no_matplotlib_prints_hint(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    png = tmp_path / "x.png"
    # No subcommand: `python -m moe_offload` is `bench`.
    rc = main(["--strategies", "none,offload_but_last", "-L", "2", "-T", "64", "-H", "32", "-F", "32",
               "-E", "2", "--iters", "1", "--device", "cpu", "--plot", str(png),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert PLOT_HINT in out and "pip install 'moe_offload[bench]'" in out
    assert not png.exists()
    assert " offload_but_last " in out


def test_both_stacks_system_vs_system(tmp_path, capsys):
    path = tmp_path / "b.json"
    main(["bench", "--device", "cpu", "--stack", "both", "-L", "2", "-T", "64", "-H", "32", "-F", "32",
          "-E", "2", "--iters", "1", "--warmup", "0",
          "--strategies", "none,save_on_cpu,checkpoint,offload_all", "--json", str(path), "--no-progress"])
    report = json.loads(path.read_text())
    stacks = {(r["stack"], r["strategy"]) for r in report["rows"]}
    assert ("unfused", "none") in stacks and ("unfused", "checkpoint") in stacks
    assert ("unfused", "offload_all") not in stacks  # both: ours only on the fused stack
    assert "system_vs_system" in report["checks"]
    unf = next(r for r in report["rows"] if r["stack"] == "unfused" and r["strategy"] == "checkpoint")
    assert unf["bitwise_equal"] is True and unf["time_x_vs_unfused"] == unf["time_x"]
    assert "system vs system" in capsys.readouterr().out


def test_quantized_rows_bitwise_under_offload(tmp_path):
    path = tmp_path / "q.json"
    # 4 layers: with 2 the step peak (what the planner minimizes) cannot drop by offloading.
    main(["bench", "--device", "cpu", "-L", "4", "--iters", "1", "--warmup", "0", "--recipe", "fp8",
          "--strategies", "fp8,fp8+offload", "--json", str(path), "--no-progress"])
    rows = {r["strategy"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"none", "fp8", "fp8+offload"}
    if rows["fp8"]["status"] != "ok":  # the recipe may not run on this CPU: then it says why
        assert rows["fp8"]["note"]
        return
    assert rows["fp8"]["bitwise_equal"] is None          # fp8 vs bf16: no bitwise expectation
    r = rows["fp8+offload"]
    assert r["status"] == "ok", r["note"]
    assert r["reference"] == "fp8" and r["bitwise_equal"] is True and r["d2h_bytes"] > 0


def test_moe_model_runs(capsys):
    assert main(["bench", "--device", "cpu", "--model", "moe", "-L", "2", "-T", "64", "-H", "32",
                 "-F", "32", "-E", "2", "--iters", "1",
                 "--warmup", "0", "--strategies", "none,offload_all", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "moe            none" in out and "moe            offload_all" in out


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "huge"], "huge"),
    (["--strategies", "none,warp_drive"], "warp_drive"),
    (["--dtype", "fp64"], "fp64"),
    (["--recipe", "int4"], "int4"),
    (["-T", "0"], "'0'"),
    (["--hidden", "-4"], "'-4'"),
    (["--layers", "two"], "'two'"),
    (["--plot", "out.jpg"], "out.jpg"),
    (["--device", "tpu"], "tpu"),
    (["-T", "2", "-E", "4"], "--tokens 2"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and needle in err


def test_demo_runs(capsys):
    assert main(["demo", "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "step 1: loss" in out and "step 2: loss" in out


@pytest.mark.cuda
def test_cuda_bench_small_run(tmp_path):
    path = tmp_path / "b.json"
    main(["bench", "--preset", "small", "--iters", "2", "--warmup", "1", "--json", str(path),
          "--strategies", "none,checkpoint,offload_but_last", "--no-progress"])
    report = json.loads(path.read_text())
    rows = {(r["stack"], r["strategy"]): r for r in report["rows"]}
    r = rows[("fused", "offload_but_last")]
    assert r["status"] == "ok", r["note"]
    assert r["bitwise_equal"] is True and r["act_x"] < 0.5
    assert torch.cuda.is_available()


def test_tiny_run_planned_rows(tiny_run):
    _, out, json_path, _ = tiny_run
    report = json.loads(json_path.read_text())
    rows = {r["strategy"]: r for r in report["rows"] if r["stack"].startswith("fused")}
    peer_peak = {p: rows[p]["peak_step_bytes"] for p in ("checkpoint", "save_on_cpu")}
    for name in ("offload_hideable", "fc1_recompute+offload", "plan@checkpoint",
                 "plan@save_on_cpu", "offload_all"):
        r = rows[name]
        assert r["status"] == "ok", (name, r["note"])
        assert r["bitwise_equal"] is True, name
        plan = r["plan"]
        assert set(plan) >= {"choices", "offloaded_layers", "prefetch_layers", "predicted_s",
                             "predicted_bytes", "predicted_peak_bytes", "budget_bytes"}
        assert len(plan["choices"]) == 4
        assert r["step_over_predicted"] == pytest.approx(r["step_s"] / plan["predicted_s"])
        assert r["peak_minus_predicted_bytes"] == r["peak_step_bytes"] - plan["predicted_peak_bytes"]
        assert r["offloaded_layers"] == plan["offloaded_layers"]
        assert (r["d2h_bytes"] > 0) == (plan["offloaded_layers"] > 0)
        assert f"plan: {' '.join(plan['choices'])}, prefetch {plan['prefetch_layers']}" in out
    assert rows["offload_all"]["plan"]["choices"] == ["none/o3"] * 4
    for peer, peak in peer_peak.items():
        assert rows[f"plan@{peer}"]["plan"]["budget_bytes"] == peak
        assert rows[f"plan@{peer}"]["plan"]["predicted_peak_bytes"] <= peak
        half = rows[f"plan@half-{peer}"]
        assert half["status"] == "ok", half["note"]
        if half.get("requested_budget_bytes") is None:
            assert half["plan"]["budget_bytes"] == peak // 2
            assert half["plan"]["predicted_peak_bytes"] <= peak // 2
        else:  # below the least peak any plan reaches: that least peak ran, and the row says so
            assert half["requested_budget_bytes"] == peak // 2
            assert half["plan"]["predicted_peak_bytes"] > peak // 2
            assert "below the least peak any plan reaches" in half["note"]
    # On fused/fc1 only offload is planned (every layer already recomputes fc1).
    fc1 = rows["fc1_recompute+offload"]["plan"]
    assert all(c.startswith("none/") for c in fc1["choices"]) and fc1["offloaded_layers"] >= 1
    # Every planned row takes part in the checks (it is "ours" with bitwise grads).
    dom = report["checks"]["engine_vs_engine"]["dominance"]
    named = {c for d in dom for c in d["a_configs"] + d["b_configs"]}
    listed = [r for r in report["rows"] if r.get("plan")]
    assert listed and all(r["owner"] == "ours" for r in listed)
    assert all(d["a_status"] in ("PASS", "FAIL", "IMPOSSIBLE") for d in dom)
    assert named <= {f"{r['stack']}:{r['strategy']}" for r in report["rows"] if r["owner"] == "ours"}


def test_planned_budgets_come_from_both_stacks(tmp_path):
    path = tmp_path / "p.json"
    assert main(["bench", "--device", "cpu", "--stack", "both", "-L", "2", "-T", "64", "-H", "32",
                 "-F", "32", "-E", "2", "--iters", "1", "--warmup", "0", "--recipe", "none",
                 "--strategies", "plan@checkpoint,plan@half-checkpoint", "--json", str(path),
                 "--no-progress"]) == 0
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert [r["strategy"] for r in rows[-2:]] == ["plan@checkpoint", "plan@half-checkpoint"]
    ckpt = min(r["peak_step_bytes"] for r in rows if r["strategy"] == "checkpoint")
    by = {r["strategy"]: r for r in rows}
    assert by["plan@checkpoint"]["plan"]["budget_bytes"] == ckpt
    assert by["plan@checkpoint"]["bitwise_equal"] is True
    # It is one of "our" points of the system comparison (whether it passes depends on timing).
    from moe_offload.bench.checks import _points
    ours = _points(rows, "ours", "_vs_unfused", base_stack="fused", label_stack=True)
    want = {f"fused:{n}" for n in ("plan@checkpoint", "plan@half-checkpoint") if by[n]["status"] == "ok"}
    assert "fused:plan@checkpoint" in want and want <= {p.name for p in ours}
