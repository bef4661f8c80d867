"""The full-model main job (--model full) on CPU: the length arithmetic, the strategy
registry, the targets and report, and a tiny end-to-end run."""
import json

import pytest
import torch

from moe_offload.__main__ import main
from moe_offload.bench.config import build_parser, config_from_args
from moe_offload.bench.full_model import FULL_ORDER, QWEN3_FULL, format_full_report, full_strategies, full_targets
from moe_offload.bench.full_steps import (Deadline, attention_c2, fmt_bytes, layers_that_fit,
                                          longest_fitting, peak_line, predict_time, time_model,
                                          weight_bytes)
from moe_offload.bench.full_ours import bisect_longest, math_changing

GiB = 1 << 30


pytestmark = pytest.mark.usefixtures("one_thread")


def test_weights_of_qwen3_30b_a3b_and_the_layers_that_fit():
    per_layer, outside = weight_bytes(QWEN3_FULL)
    params = (48 * per_layer + outside) / 2
    assert 30.3e9 < params < 30.7e9                       # "about 30.5 B parameters"
    assert outside == 2 * 151936 * 2048 * 2 + 2048 * 2     # untied embedding + head + norm
    n, note = layers_that_fit(QWEN3_FULL, 150_000_000_000)  # an H200: 61 GB < half
    assert n == 48 and "all 48 layers" in note
    n, note = layers_that_fit(QWEN3_FULL, 85_000_000_000)   # an H100 80 GB
    assert n == int((0.5 * 85e9 - outside) // per_layer) == 33
    assert "33 of 48 layers" in note and "do not fit" in note
    assert layers_that_fit(QWEN3_FULL, 10**9)[0] == 1


def test_peak_line_and_longest_fitting_length():
    a, b = peak_line([(4096, 10 * GiB + 4096 * 1000), (8192, 10 * GiB + 8192 * 1000)])
    assert a == pytest.approx(10 * GiB) and b == pytest.approx(1000)
    assert peak_line([(100, 500)]) == (0.0, 5.0)
    with pytest.raises(ValueError):
        peak_line([])
    # room for (avail - a) / b = 40000 tokens -> 36864 (9 units of 4096)
    assert longest_fitting(10 * GiB, 1000, 10 * GiB + 40_000_000, 4096, 131072) == 36864
    assert longest_fitting(10 * GiB, 1000, 10 * GiB + 4096 * 1000, 4096, 131072) == 4096   # exact edge
    assert longest_fitting(10 * GiB, 1000, 10 * GiB + 4095 * 1000, 4096, 131072) == 0      # not even one
    assert longest_fitting(0, 1, 10**12, 4096, 98304) == 98304                              # the cap
    assert longest_fitting(5, 0, 10, 4096, 8192) == 8192 and longest_fitting(20, 0, 10, 4096, 8192) == 0
    with pytest.raises(ValueError):
        longest_fitting(0, 1, 10, 4096, 2048)


def test_time_model_is_quadratic_with_an_attention_floor():
    c1, c2 = 1e-4, 2e-9
    pts = [(t, c1 * t + c2 * t * t) for t in (4096, 8192)]
    got = time_model(pts)
    assert got == pytest.approx((c1, c2))
    assert predict_time(got, 65536) == pytest.approx(c1 * 65536 + c2 * 65536 ** 2)
    assert time_model([(4096, 1.0), (8192, 1.5)])[1] == 0.0      # sublinear noise: clamped
    assert time_model([(4096, 1.0)]) == (1.0 / 4096, 0.0)
    c = attention_c2(QWEN3_FULL, 48)
    assert c == pytest.approx(48 * 4.5 * 2 * 4096 / 4e14)
    assert 60 < predict_time((0.0, c), 131072) < 90               # ~76 s of attention at 128k


def test_deadline_with_a_fake_clock():
    now = [100.0]
    d = Deadline(60, margin_s=10, clock=lambda: now[0])
    assert d.left() == 60 and d.allows(50) and not d.allows(51)
    now[0] = 150.0
    assert d.left() == 10 and not d.allows(1)


def test_bisect_longest_finds_the_edge_in_log_steps():
    for edge in range(0, 33):
        calls = []

        def fits(k):
            calls.append(k)
            return k <= edge
        assert bisect_longest(fits, 32) == min(edge, 32)
        assert len(calls) <= 7
    assert bisect_longest(lambda k: True, 0) == 0


def test_math_changing_options_are_named():
    class P:
        def __init__(self, choices, text=""):
            self.choices, self.text = choices, text

        def describe(self):
            return self.text
    assert math_changing(P(["layer:none", "head:chunked"])) == ["head:chunked"]
    assert math_changing(P(["layer:none"], "loss checkpointed")) == []
    assert math_changing(P([], "head: chunked loss")) == ["chunked loss (describe)"]


def test_run_order_comes_from_the_one_registry():
    names = [s.name for s in full_strategies()]
    assert names[:2] == ["checkpoint", "ours"]        # the reference length first, then ours
    assert names[-1] == "save_on_cpu+ckpt" and set(names) == set(FULL_ORDER)


def _row(name, longest, tps=None, ref_tps=None, capped=False, **kw):
    r = {"strategy": name, "owner": "ours" if name == "ours" else "peer", "status": "ok", "note": "",
         "longest": longest, "longest_capped": capped, "tokens_per_s": tps, "predicted_longest": longest,
         "peak_bytes": 50 * GiB, "predicted_peak_bytes": 49 * GiB, "next_predicted_peak_bytes": 60 * GiB,
         "avail_bytes": 55 * GiB, "bitwise_equal": None,
         "at_ref": None if ref_tps is None else {"tokens": 36864, "tokens_per_s": ref_tps, "ok": True}}
    r.update(kw)
    return r


def test_targets_pass_fail_and_not_applicable():
    ck = _row("checkpoint", 36864, 3000, 3000)
    us = _row("ours", 98304, 2500, 4000, capped=True, bitwise_equal=True, bitwise_detail="ok",
              plans=[{"tokens": 98304, "peak_bytes": 100, "predicted_peak_bytes": 97},
                     {"tokens": 36864, "peak_bytes": 100, "predicted_peak_bytes": 90}])
    got = {c["target"]: c for c in full_targets([ck, us])}
    assert [c["status"] for c in got.values()] == ["PASS", "PASS", "FAIL", "PASS"]
    assert "2.67x" in got["our longest sequence >= 2x HF checkpointing's"]["detail"]
    assert "+11.1%" in got["predicted peak within 5% of measured (our plan rows)"]["detail"]
    us.update(bitwise_equal=False, math_changing=["head:chunked"], at_ref={"tokens": 36864,
              "tokens_per_s": 3300, "ok": True}, longest=65536, longest_capped=False)
    got = [c["status"] for c in full_targets([ck, us])]
    assert got == ["FAIL", "FAIL", "FAIL", "PASS"]      # a labelled math change is not a failure
    us["math_changing"] = []
    assert full_targets([ck, us])[3]["status"] == "FAIL"
    ck["longest_capped"] = True
    assert full_targets([ck, us])[0]["status"] == "n/a"
    assert [c["status"] for c in full_targets([ck])] == ["n/a"] * 4


def test_report_formatting():
    rows = [_row("checkpoint", 36864, 3000, 3000),
            _row("ours", 98304, 2500, 4000, capped=True, timing="cold (first step)"),
            dict(_row("none", 0), longest=0),
            {"strategy": "liger+ckpt", "owner": "peer", "status": "skipped", "note": "liger_kernel does not import"}]
    result = {"setup": {"layer_note": "all 48 layers", "train_note": "peft LoRA", "trainable_params": 6e6,
                        "weight_bytes": 61e9, "device_bytes": 150e9, "reserve_bytes": 4.5e9, "unit": 4096,
                        "cap": 98304, "time_budget_s": 540, "elapsed_s": 500, "ref_tokens": 36864},
              "rows": rows, "ours": {"text": "ours: fit's budget"}}
    text = format_full_report(result)
    assert "all 48 layers" in text and "cap 98304" in text
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0] in
            ("checkpoint", "ours", "none", "liger+ckpt")}
    assert "36864" in line["checkpoint"] and "1.00" in line["checkpoint"]
    assert ">= 98304" in line["ours"] and "1.33" in line["ours"]      # 4000 / 3000 tokens/s
    assert "2500*" in line["ours"] and "3000*" not in line["checkpoint"]   # a cold single step is marked
    assert "none fits" in line["none"] and "[skipped] liger_kernel" in line["liger+ckpt"]
    assert "targets (issue 16, full depth)" in text and "ours: fit's budget" in text
    assert fmt_bytes(3 * GiB) == "3.00 GiB" and fmt_bytes(1 << 20) == "1.00 MiB" and fmt_bytes(None) == "-"


