"""What a run prints and writes: the environment, one table for every workload, the plans,
the checks, and the JSON report (``--json PATH``).  Plain string formatting, no dependency.

The JSON report's top-level keys:

- ``schema``: ``"moe_offload.bench/3"`` (3: one runner for every workload: the slice's rows carry the
  same keys as the stacks', ``checks`` holds the slice's ``targets``).
- ``config``: the run's :class:`~moe_offload.bench.config.BenchConfig` (``tokens``,
  ``hidden``, ``ffn``, ``experts``, ``layers``, ``dtype``, ``device``, ``preset``,
  ``recipe``, ``stack``, ``model``, ``splits``, ``strategies``, ``iters``, ``warmup``, ...).
- ``env``: ``torch``, ``python``, ``device`` (name), ``cuda`` (version or null), ``date``
  (UTC ISO 8601) and ``bandwidth`` = ``{"bytes", "d2h_Bps", "h2d_Bps", "kind"}`` (median of
  a pinned copy each way; a host memcpy on the CPU).
- ``rows``: one object per (stack, strategy) pair, in run order:

  - identity: ``stack`` (the workload: ``fused``, ``fused/fc1``, ``fused/<recipe>``,
    ``unfused``, ``moe``, or ``qwen3`` for the slice), ``base_stack``, ``strategy``, ``family``, ``owner`` (``baseline``, ``peer``,
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
  - ``bitwise_equal``: every compared gradient (a stack's input first) ``torch.equal`` to
    the reference's check step (null: no reference, e.g. a recipe against bf16, or no check
    step ran); ``check_mode`` (``strict`` or ``math``), ``grad_max_rel_error`` when not
    equal; ``requested_budget_bytes`` when a plan's budget was below the least peak;
  - ``output_bytes``: bytes of the stack output (the floor of every act figure: it stays
    on the GPU for the loss); ``prefetch_layers``: the engine's prefetch depth (null: no
    engine);
  - ``plan``: null, or for every row of ours the general planner's plan it ran
    (:mod:`moe_offload.bench.strategies`): ``choices`` (per layer
    ``"<recompute>/o<offload level>"``, :class:`moe_offload.plan.Choice`),
    ``offloaded_layers`` (the engine's layer count: one past the last layer that offloads),
    ``prefetch_layers``, ``predicted_s``, ``predicted_fwd_s``, ``predicted_bytes``
    (memory after forward), ``predicted_peak_bytes`` (the step's peak above its start,
    what ``budget_bytes`` bounds), ``peak_moment``, ``budget_bytes`` (null: no budget),
    ``head``, ``math_changing`` and ``describe`` (:meth:`~moe_offload.plan.MemoryPlan.describe`);
    ``step_over_predicted`` (measured / predicted step), ``act_minus_predicted_bytes`` and
    ``peak_minus_predicted_bytes`` (``peak_step_bytes`` minus the predicted peak).
- ``published``: the peers' published figures (not measured):
  ``[{"name", "time_x", "act_x", "baseline": "unfused none"}]``.
- ``planner``: per workload (and model state) whose figures the planner measured, its
  calibration and a summary of the figures.
- ``checks``: on the slice ``{"targets": [{"target", "status", "detail"}]}``; on the stacks
  :func:`moe_offload.bench.checks.comparisons` -- ``engine_vs_engine``,
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

__all__ = ["SCHEMA", "TOP_LEVEL_KEYS", "ROW_KEYS", "build_report", "write_json", "format_env",
           "format_table", "format_plan", "format_checks", "format_targets", "format_check_note",
           "calibration_text", "format_plans", "format_report"]

SCHEMA = "moe_offload.bench/3"
TOP_LEVEL_KEYS = ("schema", "config", "env", "rows", "published", "checks", "traces", "planner")
# Keys every "ok" row carries.
ROW_KEYS = ("stack", "base_stack", "strategy", "family", "owner", "description", "reference",
            "status", "note", "fwd_s", "bwd_s", "step_s", "act_bytes", "peak_bytes", "base_bytes",
            "peak_step_bytes", "d2h_bytes", "h2d_bytes", "d2h_GBps", "h2d_GBps", "time_x", "act_x",
            "peak_x", "time_x_vs_unfused", "act_x_vs_unfused", "lb_s", "step_over_lb", "bitwise_equal",
            "output_bytes", "prefetch_layers", "plan", "step_over_predicted", "act_minus_predicted_bytes")
MiB = float(1 << 20)


# ------------------------------------------------------------------ JSON
def build_report(result: dict, checks: dict) -> dict:
    """The JSON document (see the module docstring) from a run result and its checks."""
    return {"schema": SCHEMA, "config": result["config"], "env": result["env"], "rows": result["rows"],
            "published": [{"name": p.name, "time_x": p.time_x, "act_x": p.act_x,
                           "baseline": "unfused none"} for p in PUBLISHED],
            "checks": checks, "traces": result["traces"], "planner": result.get("planner", {})}


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


# ------------------------------------------------------------------ text
def _f(v, fmt: str, missing: str = "-") -> str:
    return missing if v is None else format(v, fmt)


def format_env(env: dict, cfg: dict) -> str:
    """Two lines: the environment and the problem (and a third on the CPU)."""
    bw = env["bandwidth"]
    note = ("" if env.get("cuda") else
            "\nnote: CPU run, our engine in emulate mode: the figures show that every strategy runs "
            "end to end with bitwise gradients; speed and memory targets need a CUDA GPU")
    if cfg.get("model") == "qwen3":
        problem = (f"model qwen3 (Hugging Face Qwen3-MoE from a config, random weights): "
                   f"seq={cfg['seq']} layers={cfg.get('layers_explicit') or 'default'} {cfg['dtype']} "
                   f"iters={cfg['iters']} warmup={cfg['warmup']}")
    else:
        problem = (f"model {cfg['model']} preset {cfg['preset']}: T={cfg['tokens']} H={cfg['hidden']} "
                   f"F={cfg['ffn']} E={cfg['experts']} L={cfg['layers']} {cfg['dtype']} "
                   f"splits={cfg['splits']} recipe={cfg['recipe']} iters={cfg['iters']} warmup={cfg['warmup']}")
    return (f"torch {env['torch']} | {env['device']} | {env['date']} | "
            f"{bw['kind']}: D2H {bw['d2h_Bps'] / 1e9:.1f} GB/s, H2D {bw['h2d_Bps'] / 1e9:.1f} GB/s\n"
            + problem + note)


COLUMNS = (("stack", 14, "<"), ("strategy", 22, "<"), ("owner", 8, "<"), ("step ms", 9, ">"),
           ("time x", 7, ">"), ("act MiB", 9, ">"), ("act x", 6, ">"), ("PEAK MiB", 9, ">"),
           ("peak x", 6, ">"), ("vs unf t/a", 12, ">"), ("D2H MB", 8, ">"), ("H2D MB", 8, ">"),
           ("GB/s d/h", 11, ">"), ("step/LB", 7, ">"), ("bitwise", 7, ">"))


def _line(cells) -> str:
    return " ".join(format(str(c), f"{a}{w}") for c, (_, w, a) in zip(cells, COLUMNS)).rstrip()


def format_table(rows: list, published: bool = True) -> str:
    """One line per row (skipped/failed rows show their note), a plan line under each plan
    row; ``published``: the peers' published figures below (the stacks' comparison)."""
    out = [_line([c[0] for c in COLUMNS]), "-" * (sum(c[1] + 1 for c in COLUMNS) - 1)]
    for r in rows:
        head = [r["stack"], r["strategy"], r["owner"]]
        if r["status"] != "ok":
            out.append(_line(head) + f"  [{r['status']}] {r['note']}")
            continue
        bit = {True: "yes", False: "NO", None: "n/a"}[r.get("bitwise_equal")]
        if r.get("bitwise_equal") is False and (r.get("plan") or {}).get("math_changing"):
            bit = "math"
        vs_unf = "-" if r.get("time_x_vs_unfused") is None else \
            f"{r['time_x_vs_unfused']:.2f}/{_f(r.get('act_x_vs_unfused'), '.2f')}"
        rates = "-" if not r["d2h_bytes"] else \
            f"{_f(r.get('d2h_GBps'), '.1f')}/{_f(r.get('h2d_GBps'), '.1f')}"
        out.append(_line(head + [
            f"{r['step_s'] * 1e3:.2f}", _f(r.get("time_x"), ".2f"), f"{r['act_bytes'] / MiB:.1f}",
            _f(r.get("act_x"), ".3f"), f"{r['peak_step_bytes'] / MiB:.1f}", _f(r.get("peak_x"), ".3f"),
            vs_unf, f"{r['d2h_bytes'] / 1e6:.1f}", f"{r['h2d_bytes'] / 1e6:.1f}", rates,
            _f(r.get("step_over_lb"), ".2f"), bit]))
        if r.get("plan"):
            out.append(format_plan(r))
        if r.get("note"):
            out.append(f"{'':>16}note: {r['note']}")
    if published:
        out += ["", "published, not measured (ANCHORS.md, H100, relative to the unfused none):"]
        out += [f"  {p.name:<44} time x {p.time_x:5.2f}  act x {p.act_x:.3f}" for p in PUBLISHED]
    return "\n".join(out)


def format_plan(r: dict) -> str:
    """The indented plan line under a row of ours: the per-layer choices
    (``recompute/o<level>``), prefetch, the peak budget, and the predicted against the
    measured step time and peak (and a math-changing head's measured error)."""
    p = r["plan"]
    pk = p.get("predicted_peak_bytes") or 0
    budget = "" if p.get("budget_bytes") is None else f"; peak budget {p['budget_bytes'] / MiB:.1f} MiB"
    return (f"{'':>16}plan: {' '.join(p['choices'])}, prefetch {p['prefetch_layers']}{budget}; "
            f"predicted {p['predicted_s'] * 1e3:.2f} ms / peak {pk / MiB:.1f} MiB"
            + (f" ({p['peak_moment']})" if p.get("peak_moment") else "")
            + f", measured {r['step_s'] * 1e3:.2f} ms / peak {r['peak_step_bytes'] / MiB:.1f} MiB "
            f"(x{_f(r.get('step_over_predicted'), '.2f')} / x{r['peak_step_bytes'] / max(pk, 1):.3f})"
            + (f"; math-changing head {p.get('head')}: max rel grad error "
               f"{_f(r.get('grad_max_rel_error'), '.1e')}" if p.get("math_changing") else ""))


def _fmt_dominance(items: list) -> list:
    out = []
    for d in items:
        out.append(f"  vs {d['peer']} (time x {d['peer_time_x']:.2f}, act x {d['peer_act_x']:.3f}):")
        for key, text in (("a", "(a) act <= peer and time <= peer/1.15:"),
                          ("b", "(b) time <= peer and act <= 0.5 peer:  ")):
            status = d.get(f"{key}_status") or ("PASS" if d[f"{key}_pass"] else "FAIL")
            tail = ", ".join(d[f"{key}_configs"]) or d.get(f"{key}_why", "")
            out.append(f"    {text} {status}" + (f"  {tail}" if tail else ""))
    return out


def format_checks(checks: dict) -> str:
    """PASS/FAIL lines of every comparison of the stacks."""
    out = ["Pareto / dominance checks"]
    titles = {"engine_vs_engine": "engine vs engine (all on our fused stack)",
              "system_vs_system": "system vs system (peers on the unfused stack, ours on fused)",
              "engine_vs_engine_peak": "engine vs engine by step peak (peak x for act x)",
              "published": "ours vs the peers' published figures (not measured)"}
    for key, title in titles.items():
        if key not in checks:
            out.append(f"{title}: not run")
            continue
        c = checks[key]
        out.append(f"{title}; baseline {c['baseline']}")
        out += _fmt_dominance(c["dominance"])
        if "hideable" in c:
            h = c["hideable"]
            out.append(f"  hideable (<= {h['time_tol']:.2f}x time, >= {h['act_cut']:.0%} act cut): "
                       f"{'PASS' if h['pass'] else 'FAIL'}" + (f"  {', '.join(h['configs'])}" if h["configs"] else ""))
    lb = checks.get("lower_bound")
    if lb is not None:
        cfgs = ", ".join(f"{k} {_f(v, '.2f')}" for k, v in lb["configs"].items()) or "none run"
        out.append(f"full offload within {lb['tol']:.2f}x of the transfer lower bound: "
                   f"{'PASS' if lb['pass'] else 'FAIL'}  ({cfgs})")
    return "\n".join(out)


def format_targets(checks: list) -> str:
    """One line per target of the slice."""
    return "\n".join(["targets (issues 11 and 16)"] + [f"  {c['status']:<5} {c['target']}: {c['detail']}"
                                                        for c in checks])


def format_check_note(rows: list) -> str:
    """How the bitwise column was obtained, and which check mode each row needed."""
    modes = {}
    for r in rows:
        if r.get("check_mode"):
            modes.setdefault(r["check_mode"], []).append(r["strategy"])
    used = "; ".join(f"{m}: {len(v)} rows" + ("" if m == "strict" else f" ({', '.join(v)})")
                     for m, v in modes.items())
    return ("bitwise: one check step per row vs its workload's step with nothing installed (plans on "
            "a Hugging Face model: on our experts), seeded, under strict "
            "torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8, SDPA flash "
            "(deterministic backward) or math, integer histc exempted; fallback when strict raises: "
            "math SDPA, warn-only [" + (used or "no check ran") + "]")


def calibration_text(f) -> str:
    """The planner's measured recompute costs (whole model, per option: pooled median step
    minus no plan's) and offload probes, one line each."""
    rec = f.calibration.get("recompute", {})
    lines = ["planner calibration (step ms on all layers; extra = pooled median - no plan's):"]
    for opt, v in rec.items():
        extra = "" if "extra_total_s" not in v else (
            f", extra {v['extra_total_s'] * 1e3:.2f} ms (first pass {v['before_total_s'] * 1e3:.2f})")
        lines.append(f"  {opt:<14} probe {v['probe_s'] * 1e3:.2f}, pooled {v['pooled_s'] * 1e3:.2f} "
                     f"over {v['samples']} steps{extra}")
    if not rec:
        lines.append("  recompute: not probed (CPU or calibrate off): " + ", ".join(
            f"{o} {sum(lf.extra_s.get(o, 0.0) for lf in f.layers) * 1e3:.2f}"
            for o in f.layers[0].options if o != "none"))
    for name in ("attention", "block"):
        v = f.calibration.get(name)
        if v:
            lines.append(f"  offload probe {name}: measured {v['step_s'] * 1e3:.2f}, schedule "
                         f"{v.get('predicted_s', 0.0) * 1e3:.2f}")
    return "\n".join(lines)


def format_plans(result: dict) -> str:
    """The planner's calibration per measured workload, then each plan row's per-layer table
    (:meth:`~moe_offload.plan.MemoryPlan.describe`)."""
    out = [v["calibration_text"] for v in result.get("planner", {}).values()]
    out += [f"{r['strategy']}:\n{r['plan']['describe']}" for r in result["rows"]
            if r["status"] == "ok" and r.get("plan")]
    return "\n\n".join(out)


def format_report(result: dict, checks: dict) -> str:
    """Everything a run prints: environment, table, then the slice's check note, plans and
    targets, or the stacks' dominance checks."""
    slice_run = "targets" in checks
    parts = [format_env(result["env"], result["config"]), format_table(result["rows"], not slice_run)]
    if slice_run:
        parts += [format_check_note(result["rows"]), format_plans(result), format_targets(checks["targets"])]
    else:
        parts.append(format_checks(checks))
    return "\n".join(p for p in parts if p)
