"""``python -m moe_offload bench``: run, print the report, write JSON and plot."""
from __future__ import annotations

import argparse
import sys

from .checks import run_checks
from .config import BenchConfig, config_from_args
from .plot import write_plot
from .report import build_report, format_report, write_json
from .run import run_bench
from .strategies import strategy_names

__all__ = ["bench_main", "run_and_report", "run_and_report_full"]


def _write_files(report: dict, cfg: BenchConfig, out) -> None:
    """``--json`` and ``--plot`` (a failed plot is reported, not raised: the figures are
    printed and saved already)."""
    if cfg.json_path:
        write_json(report, cfg.json_path)
        print(f"wrote {cfg.json_path}", file=out)
    if cfg.plot_path:
        try:
            hint = write_plot(report, cfg.plot_path)
        except Exception as e:
            hint = f"plot failed: {type(e).__name__}: {e}"
        print(hint if hint else f"wrote {cfg.plot_path}", file=out)


def run_and_report(cfg: BenchConfig, out=None) -> dict:
    """Run ``cfg``, print the report to ``out`` (stdout), write JSON/plot; return the report.
    ``--model full`` is the full-depth run (:func:`run_and_report_full`)."""
    out = out or sys.stdout
    if cfg.model == "full":
        return run_and_report_full(cfg, out)
    result = run_bench(cfg)
    checks = run_checks(result["rows"], cfg.model)
    report = build_report(result, checks)
    print(format_report(result, checks), file=out)
    _write_files(report, cfg, out)
    return report


def run_and_report_full(cfg: BenchConfig, out=None) -> dict:
    """The full-depth run (``--model full``): each strategy's longest sequence and tokens/s,
    ours through ``moe_offload.fit``; table, targets, JSON (no plot)."""
    import os
    from .full_model import full_targets, format_full_report, run_full
    from .run import environment
    out = out or sys.stdout
    if cfg.is_cuda:   # deterministic cuBLAS for the bitwise check step: set before cuBLAS starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env = environment(cfg)

    def build(result: dict) -> dict:
        return {"schema": "moe_offload.full/1", "config": cfg.to_dict(), "env": env,
                "setup": result["setup"], "rows": result["rows"],
                "ours": {k: v for k, v in (result["ours"] or {}).items() if k != "text"},
                "targets": full_targets(result["rows"])}

    def partial(result: dict) -> None:       # after every row: a run cut short keeps its rows
        if cfg.json_path:
            write_json(build(result), cfg.json_path)
    result = run_full(cfg, on_row=partial)
    report = build(result)
    print(f"torch {env['torch']} | {env['device']} | {env['date']} | D2H "
          f"{env['bandwidth']['d2h_Bps'] / 1e9:.1f} GB/s, H2D {env['bandwidth']['h2d_Bps'] / 1e9:.1f} GB/s",
          file=out)
    print(format_full_report(result), file=out, flush=True)
    if cfg.json_path:
        write_json(report, cfg.json_path)
        print(f"wrote {cfg.json_path}", file=out)
    if cfg.plot_path:
        print("--plot: not drawn for --model full (the table and JSON hold the figures)", file=out)
    return report


def bench_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate ``args`` (usage error, exit 2, on bad values) and run the benchmark."""
    recipe = None if args.recipe == "none" else (args.recipe or "fp8")
    cfg = config_from_args(args, parser, known_strategies=strategy_names(recipe))
    run_and_report(cfg)
    return 0
