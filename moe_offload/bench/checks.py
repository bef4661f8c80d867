"""Pareto/dominance checks on benchmark figures (pure functions on ratios).

A :class:`Point` is one configuration: step time and activation memory, both as ratios
to the same ``none`` baseline.  For each peer ``P`` (``save_on_cpu``, ``checkpoint``):

- (a) *faster at no more memory*: some config of ours with ``act <= P.act`` and
  ``time <= P.time / 1.15``;
- (b) *half the memory at no more time*: some config with ``time <= P.time`` and
  ``act <= 0.5 * P.act``.

A criterion is ``IMPOSSIBLE`` rather than ``FAIL`` when it asks for less activation memory
than the floor no configuration can go below: the stack output, which must stay on the
GPU for the loss (``floor_act_x`` = output bytes / the baseline's act bytes).  E.g. (b)
vs ``save_on_cpu``, which already keeps only the output: half of it is below the floor.

The same (a)/(b) on the step peak above its start (``peak_x``) instead of the activation
memory: ``engine_vs_engine_peak`` (the ``plan@<peer>`` rows are budgeted by the peers'
measured peaks; the published figures are activation memory, so they stay on ``act_x``).

Plus the *hideable* check (a config within 1.03x of ``none``'s time that cuts activation
memory by at least 50%) and the *lower-bound* check (full offload within 1.10x of the
transfer lower bound).  :func:`comparisons` builds the three comparisons of a run:
engine vs engine, system vs system, and ours vs the peers' published figures.

On a Hugging Face model (the slice) the checks are the issues' targets instead
(:func:`target_checks`): the plans at the peers' measured peaks against ``none``'s time,
the predicted peak and step against the measured ones, and bitwise gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Point", "PUBLISHED", "dominance_check", "hideable_check", "lower_bound_check",
           "output_floor", "comparisons", "target_checks", "run_checks"]


@dataclass(frozen=True)
class Point:
    """One configuration: ``time_x`` and ``act_x`` relative to the comparison's ``none``."""
    name: str
    time_x: float
    act_x: float


# The peers' figures from ANCHORS.md (H100, torch 2.11, 8 unfused grouped SwiGLU layers,
# T=16384 H=4096 F=2048 E=8 bf16), relative to the unfused ``none``.  Published, not
# measured by this run.
PUBLISHED = (
    Point("save_on_cpu (published)", 6.93, 0.115),
    Point("checkpoint (published)", 1.21, 0.385),
    Point("torchtune OffloadActivations (published)", 2.66, 0.31),
)


def _status(configs: list, need_act_x: float, floor_act_x: Optional[float]) -> str:
    if configs:
        return "PASS"
    return "IMPOSSIBLE" if floor_act_x is not None and need_act_x < floor_act_x else "FAIL"


def dominance_check(peers: Sequence[Point], ours: Sequence[Point], speedup: float = 1.15,
                    mem_fraction: float = 0.5, floor_act_x: Optional[float] = None,
                    floor_bytes: Optional[int] = None) -> list:
    """For each peer: does some config of ours pass (a) and (b)?  (module docstring).

    ``a_status``/``b_status``: ``PASS``, ``FAIL``, or ``IMPOSSIBLE`` when no config passes
    and the criterion's memory bound is below ``floor_act_x`` (then ``*_why`` holds the
    arithmetic; ``floor_bytes``, the output's bytes, only makes it readable)."""
    out = []
    floor_txt = "" if floor_bytes is None else f" ({floor_bytes / 2**20:.1f} MiB)"
    for p in peers:
        a = [o.name for o in ours if o.act_x <= p.act_x and o.time_x <= p.time_x / speedup]
        b = [o.name for o in ours if o.time_x <= p.time_x and o.act_x <= mem_fraction * p.act_x]
        d = {"peer": p.name, "peer_time_x": p.time_x, "peer_act_x": p.act_x,
             "a_pass": bool(a), "a_configs": a, "b_pass": bool(b), "b_configs": b,
             "a_status": _status(a, p.act_x, floor_act_x),
             "b_status": _status(b, mem_fraction * p.act_x, floor_act_x),
             "floor_act_x": floor_act_x}
        if d["a_status"] == "IMPOSSIBLE":
            d["a_why"] = (f"act <= {p.act_x:.4f} is below the stack output {floor_act_x:.4f}"
                          f"{floor_txt}, which stays on the GPU for the loss")
        if d["b_status"] == "IMPOSSIBLE":
            d["b_why"] = (f"act <= {mem_fraction:g} x {p.act_x:.4f} = {mem_fraction * p.act_x:.4f} "
                          f"is below the stack output {floor_act_x:.4f}{floor_txt}, which stays "
                          "on the GPU for the loss")
        out.append(d)
    return out


