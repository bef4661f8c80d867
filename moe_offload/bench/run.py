"""Run every (stack, strategy) pair of a :class:`BenchConfig` and derive the figures.

All strategies run in one process, on the same weights (variants share ``Parameter``
objects) and the same ``x``/``dy``.  Per pair: ``warmup`` untimed steps, ``iters``
timed steps (median), then one step measuring memory, bytes moved and gradients.  A
strategy that fails or does not apply becomes a row with ``status`` ``"error"`` or
``"skipped"`` and a note; the run goes on.

Derived per row (:func:`derive`): ratios to ``none`` of the same stack (``time_x``,
``act_x``, and ``peak_x`` of the step peak above the step start) and to ``none`` of the unfused stack (``*_vs_unfused``), achieved
copy rates, and the transfer lower bound
``lb_s = max(fwd_base, d2h/bw_d2h) + max(bwd_base, h2d/bw_h2d)`` where ``base`` is the
strategy's variant without offload (``none``, ``fc1_recompute`` or the recipe).
Rows of ours run a plan of the general planner (:mod:`moe_offload.bench.strategies`) on
the stack's figures, measured once per stack by :func:`~moe_offload.plan.measure_model`
(the step ``loss_with_grad(stack(x), dy)``: its backward is ``y.backward(dy)``); they also
get ``step_over_predicted`` (measured step / the planner's prediction),
``act_minus_predicted_bytes`` and ``peak_minus_predicted_bytes``.
"""
from __future__ import annotations

import datetime
import platform
import sys
import time
from typing import Callable, Optional

import torch

from ..plan import measure_model
from ..plan.measure import pinned_bandwidth
from .config import BenchConfig
from .measure import (allocate_grads, capture_grads, grads_bitwise_equal, loss_with_grad,
                      measure_memory, time_steps, trace_memory)
from .models import build_stacks, make_inputs
from .strategies import PEER_FAMILIES, PlanInfo, Skip, Strategy, plan_dict, strategy_list

__all__ = ["environment", "plan_runs", "run_bench", "derive", "progress", "min_offload_bytes",
           "best_offload_row", "stack_figures"]

_VARIANT_BASE = {"": "none", "fc1": "fc1_recompute"}  # "recipe" -> the recipe's name


def environment(cfg: BenchConfig) -> dict:
    """Torch version, device name, measured copy bandwidth, date."""
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    bw = _bandwidth(device, cuda)
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name(device.index) if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "bandwidth": bw,
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


def _recipe(cfg: BenchConfig) -> Optional[str]:
    return None if cfg.recipe == "none" else cfg.recipe


def _variant_stack(base: str, s: Strategy, recipe: Optional[str]) -> str:
    if s.variant == "":
        return base
    return f"{base}/fc1" if s.variant == "fc1" else f"{base}/{recipe}"


def _base_name(s: Strategy, recipe: Optional[str]) -> str:
    return _VARIANT_BASE.get(s.variant, recipe)


def plan_runs(cfg: BenchConfig) -> list:
    """``[(stack_name, Strategy)]`` in run order.

    ``--stack both`` runs only the baseline and the peers on the unfused stack (system vs
    system) and everything on the fused one (engine vs engine).  ``none`` of every stack,
    the base of every selected variant and what a strategy ``needs`` always run (ratios,
    references and the planner need them).  Strategies marked ``after_peers`` run last,
    after every stack's peers (their budgets are the peers' measured memory)."""
    recipe = _recipe(cfg)
    rows = strategy_list(recipe)
    chosen = set(cfg.strategies or [s.name for s in rows])
    wanted = {s.name for s in rows if s.name in chosen or s.family in chosen}
    for s in rows:
        if s.name in wanted:
            wanted.add("none")
            wanted.add(_base_name(s, recipe))
            wanted.update(s.needs)
    bases = ["moe"] if cfg.model == "moe" else [b for b in ("fused", "unfused")
                                                if cfg.stack in (b, "both")]
    plan = []
    for base in bases:
        for s in rows:
            if s.name not in wanted:
                continue
            if base != "fused" and s.fused_only:
                continue
            if base == "unfused" and cfg.stack == "both" and s.owner == "ours":
                continue
            plan.append((_variant_stack(base, s, recipe), s))
    return [p for p in plan if not p[1].after_peers] + [p for p in plan if p[1].after_peers]


