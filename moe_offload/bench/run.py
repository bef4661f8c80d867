"""The one row loop: every (workload, strategy) pair of a run, measured the same way.

All rows run in one process on the same weights and inputs (stack variants share their
``Parameter`` objects).  Per row (:func:`measure_row`), with the strategy installed:
``warmup`` untimed steps, ``iters`` timed steps (median), one step measuring activation
memory (allocated after the forward minus before) and the step peak (``peak_step_bytes``:
max allocated above the step start, parameter gradients allocated, as
``torch.cuda.max_memory_allocated`` sees it), the bytes moved each way, then one seeded
*check* step under :func:`~moe_offload.bench.measure.deterministic_check` for the
gradients.  Once the strategy is removed, those gradients are compared with a check step
of the row's reference (its workload with nothing installed, in the same check mode and
model state; ``none`` against itself: a kernel that is not deterministic shows as ``none``
failing, not as a false alarm on a plan row).  A strategy that fails or does not apply is
a row with ``status`` ``"error"`` / ``"skipped"`` and a note; the run goes on.

Derived per row (:func:`derive`): ratios to ``none`` of the same base workload
(``time_x``, ``act_x``, ``peak_x``) and to the unfused stack's ``none`` (``*_vs_unfused``),
achieved copy rates, the transfer lower bound ``lb_s = max(fwd_base, d2h/bw_d2h) +
max(bwd_base, h2d/bw_h2d)`` (``base``: the row's variant without offload), and for plans
the measured against the predicted step and peak.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from ..plan.measure import pinned_bandwidth
from .config import BenchConfig
from .measure import (allocate_grads, check_step, first_check_step, grads_bitwise_equal,
                      max_rel_error, measure_memory, time_steps, trace_memory)
from .report import calibration_text
from .strategies import Context, Skip, plan_math_changing, strategies_for
from .workloads import build_workloads

__all__ = ["environment", "plan_runs", "run_bench", "measure_row", "derive", "progress",
           "best_offload_row", "plan_dict"]


def environment(cfg: BenchConfig) -> dict:
    """Torch version, device name, measured copy bandwidth, date."""
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name(device.index) if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "bandwidth": _bandwidth(device, cuda),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _bandwidth(device: torch.device, cuda: bool) -> dict:
    """Copy bandwidth each way: pinned host <-> device (``pinned_bandwidth``, 256 MiB), or on
    the CPU the host memcpy the engine's emulate path does (fastest of 5 copies of 32 MiB)."""
    if cuda:
        d2h, h2d = pinned_bandwidth(device)
        return {"bytes": 256 << 20, "d2h_Bps": d2h, "h2d_Bps": h2d, "kind": "pinned host <-> device"}
    a, b = torch.ones(8 << 20), torch.empty(8 << 20)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return {"bytes": 32 << 20, "d2h_Bps": (32 << 20) / best, "h2d_Bps": (32 << 20) / best,
            "kind": "host memcpy (no device)"}


def progress(items: list, enabled: bool, desc: str = "bench"):
    """Iterate ``items`` with a tqdm bar when tqdm is installed, else plain lines."""
    if not enabled:
        return iter(items)
    try:
        from tqdm import tqdm
    except ImportError:
        def plain():
            for i, item in enumerate(items):
                print(f"[{i + 1}/{len(items)}] {item[0]} {item[1].name}", flush=True)
                yield item
        return plain()
    return tqdm(items, desc=desc, file=sys.stderr)


# ------------------------------------------------------------------ which rows
def _recipe(cfg: BenchConfig) -> Optional[str]:
    return None if cfg.recipe == "none" else cfg.recipe


def _base_row(variant: str, recipe: Optional[str]) -> Optional[str]:
    """The row a stack variant's rows are measured against (its plain step)."""
    return {"": "none", "fc1": "fc1_recompute", "recipe": recipe}[variant]


