"""Benchmark: step time against activation memory, ours vs the peers, in one run.

Run it as ``python -m moe_offload [bench]`` (see ``--help``).  Modules, in reading order:

- :mod:`~moe_offload.bench.config`: presets, flags, validation;
- :mod:`~moe_offload.bench.models`: the fused / unfused / MoE stacks;
- :mod:`~moe_offload.bench.strategies`: the strategies as data, their runners (ours: plans
  of :mod:`moe_offload.plan`);
- :mod:`~moe_offload.bench.measure`: a row's timing, memory and grads (on
  :mod:`moe_offload.plan.measure`);
- :mod:`~moe_offload.bench.run`: runs every (stack, strategy) pair, derives ratios;
- :mod:`~moe_offload.bench.checks`: Pareto/dominance checks (pure functions);
- :mod:`~moe_offload.bench.table`, :mod:`~moe_offload.bench.report_json`,
  :mod:`~moe_offload.bench.plot`: terminal table, JSON (keys documented there), PNG;
- :mod:`~moe_offload.bench.cli`, :mod:`~moe_offload.bench.demo`: the subcommands.
"""
from .checks import Point, comparisons, dominance_check, hideable_check, lower_bound_check
from .config import PRESETS, BenchConfig
from .run import run_bench
from .strategies import Strategy, strategy_list

__all__ = ["BenchConfig", "PRESETS", "run_bench", "Strategy", "strategy_list", "Point",
           "dominance_check", "hideable_check", "lower_bound_check", "comparisons"]