def min_offload_bytes(cfg: BenchConfig) -> int:
    """The engine's size threshold: its 256 KiB default, lowered to an eighth of ``x`` for
    small problems so that the tiny CPU run moves real bytes."""
    itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()
    return min(256 * 1024, cfg.tokens * cfg.hidden * itemsize // 8)


def stack_figures(cfg: BenchConfig, stack, x: torch.Tensor, dy: torch.Tensor, variant: bool,
                  bandwidth: dict) -> tuple:
    """The planner's figures of ``stack`` (``measure_model``'s ``(layers, ModelFigures)``):
    the step is ``loss_with_grad(stack(x), dy)``, timed ``warmup + iters`` times per
    recompute option at the run's engine threshold and measured bandwidth.  ``variant``
    (``fused/fc1``, ``fused/<recipe>``): only ``none`` is measured, so plans on a variant
    only offload.  ``x.grad`` is reset afterwards (the model's own state is restored by
    ``measure_model``)."""
    try:
        return measure_model(stack.layers, lambda: loss_with_grad(stack.forward(x), dy), stack.layers,
                             min_offload_bytes=min_offload_bytes(cfg),
                             options=("none",) if variant else None, iters=max(1, cfg.iters),
                             warmup=cfg.warmup, bandwidth=(bandwidth["d2h_Bps"], bandwidth["h2d_Bps"]),
                             emulate=not cfg.is_cuda)
    finally:
        x.grad = None


def _peer_peak_bytes(rows: list) -> dict:
    """``{peer strategy: smallest step peak (peak_step_bytes) over the stacks it ran on}``,
    plus ``"none"``: the *largest* no-offload peak over the stacks (the unfused stack's when
    it ran: half of it is the system-level "hideable" budget)."""
    out = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        b = r["peak_step_bytes"]
        if r["strategy"] in PEER_FAMILIES:
            out[r["strategy"]] = min(out.get(r["strategy"], b), b)
        if r["strategy"] == "none":
            out["none"] = max(out.get("none", b), b)
    return out


def _plan_fields(row: dict, runner) -> None:
    plan = getattr(runner, "plan", None)
    row["plan"] = None if plan is None else plan_dict(plan)
    row["prefetch_layers"] = None if plan is None else plan.prefetch_layers
    row["offloaded_layers"] = None if plan is None else plan.prediction.engine_layers


def _plan_text(row: dict) -> str:
    p = row.get("plan")
    if not p:
        return ""
    return (f"; plan {' '.join(p['choices'])} p={p['prefetch_layers']} predicted "
            f"{p['predicted_s'] * 1e3:.2f} ms / peak {p['predicted_peak_bytes'] / 2**20:.1f} MiB")


def run_bench(cfg: BenchConfig, on_row: Callable[[dict], None] = lambda row: None) -> dict:
    """Run the plan of ``cfg``; returns ``{"config", "env", "rows", "traces"}``."""
    cuda = cfg.is_cuda
    if cuda and torch.device(cfg.device).index is not None:
        torch.cuda.set_device(torch.device(cfg.device))
    env = environment(cfg)
    recipe = _recipe(cfg)
    stacks = build_stacks(cfg, recipe)
    x, dy = make_inputs(cfg)
    output_bytes = x.numel() * x.element_size()  # the stack output is (T, H) like x
    plan = plan_runs(cfg)
    rows, refs, by_key, infos, figures = [], {}, {}, {}, {}

    def figures_of(stack_name: str) -> Callable[[], tuple]:
        def get() -> tuple:
            if stack_name not in figures:
                figures[stack_name] = stack_figures(cfg, stacks[stack_name], x, dy,
                                                    "/" in stack_name, env["bandwidth"])
            return figures[stack_name]
        return get

    for stack_name, s in progress(plan, cfg.progress):
        base_stack = stack_name.split("/")[0]
        row = {"stack": stack_name, "base_stack": base_stack, "strategy": s.name, "family": s.family,
               "owner": s.owner, "description": s.description, "reference": s.reference,
               "status": "ok", "note": "", "output_bytes": output_bytes}
        stack = stacks.get(stack_name)
        try:
            if stack is None:
                raise Skip(f"stack {stack_name} was not built")
            info = PlanInfo(num_layers=cfg.layers, cuda=cuda, model=stack.layers,
                            figures=figures_of(stack_name), min_offload_bytes=min_offload_bytes(cfg),
                            peer_peak_bytes=_peer_peak_bytes(rows))
            infos[(stack_name, s.name)] = info
            runner = s.make(info)
            try:
                _plan_fields(row, runner)
                _measure(row, runner, stack, x, dy, cfg, cuda, refs, s)
            finally:
                runner.close()
        except Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # a failing strategy is a row, not the end of the run
            row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
        finally:
            x.grad = None
            if stack is not None:
                for p in stack.parameters():
                    p.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        rows.append(row)
        by_key[(stack_name, s.name)] = row
        if cfg.progress:  # so a log keeps the figures even if the run is cut short
            print(f"  {stack_name} {s.name}: " + (
                f"step {row['step_s'] * 1e3:.2f} ms, act {row['act_bytes'] / 2**20:.1f} MiB, "
                f"d2h {row['d2h_bytes'] / 1e6:.1f} MB, bitwise {row['bitwise_equal']}"
                if row["status"] == "ok" else f"[{row['status']}] {row['note']}") + _plan_text(row),
                file=sys.stderr, flush=True)
        on_row(row)
    derive(rows, env)
    result = {"config": cfg.to_dict(), "env": env, "rows": rows, "traces": {}}
    result["traces"] = _traces(cfg, stacks, rows, plan, x, dy, cuda, infos)
    return result


def _measure(row: dict, runner, stack, x, dy, cfg: BenchConfig, cuda: bool, refs: dict,
             s: Strategy) -> None:
    params = stack.parameters()

    def before():
        x.grad = None
        for p in params:
            p.grad = None
        runner.begin_step()

    def forward():
        return runner.forward(stack.layers, x)

    def backward(y):
        y.backward(dy)

    for _ in range(cfg.warmup):
        before()
        backward(forward())
    t = time_steps(forward, backward, cfg.iters, cuda, before)
    before()
    allocate_grads(params)   # the step peak: activations + backward temporaries
    mem = measure_memory(forward, backward, cuda, min_act_bytes=row["output_bytes"])
    d2h, h2d = runner.moved_bytes()
    row.update(fwd_s=t.fwd_s, bwd_s=t.bwd_s, step_s=t.step_s, all_step_s=t.all_step_s,
               act_bytes=mem.act_bytes, peak_bytes=mem.peak_bytes, base_bytes=mem.base_bytes,
               peak_step_bytes=mem.peak_bytes - mem.base_bytes,
               memory_source=mem.source, d2h_bytes=int(d2h), h2d_bytes=int(h2d),
               engine_stats=runner.stats())
    key = (row["base_stack"], s.name)  # strategy names are unique within a base stack
    grads = [x.grad] + [p.grad for p in params]
    if s.reference is None:
        row["bitwise_equal"] = None
    else:
        ref = refs.get((row["base_stack"], s.reference))
        row["bitwise_equal"] = None if ref is None else grads_bitwise_equal(grads, ref)
    # Keep grads of the strategies others compare against (on the host).
    if s.name in ("none", "fc1_recompute") or s.family == "quantized" and s.reference is None:
        refs[key] = capture_grads(x, params, to_cpu=True)


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
        base_name = {"fc1_recompute": "fc1_recompute", "quantized": None}.get(r["family"], "none")
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


def _traces(cfg, stacks, rows, plan, x, dy, cuda, infos) -> dict:
    """Memory-over-time traces of ``none`` and the best offload row (plain stack)."""
    best = best_offload_row(rows)
    out = {}
    for row in [r for r in rows if r["strategy"] == "none" and "/" not in r["stack"]
                and r["status"] == "ok"][:1] + ([best] if best else []):
        strategy = next(s for name, s in plan if s.name == row["strategy"] and name == row["stack"])
        stack = stacks[row["stack"]]
        info = infos.get((row["stack"], row["strategy"])) or PlanInfo(
            cfg.layers, cuda, stack.layers, min_offload_bytes=min_offload_bytes(cfg))
        try:
            runner = strategy.make(info)
            try:
                x.grad = None
                for p in stack.parameters():
                    p.grad = None
                runner.begin_step()
                out[f"{row['stack']}:{row['strategy']}"] = trace_memory(
                    list(stack.layers), lambda: runner.forward(stack.layers, x),
                    lambda y: y.backward(dy), cuda)
            finally:
                runner.close()
        except Exception as e:  # the trace is a picture; never fail the run for it
            out[f"{row['stack']}:{row['strategy']}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    x.grad = None
    return out