def plan_runs(cfg: BenchConfig) -> list:
    """``[(workload name, Strategy)]`` in run order.

    ``--strategies`` picks by name, family or owner; ``none``, a variant's base row and what
    a strategy ``needs`` always run (ratios, references and budgets need them).  On the
    stacks, ``--stack both`` runs only the baseline and the peers on the unfused stack
    (system vs system) and everything on the fused one (engine vs engine).  Strategies
    marked ``after_peers`` run last (their budgets are the peers' measured peaks)."""
    recipe = _recipe(cfg)
    rows = strategies_for("hf" if cfg.model == "qwen3" else "stack", recipe)
    chosen = set(cfg.strategies or [s.name for s in rows])
    wanted = {s.name for s in rows if chosen & {s.name, s.family, s.owner}}
    for s in rows:
        if s.name in wanted:
            wanted.update(("none", _base_row(s.variant, recipe), *s.needs))
    if cfg.model == "qwen3":
        bases = ["qwen3"]
    else:
        bases = ["moe"] if cfg.model == "moe" else [b for b in ("fused", "unfused")
                                                    if cfg.stack in (b, "both")]
    out = []
    for base in bases:
        for s in rows:
            if s.name not in wanted or (base != "fused" and s.fused_only) or \
                    (base == "unfused" and cfg.stack == "both" and s.owner == "ours"):
                continue
            name = base if not s.variant else f"{base}/{'fc1' if s.variant == 'fc1' else recipe}"
            out.append((name, s))
    return [p for p in out if not p[1].after_peers] + [p for p in out if p[1].after_peers]


# ------------------------------------------------------------------ one row
def plan_dict(plan) -> dict:
    """A plan's row fields (JSON-able; see :mod:`moe_offload.bench.report`)."""
    p = plan.prediction
    return {"choices": [str(c) for c in plan.choices] + (["loss:ckpt"] if p.loss_checkpoint else []),
            "prefetch_layers": plan.prefetch_layers, "offloaded_layers": p.engine_layers,
            "budget_bytes": plan.budget_bytes, "predicted_s": plan.predicted_step_s,
            "predicted_fwd_s": p.fwd_s, "predicted_bytes": plan.predicted_activation_bytes,
            "predicted_peak_bytes": plan.predicted_peak_bytes, "peak_moment": plan.peak_moment,
            "head": plan.head, "math_changing": plan_math_changing(plan), "describe": plan.describe()}


def measure_row(row: dict, w, inst, step: Callable[[], torch.Tensor], cfg: BenchConfig) -> None:
    """Time, memory and bytes moved of ``step`` (the strategy ``inst`` installed on ``w``)."""
    cuda = w.cuda

    def before():
        w.clear_grads()
        inst.reset()

    def backward(loss):
        loss.backward()

    retries = (lambda: torch.cuda.memory_stats().get("num_alloc_retries", 0)) if cuda else (lambda: 0)
    r0 = retries()
    for _ in range(cfg.warmup):
        before()
        backward(step())
    r1 = retries()
    t = time_steps(step, backward, cfg.iters, cuda, before)
    # Allocator retries (cached blocks freed and cudaMalloc retried: a device-wide sync)
    # during the timed steps: a diagnostic for steps slower than predicted.
    row["alloc_retries"] = {"warmup": int(r1 - r0), "timed": int(retries() - r1)}
    before()
    allocate_grads([p for p in w.params if isinstance(p, nn.Parameter)])   # as after step 1
    gc.collect()
    inst.reset()                          # the bytes moved by the memory step only
    mem = measure_memory(step, backward, cuda, min_act_bytes=w.output_bytes)
    d2h, h2d = inst.moved_bytes()
    row.update(fwd_s=t.fwd_s, bwd_s=t.bwd_s, step_s=t.step_s, all_step_s=t.all_step_s,
               act_bytes=mem.act_bytes, peak_bytes=mem.peak_bytes, base_bytes=mem.base_bytes,
               peak_step_bytes=mem.peak_bytes - mem.base_bytes, memory_source=mem.source,
               d2h_bytes=int(d2h), h2d_bytes=int(h2d), engine_stats=inst.stats())


def _check(row: dict, w, step) -> Optional[tuple]:
    """The row's check step, while installed -> ``(grads, mode)`` to compare once removed."""
    grads, mode, errors = first_check_step(step, w.params, w.cuda)
    row["check_mode"] = mode
    if errors:
        row["check_errors"] = errors
    if grads is None:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "every check step raised: " + \
            "; ".join(errors)
        return None
    return grads, mode


def _compare(row: dict, pending: tuple, ref_w, refs: dict) -> None:
    """Bitwise against ``ref_w``'s check step (nothing installed; cached per state and mode)."""
    grads, mode = pending
    key = (ref_w.name, ref_w.state, mode)
    try:
        if key not in refs:
            refs[key] = check_step(ref_w.step, ref_w.params, ref_w.cuda, mode)
        row["bitwise_equal"] = grads_bitwise_equal(grads, refs[key])
        if not row["bitwise_equal"]:
            row["grad_max_rel_error"] = max_rel_error(grads, refs[key])
            if row["strategy"] == "none":
                row["note"] = "two deterministic check steps differ: bitwise checks unreliable"
    except RuntimeError as e:
        row["bitwise_equal"] = None
        row["note"] = f"reference check step raised: {type(e).__name__}: {e}"[:300]
    finally:
        ref_w.clear_grads()


