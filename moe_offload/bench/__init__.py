"""Benchmark: step time, activation memory and step peak, ours vs the peers, in one run.

Run it as ``python -m moe_offload [bench]`` (see ``--help``).  One path, in reading order:

- :mod:`~moe_offload.bench.config`: presets, flags, validation;
- :mod:`~moe_offload.bench.workloads`: what rows run on (synthetic expert stacks, the
  Hugging Face Qwen3-MoE slice), layer classes in :mod:`~moe_offload.bench.models`;
- :mod:`~moe_offload.bench.strategies`: every strategy, peers and ours, in one registry;
- :mod:`~moe_offload.bench.run`: the one row loop (install, measure, check, remove) and
  the derived ratios, with :mod:`~moe_offload.bench.measure` (timing, memory, check steps);
- :mod:`~moe_offload.bench.checks`: the dominance checks (stacks) and targets (slice);
- :mod:`~moe_offload.bench.report`, :mod:`~moe_offload.bench.plot`: the printed report,
  the JSON (keys documented there), the PNG;
- :mod:`~moe_offload.bench.cli`, :mod:`~moe_offload.bench.demo`: the subcommands.

The full-depth main job (``--model full``) installs the same registry's strategies on
the whole model and searches each one's longest sequence:
:mod:`~moe_offload.bench.full_model` (its rows), :mod:`~moe_offload.bench.full_steps`
(the arithmetic and the measured step), :mod:`~moe_offload.bench.full_ours` (ours,
through ``moe_offload.fit``).
"""
from .checks import Point, comparisons, dominance_check, hideable_check, lower_bound_check
from .config import PRESETS, BenchConfig
from .run import run_bench
from .strategies import STRATEGIES, Strategy, strategies_for

__all__ = ["BenchConfig", "PRESETS", "run_bench", "Strategy", "STRATEGIES", "strategies_for", "Point",
           "dominance_check", "hideable_check", "lower_bound_check", "comparisons"]