def hideable_check(ours: Sequence[Point], time_tol: float = 1.03, act_cut: float = 0.5) -> dict:
    """PASS when a config has ``time_x <= time_tol`` and ``act_x <= 1 - act_cut``."""
    hits = [o.name for o in ours if o.time_x <= time_tol and o.act_x <= 1.0 - act_cut]
    return {"pass": bool(hits), "configs": hits, "time_tol": time_tol, "act_cut": act_cut}


def lower_bound_check(step_over_lb: dict, tol: float = 1.10) -> dict:
    """PASS when every full-offload config is within ``tol`` of its transfer lower bound.

    ``step_over_lb``: ``{config name: step_s / lb_s}``; empty -> not passed."""
    fails = [n for n, v in step_over_lb.items() if v is None or v > tol]
    return {"pass": bool(step_over_lb) and not fails, "configs": dict(step_over_lb),
            "failing": fails, "tol": tol}


def _points(rows: Sequence[dict], owner: str, suffix: str = "", base_stack: Optional[str] = None,
             label_stack: bool = False, memory: str = "act_x") -> list:
    """``owner``'s usable rows as :class:`Point` s; ``memory``: the row's memory ratio that
    fills ``Point.act_x`` (``"act_x"``, or ``"peak_x"`` for the step-peak comparison)."""
    pts = []
    for r in rows:
        if r["status"] != "ok" or r["owner"] != owner or r.get("time_x" + suffix) is None \
                or r.get(memory + suffix) is None:
            continue
        if base_stack is not None and r["base_stack"] != base_stack:
            continue
        if r.get("bitwise_equal") is False:  # wrong gradients do not count as a config
            continue
        if r.get("reference") and r.get("bitwise_equal") is None:
            continue                          # nor do gradients that were never checked
        name = f"{r['stack']}:{r['strategy']}" if label_stack else r["strategy"]
        pts.append(Point(name, r["time_x" + suffix], r[memory + suffix]))
    return pts


def output_floor(rows: Sequence[dict], stack: str) -> dict:
    """``{"floor_act_x", "floor_bytes"}`` of the ``none`` row of ``stack``: its
    ``output_bytes`` (the stack output) over its ``act_bytes``; empty when unknown."""
    none = next((r for r in rows if r["status"] == "ok" and r["stack"] == stack
                 and r["strategy"] == "none"), None)
    if none is None or not none.get("output_bytes") or not none.get("act_bytes"):
        return {}
    return {"floor_act_x": none["output_bytes"] / none["act_bytes"],
            "floor_bytes": none["output_bytes"]}


def comparisons(rows: Sequence[dict]) -> dict:
    """All checks of a run, keyed by comparison name (JSON-able)."""
    fused = "moe" if any(r["base_stack"] == "moe" for r in rows) else "fused"
    out = {}
    ours = _points(rows, "ours", base_stack=fused, label_stack=True)
    peers = _points(rows, "peer", base_stack=fused, label_stack=True)
    if ours and peers:
        out["engine_vs_engine"] = {"baseline": f"{fused}:none",
                                   "dominance": dominance_check(peers, ours, **output_floor(rows, fused)),
                                   "hideable": hideable_check(ours)}
    ours_p = _points(rows, "ours", base_stack=fused, label_stack=True, memory="peak_x")
    peers_p = _points(rows, "peer", base_stack=fused, label_stack=True, memory="peak_x")
    if ours_p and peers_p:          # the plan@ rows' budgets are the peers' step peaks
        out["engine_vs_engine_peak"] = {"baseline": f"{fused}:none",
                                        "dominance": dominance_check(peers_p, ours_p)}
    ours_u = _points(rows, "ours", "_vs_unfused", base_stack=fused, label_stack=True)
    peers_u = _points(rows, "peer", "_vs_unfused", base_stack="unfused", label_stack=True)
    if ours_u and peers_u:
        out["system_vs_system"] = {"baseline": "unfused:none",
                                   "dominance": dominance_check(peers_u, ours_u,
                                                                **output_floor(rows, "unfused")),
                                   "hideable": hideable_check(ours_u)}
    ref = ours_u or ours
    if ref:
        out["published"] = {"baseline": "unfused:none" if ours_u else f"{fused}:none",
                            "note": "peers' published figures (ANCHORS.md), not measured by this run",
                            "dominance": dominance_check(
                                PUBLISHED, ref, **output_floor(rows, "unfused" if ours_u else fused))}
    full = {f"{r['stack']}:{r['strategy']}": r.get("step_over_lb") for r in rows
            if r["status"] == "ok" and r["strategy"] in ("offload_but_last", "offload_all")}
    out["lower_bound"] = lower_bound_check(full)
    return out


