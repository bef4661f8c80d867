"""The JSON report of ``python -m moe_offload bench --json PATH``.

Top-level keys:

- ``schema``: ``"moe_offload.bench/2"`` (2: ``plan`` is the general planner's).
- ``config``: the run's :class:`~moe_offload.bench.config.BenchConfig` (``tokens``,
  ``hidden``, ``ffn``, ``experts``, ``layers``, ``dtype``, ``device``, ``preset``,
  ``recipe``, ``stack``, ``model``, ``splits``, ``strategies``, ``iters``, ``warmup``, ...).
- ``env``: ``torch``, ``python``, ``device`` (name), ``cuda`` (version or null), ``date``
  (UTC ISO 8601) and ``bandwidth`` = ``{"bytes", "d2h_Bps", "h2d_Bps", "kind"}`` (median of
  a pinned copy each way; a host memcpy on the CPU).
- ``rows``: one object per (stack, strategy) pair, in run order:

  - identity: ``stack`` (``fused``, ``fused/fc1``, ``fused/<recipe>``, ``unfused``,
    ``moe``), ``base_stack``, ``strategy``, ``family``, ``owner`` (``baseline``, ``peer``,
    ``ours``), ``description``, ``reference`` (strategy whose grads must be equal);
  - ``status`` (``ok``, ``skipped``, ``error``) and ``note`` (why);
  - time, seconds (medians): ``fwd_s``, ``bwd_s``, ``step_s``, and ``all_step_s``;
  - memory, bytes: ``act_bytes`` (allocated after forward minus before), ``peak_bytes``
    (CUDA: ``max_memory_allocated`` over the step, weights included), ``base_bytes``
    (allocated at step start, parameter gradients already allocated as zeros),
    ``peak_step_bytes = peak_bytes - base_bytes`` (activations + backward temporaries),
    ``memory_source``;
  - transfers: ``d2h_bytes``, ``h2d_bytes``, ``d2h_GBps`` (over the forward time),
    ``h2d_GBps`` (over the backward time), ``offloaded_layers``, ``engine_stats``;
  - ratios: ``time_x``, ``act_x``, ``peak_x`` (of ``peak_step_bytes``) to ``none`` of the
    same base stack, and
    ``time_x_vs_unfused``, ``act_x_vs_unfused``, ``peak_x_vs_unfused`` (to the unfused
    ``none``; null when it did not run);
  - ``lb_s`` (transfer lower bound, see :mod:`moe_offload.bench.run`), ``step_over_lb``;
  - ``bitwise_equal``: input grad and every parameter grad ``torch.equal`` to the
    reference's (null: no reference, e.g. a recipe against bf16);
  - ``output_bytes``: bytes of the stack output (the floor of every act figure: it stays
    on the GPU for the loss); ``prefetch_layers``: the engine's prefetch depth (null: no
    engine);
  - ``plan``: null, or for every row of ours the general planner's plan it ran
    (:mod:`moe_offload.bench.strategies`): ``choices`` (per layer
    ``"<recompute>/o<offload level>"``, :class:`moe_offload.plan.Choice`),
    ``offloaded_layers`` (the engine's layer count: one past the last layer that offloads),
    ``prefetch_layers``, ``predicted_s``, ``predicted_fwd_s``, ``predicted_bytes``
    (memory after forward), ``predicted_peak_bytes`` (the step's peak above its start,
    what ``budget_bytes`` bounds), ``peak_moment`` and ``budget_bytes`` (null: no budget);
    ``step_over_predicted`` (measured / predicted step), ``act_minus_predicted_bytes`` and
    ``peak_minus_predicted_bytes`` (``peak_step_bytes`` minus the predicted peak).
- ``published``: the peers' published figures (not measured):
  ``[{"name", "time_x", "act_x", "baseline": "unfused none"}]``.
- ``checks``: :func:`moe_offload.bench.checks.comparisons` -- ``engine_vs_engine``,
  ``engine_vs_engine_peak`` (the same on ``peak_x``, ``{"baseline", "dominance"}``),
  ``system_vs_system`` (each ``{"baseline", "dominance": [{"peer", "peer_time_x",
  "peer_act_x", "a_pass", "a_configs", "b_pass", "b_configs", "a_status", "b_status"
  (PASS/FAIL/IMPOSSIBLE), "floor_act_x", and "a_why"/"b_why" when IMPOSSIBLE}],
  "hideable": {"pass",
  "configs", ...}}``), ``published`` (``{"baseline", "note", "dominance"}``) and
  ``lower_bound`` (``{"pass", "configs", "failing", "tol"}``).  A comparison whose rows
  did not run is absent.
- ``traces``: ``{"<stack>:<strategy>": {"t_s": [...], "bytes": [...], "fwd_end_s",
  "source"}}`` for ``none`` and the best offload row (or ``{"error"}``).
"""
from __future__ import annotations

import json
import math

from .checks import PUBLISHED

__all__ = ["SCHEMA", "TOP_LEVEL_KEYS", "ROW_KEYS", "build_report", "write_json"]

SCHEMA = "moe_offload.bench/2"
TOP_LEVEL_KEYS = ("schema", "config", "env", "rows", "published", "checks", "traces")
# Keys every "ok" row carries.
ROW_KEYS = ("stack", "base_stack", "strategy", "family", "owner", "description", "reference",
            "status", "note", "fwd_s", "bwd_s", "step_s", "act_bytes", "peak_bytes", "base_bytes",
            "peak_step_bytes", "d2h_bytes",
            "h2d_bytes", "d2h_GBps", "h2d_GBps", "time_x", "act_x", "peak_x", "time_x_vs_unfused",
            "act_x_vs_unfused", "lb_s", "step_over_lb", "bitwise_equal", "output_bytes",
            "prefetch_layers", "plan", "step_over_predicted", "act_minus_predicted_bytes")


def build_report(result: dict, checks: dict) -> dict:
    """The JSON document (see the module docstring) from a run result and its checks."""
    return {
        "schema": SCHEMA,
        "config": result["config"],
        "env": result["env"],
        "rows": result["rows"],
        "published": [{"name": p.name, "time_x": p.time_x, "act_x": p.act_x,
                       "baseline": "unfused none"} for p in PUBLISHED],
        "checks": checks,
        "traces": result["traces"],
    }


def _clean(obj):
    """NaN/inf -> null so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(report: dict, path: str) -> None:
    """Write ``report`` to ``path`` as strict, indented JSON."""
    with open(path, "w") as f:
        json.dump(_clean(report), f, indent=1, allow_nan=False)
        f.write("\n")