def _peer_figures(ctx: Context, row: dict) -> None:
    """A peer's (or none's) measured peak and time, read by the plans' budgets."""
    if row["owner"] in ("peer", "baseline") and row["status"] == "ok":
        b, name = row["peak_step_bytes"], row["strategy"]
        ctx.peak_of[name] = max(ctx.peak_of.get(name, b), b) if name == "none" else \
            min(ctx.peak_of.get(name, b), b)
        ctx.step_of.setdefault(name, row["step_s"])


def _row_text(row: dict) -> str:
    if row["status"] != "ok":
        return f"[{row['status']}] {row['note']}"
    p = row.get("plan")
    return (f"step {row['step_s'] * 1e3:.2f} ms, act {row['act_bytes'] / 2**20:.1f} MiB, peak "
            f"{row['peak_step_bytes'] / 2**20:.1f} MiB, d2h {row['d2h_bytes'] / 1e6:.1f} MB, bitwise "
            f"{row['bitwise_equal']}" + ("" if not p else
                                         f"; plan {' '.join(p['choices'])} p={p['prefetch_layers']} "
                                         f"predicted {p['predicted_s'] * 1e3:.2f} ms / peak "
                                         f"{p['predicted_peak_bytes'] / 2**20:.1f} MiB"))


def run_bench(cfg: BenchConfig, on_row: Callable[[dict], None] = lambda row: None) -> dict:
    """Run every row of ``cfg``; returns ``{"config", "env", "rows", "traces", "planner"}``."""
    cuda = cfg.is_cuda
    if cuda:   # deterministic cuBLAS for the check steps (read when cuBLAS starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.device(cfg.device).index is not None:
            torch.cuda.set_device(torch.device(cfg.device))
    env = environment(cfg)
    bw = env["bandwidth"]
    workloads = build_workloads(cfg, (bw["d2h_Bps"], bw["h2d_Bps"]))
    runs = plan_runs(cfg)
    ctx, rows, refs = Context(), [], {}
    for name, s in progress(runs, cfg.progress, cfg.model):
        w = workloads.get(name)
        row = {"stack": name, "base_stack": name.split("/")[0], "strategy": s.name, "family": s.family,
               "owner": s.owner, "description": s.description, "reference": s.reference,
               "status": "ok", "note": "", "output_bytes": w.output_bytes if w else 0, "plan": None,
               "prefetch_layers": None, "offloaded_layers": None, "bitwise_equal": None}
        inst, pending = None, None
        try:
            if w is None:
                raise Skip(f"workload {name} was not built")
            why = s.requires() if s.requires else None
            if why:
                raise Skip(why)
            inst = s.install(w, ctx)
            row.update(inst.fields)
            if s.owner == "ours" and w.experts_error:
                row["note"] = "; ".join(filter(None, [row.get("note"), "on HF's experts (our experts "
                                                      f"refused: {w.experts_error})"]))
            if inst.plan is not None:
                row["plan"] = plan_dict(inst.plan)
                row["prefetch_layers"] = inst.plan.prefetch_layers
                row["offloaded_layers"] = inst.plan.prediction.engine_layers
            # The row whose gradients this one must equal (bitwise): its variant's base row,
            # or on our experts the experts:ours row (the bare step there).
            row["reference"] = None if s.reference is None else (
                "experts:ours" if w.state == "ours_experts" else
                "none" if s.reference == "base" else _base_row(s.variant, _recipe(cfg)))
            step = inst.wrap(w.step)
            measure_row(row, w, inst, step, cfg)
            if s.reference is not None:
                pending = _check(row, w, step)
        except Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # a failing strategy is a row, not the end of the run
            row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
        finally:
            if inst is not None:
                inst.remove()
            if w is not None:
                w.clear_grads()
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        if pending is not None:     # compared now that nothing is installed
            _compare(row, pending, w if s.reference == "self" else workloads[w.base], refs)
        _peer_figures(ctx, row)
        rows.append(row)
        if cfg.progress:  # so a log keeps the figures even if the run is cut short
            print(f"  {name} {s.name}: {_row_text(row)}", file=sys.stderr, flush=True)
        on_row(row)
    derive(rows, env)
    traces = _traces(workloads, rows, dict((f"{n}:{s.name}", s) for n, s in runs), ctx) \
        if cfg.model != "qwen3" else {}
    planner = {w.name + (f" ({state})" if state else ""): _planner_summary(f)
               for w in workloads.values() for state, (_, f) in w.measured_figures().items()}
    return {"config": cfg.to_dict(), "env": env, "rows": rows, "traces": traces, "planner": planner}