def _x(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def target_checks(rows: list) -> list:
    """The slice's targets on this run: ``[{"target", "status", "detail"}]``.  Budgets are
    the peers' measured step peaks (issue 16); ``plan@time`` keeps issue 11's target."""
    by = {r["strategy"]: r for r in rows if r["status"] == "ok"}
    out = []

    def add(target, ok, detail):
        out.append({"target": target, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": detail})

    def txt(r):
        return (f"{r['strategy']}: time x {r['time_x']:.2f}, peak x {_x(r.get('peak_x'))}, "
                f"act x {_x(r.get('act_x'))}")

    r, ck = by.get("plan@checkpoint"), by.get("checkpoint")
    add("at checkpointing's peak: <= 1.10x none's time",
        None if r is None or ck is None else
        r["time_x"] <= 1.10 and r["peak_step_bytes"] <= ck["peak_step_bytes"] * 1.02,
        txt(r) if r else "row did not run")
    r = by.get("plan@time")
    add("at <= 1.03x none's time: <= 0.40x none's memory after the forward",
        None if r is None else r["time_x"] <= 1.03 and r["act_x"] <= 0.40, txt(r) if r else "row did not run")
    for peer in ("save_on_cpu+ckpt", "torchtune+ckpt"):
        r = by.get(f"plan@{peer}")
        target = f"at {peer}'s peak: <= 1.15x none's time"
        if r is not None and r.get("requested_budget_bytes") is not None:
            add(target, False, f"{txt(r)}: peak target out of reach: {r['note']}")
        else:
            add(target, None if r is None else r["time_x"] <= 1.15, txt(r) if r else "row did not run")
    plans = [r for r in rows if r["status"] == "ok" and r.get("plan")]
    errs = [(r["strategy"], r["peak_step_bytes"] / max(r["plan"].get("predicted_peak_bytes") or 0, 1) - 1)
            for r in plans]
    add("predicted peak within 5% of measured (every plan row)",
        None if not plans else all(abs(e) <= 0.05 for _, e in errs),
        ", ".join(f"{n} {e:+.1%}" for n, e in errs) or "no plan row")
    bad = [r["strategy"] for r in plans if abs(r["step_over_predicted"] - 1) > 0.05]
    add("predicted step time within 5% of measured (every plan row)", None if not plans else not bad,
        ", ".join(bad) or f"{len(plans)} rows")
    nb = [r["strategy"] for r in plans if r.get("bitwise_equal") is not True
          and not r["plan"].get("math_changing")]
    labelled = [f"{r['strategy']} (math-changing head {r['plan'].get('head')}, max rel err "
                f"{_x(r.get('grad_max_rel_error'), '.1e')})" for r in plans
                if r.get("bitwise_equal") is not True and r["plan"].get("math_changing")]
    add("gradients bitwise equal to none (every plan row but labelled math changes)",
        None if not plans else not nb,
        "; ".join(([", ".join(nb)] if nb else []) + labelled) or f"{len(plans)} rows")
    return out


def run_checks(rows: list, model: str) -> dict:
    """The checks of a run: the slice's targets (``{"targets": [...]}``) on a Hugging Face
    model, else the stacks' :func:`comparisons`."""
    return {"targets": target_checks(rows)} if model == "qwen3" else comparisons(rows)