def _cfg(argv):
    parser = build_parser()
    args = parser.parse_args(["bench", *argv])
    return config_from_args(args, parser.subcommand_parsers["bench"], known_strategies=["none"])


def test_full_model_flags():
    assert _cfg(["--device", "cpu"]).model == "qwen3"                     # CPU default: the tiny slice
    assert _cfg(["--device", "cpu", "--model", "slice"]).model == "qwen3"
    cfg = _cfg(["--device", "cpu", "--model", "full"])
    assert (cfg.model, cfg.unit, cfg.cap, cfg.cap_explicit) == ("full", 32, 256, False)
    cfg = _cfg(["--device", "cpu", "--model", "full", "--unit", "8", "--cap", "64", "--time-budget", "30"])
    assert (cfg.unit, cfg.cap, cfg.cap_explicit, cfg.time_budget) == (8, 64, True, 30.0)
    for bad in (["--model", "full", "--unit", "8", "--cap", "12"], ["--model", "slice", "--cap", "64"],
                ["--model", "full", "--time-budget", "0"]):
        with pytest.raises(SystemExit):
            _cfg(["--device", "cpu", *bad])


def test_tiny_full_run_end_to_end(tmp_path, capsys):
    path = tmp_path / "full.json"
    rc = main(["bench", "--model", "full", "--device", "cpu", "--strategies", "none", "-L", "1",
               "--unit", "8", "--cap", "32", "--device-memory-mib", "2", "--json", str(path),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "targets (issue 16, full depth)" in out and "CPU: an emulated device" in out
    report = json.loads(path.read_text())
    assert report["schema"] == "moe_offload.full/1" and report["setup"]["layers"] == 1
    rows = {r["strategy"]: r for r in report["rows"]}
    assert set(rows) == {"checkpoint", "none"}           # checkpoint always runs: the reference
    for r in rows.values():
        assert r["status"] == "ok", r["note"]
        assert r["longest"] and r["longest"] % 8 == 0 and r["longest"] <= 32
        assert [p["tokens"] for p in r["probes"]] == [8, 16] and r["predicted_longest"] is not None
        assert r["at_ref"]["tokens"] == rows["checkpoint"]["longest"] or r["at_ref"]["ok"] is False
    assert report["setup"]["ref_tokens"] == rows["checkpoint"]["longest"]


def test_tiny_full_run_of_ours_through_fit(tmp_path):
    """Our row end to end on the CPU: fit at 2 units, its scaled prediction, the steps, the
    bitwise check (memory figures are the profiler's here, so only the plumbing is checked)."""
    path = tmp_path / "ours.json"
    rc = main(["bench", "--model", "full", "--device", "cpu", "--strategies", "ours", "-L", "1",
               "--unit", "8", "--cap", "16", "--device-memory-mib", "8", "--json", str(path),
               "--no-progress"])
    assert rc == 0
    report = json.loads(path.read_text())
    ours = {r["strategy"]: r for r in report["rows"]}["ours"]
    assert ours["status"] == "ok", ours["note"]
    assert ours["predicted_longest"] == 16 and ours["longest"] == 16 and ours["longest_capped"]
    assert ours["plans"] and all(p["predicted_peak_bytes"] > 0 for p in ours["plans"])
    assert ours["at_ref"]["tokens"] == 16 and ours["at_ref"]["ok"]
    detail = ours.get("bitwise_detail") or ""
    if "head chunked" in detail:       # the one math-changing option: close, and labelled
        assert ours["bitwise_equal"] is False and "max |diff| / max |grad|" in detail
    else:
        assert ours["bitwise_equal"] is True, detail
    assert "activation peak budget" in report["ours"]["budget"]


def test_the_liger_row_loss_is_hf_loss_from_the_hidden_states():
    """hidden_state_loss (the liger+ckpt row's loss, Liger's kernel replaced by the plain
    linear + cross-entropy it fuses) equals the model's own loss, aux loss included."""
    from moe_offload.bench.full_model import QWEN3_FULL_TINY
    from moe_offload.bench.strategies import hidden_state_loss
    from moe_offload.bench.workloads import build_qwen3
    model, ids = build_qwen3(QWEN3_FULL_TINY, 24, "cpu", torch.float32, 0, layers=2)

    def linear_ce(w, h, target):
        return torch.nn.functional.cross_entropy(h @ w.t(), target)
    got = hidden_state_loss(model, ids, linear_ce)
    ref = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(got, ref, rtol=1e-5, atol=0)             # fp32: same math, other op order
    out = model(input_ids=ids, labels=ids)
    coef = model.config.router_aux_loss_coef
    assert out.aux_loss is not None and float(coef * out.aux_loss) > 1e-4 * float(ref)   # not negligible
    assert not torch.allclose(got - coef * out.aux_loss, ref, rtol=1e-5, atol=0)          # and counted