def _planner_summary(f) -> dict:
    """What the planner measured on a workload (JSON-able)."""
    return {"calibration": dict(f.calibration), "calibration_text": calibration_text(f),
            "step_none_s": f.step_none_s, "act_none_bytes": f.act_none_bytes,
            "loss_saved_bytes": f.loss_saved_bytes, "loss_extra_s": f.loss_extra_s,
            "d2h_Bps": f.d2h_Bps, "h2d_Bps": f.h2d_Bps, "layer_fwd_s": [lf.fwd_s for lf in f.layers],
            "layer0_saved_bytes": {k: sum(v.values()) for k, v in f.layers[0].groups.items()}}


# ------------------------------------------------------------------ after the rows
def derive(rows: list, env: dict) -> None:
    """Add ratios, rates and the transfer lower bound to each ``ok`` row (in place)."""
    bw = env["bandwidth"]
    by = {(r["stack"], r["strategy"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        none = by.get((r["base_stack"], "none"))
        unf = by.get(("unfused", "none"))
        for suffix, ref in (("", none), ("_vs_unfused", unf)):
            r["time_x" + suffix] = r["step_s"] / ref["step_s"] if ref else None
            r["act_x" + suffix] = _ratio(r["act_bytes"], ref["act_bytes"]) if ref else None
            r["peak_x" + suffix] = _ratio(r["peak_step_bytes"], ref["peak_step_bytes"]) if ref else None
        pl = r.get("plan")
        r["step_over_predicted"] = r["step_s"] / pl["predicted_s"] if pl and pl["predicted_s"] > 0 else None
        r["act_minus_predicted_bytes"] = r["act_bytes"] - pl["predicted_bytes"] if pl else None
        r["peak_minus_predicted_bytes"] = r["peak_step_bytes"] - pl["predicted_peak_bytes"] if pl else None
        r["d2h_GBps"] = r["d2h_bytes"] / r["fwd_s"] / 1e9 if r["fwd_s"] > 0 else None
        r["h2d_GBps"] = r["h2d_bytes"] / r["bwd_s"] / 1e9 if r["bwd_s"] > 0 else None
        base_name = {"fc1_recompute": "fc1_recompute"}.get(r["family"], "none")
        if r["family"] == "quantized":
            base_name = r["strategy"].split("+")[0]
        base = by.get((r["stack"], base_name)) or none
        if base is not None:
            lb = max(base["fwd_s"], r["d2h_bytes"] / bw["d2h_Bps"]) + \
                max(base["bwd_s"], r["h2d_bytes"] / bw["h2d_Bps"])
            r["lb_s"], r["step_over_lb"] = lb, r["step_s"] / lb
        else:
            r["lb_s"] = r["step_over_lb"] = None


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def best_offload_row(rows: list) -> Optional[dict]:
    """Our fastest row on the plain fused (or moe) stack that at least halves activation
    memory; failing that, the one with the least activation memory."""
    ours = [r for r in rows if r["status"] == "ok" and r["owner"] == "ours" and r.get("act_x") is not None
            and "/" not in r["stack"] and r["d2h_bytes"] > 0]
    if not ours:
        return None
    halved = [r for r in ours if r["act_x"] <= 0.5]
    return min(halved, key=lambda r: r["time_x"]) if halved else min(ours, key=lambda r: r["act_x"])


def _traces(workloads: dict, rows: list, by_key: dict, ctx: Context) -> dict:
    """Memory-over-time traces of ``none`` and the best offload row (plain stack)."""
    best = best_offload_row(rows)
    out = {}
    for row in [r for r in rows if r["strategy"] == "none" and "/" not in r["stack"]
                and r["status"] == "ok"][:1] + ([best] if best else []):
        key = f"{row['stack']}:{row['strategy']}"
        w = workloads[row["stack"]]
        try:
            inst = by_key[key].install(w, ctx)
            try:
                w.clear_grads()
                inst.reset()
                out[key] = trace_memory(list(w.layers), inst.wrap(w.step), lambda loss: loss.backward(),
                                        w.cuda)
            finally:
                inst.remove()
                w.clear_grads()
        except Exception as e:  # the trace is a picture; never fail the run for it
            out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out
