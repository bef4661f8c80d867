"""``python -m moe_offload bench``: run, print the table and checks, write JSON and plot."""
from __future__ import annotations

import argparse
import sys

from .checks import comparisons
from .config import BenchConfig, config_from_args
from .plot import write_plot
from .report_json import build_report, write_json
from .run import run_bench
from .strategies import strategy_names
from .table import format_checks, format_env, format_table

__all__ = ["bench_main", "run_and_report"]


def run_and_report(cfg: BenchConfig, out=None) -> dict:
    """Run ``cfg``, print the report to ``out`` (stdout), write JSON/plot; return the report."""
    out = out or sys.stdout
    result = run_bench(cfg)
    checks = comparisons(result["rows"])
    report = build_report(result, checks)
    print(format_env(result["env"], result["config"]), file=out)
    print(format_table(result["rows"]), file=out)
    print(format_checks(checks), file=out)
    if cfg.json_path:
        write_json(report, cfg.json_path)
        print(f"wrote {cfg.json_path}", file=out)
    if cfg.plot_path:
        try:
            hint = write_plot(report, cfg.plot_path)
        except Exception as e:  # the figures are printed and saved already
            hint = f"plot failed: {type(e).__name__}: {e}"
        print(hint if hint else f"wrote {cfg.plot_path}", file=out)
    return report


def bench_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate ``args`` (usage error, exit 2, on bad values) and run the benchmark."""
    recipe = None if args.recipe == "none" else (args.recipe or "fp8")
    cfg = config_from_args(args, parser, known_strategies=strategy_names(recipe))
    run_and_report(cfg)
    return 0
