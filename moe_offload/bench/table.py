"""Terminal output: the environment, one table row per run, the published rows, the checks.

Plain string formatting, no dependency.
"""
from __future__ import annotations

from .checks import PUBLISHED

__all__ = ["format_env", "format_table", "format_checks", "format_plan"]

GiB = float(1 << 30)
MiB = float(1 << 20)


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
        return (f"torch {env['torch']} | {env['device']} | {env['date']} | "
                f"{bw['kind']}: D2H {bw['d2h_Bps'] / 1e9:.1f} GB/s, H2D {bw['h2d_Bps'] / 1e9:.1f} GB/s\n"
                + problem + note)
    return (f"torch {env['torch']} | {env['device']} | {env['date']} | "
            f"{bw['kind']}: D2H {bw['d2h_Bps'] / 1e9:.1f} GB/s, H2D {bw['h2d_Bps'] / 1e9:.1f} GB/s\n"
            f"model {cfg['model']} preset {cfg['preset']}: T={cfg['tokens']} H={cfg['hidden']} "
            f"F={cfg['ffn']} E={cfg['experts']} L={cfg['layers']} {cfg['dtype']} "
            f"splits={cfg['splits']} recipe={cfg['recipe']} iters={cfg['iters']} warmup={cfg['warmup']}"
            + note)


COLUMNS = (("stack", 14, "<"), ("strategy", 22, "<"), ("owner", 8, "<"), ("step ms", 9, ">"),
           ("time x", 7, ">"), ("act MiB", 9, ">"), ("act x", 6, ">"), ("peak x", 6, ">"),
           ("vs unf t/a", 12, ">"), ("D2H MB", 8, ">"), ("H2D MB", 8, ">"), ("GB/s d/h", 11, ">"),
           ("step/LB", 7, ">"), ("bitwise", 7, ">"))


def _line(cells) -> str:
    return " ".join(format(str(c), f"{a}{w}") for c, (_, w, a) in zip(cells, COLUMNS)).rstrip()


def format_table(rows: list) -> str:
    """The per-run table; skipped/failed rows show their note."""
    out = [_line([c[0] for c in COLUMNS]), "-" * (sum(c[1] + 1 for c in COLUMNS) - 1)]
    for r in rows:
        head = [r["stack"], r["strategy"], r["owner"]]
        if r["status"] != "ok":
            out.append(_line(head) + f"  [{r['status']}] {r['note']}")
            continue
        bit = {True: "yes", False: "NO", None: "n/a"}[r.get("bitwise_equal")]
        vs_unf = "-" if r.get("time_x_vs_unfused") is None else \
            f"{r['time_x_vs_unfused']:.2f}/{_f(r.get('act_x_vs_unfused'), '.2f')}"
        rates = "-" if not r["d2h_bytes"] else \
            f"{_f(r.get('d2h_GBps'), '.1f')}/{_f(r.get('h2d_GBps'), '.1f')}"
        out.append(_line(head + [
            f"{r['step_s'] * 1e3:.2f}", _f(r.get("time_x"), ".2f"), f"{r['act_bytes'] / MiB:.1f}",
            _f(r.get("act_x"), ".3f"), _f(r.get("peak_x"), ".2f"), vs_unf,
            f"{r['d2h_bytes'] / 1e6:.1f}", f"{r['h2d_bytes'] / 1e6:.1f}", rates,
            _f(r.get("step_over_lb"), ".2f"), bit]))
        if r.get("plan"):
            out.append(format_plan(r))
    out.append("")
    out.append("published, not measured (ANCHORS.md, H100, relative to the unfused none):")
    for p in PUBLISHED:
        out.append(f"  {p.name:<44} time x {p.time_x:5.2f}  act x {p.act_x:.3f}")
    return "\n".join(out)


def format_plan(r: dict) -> str:
    """The indented plan line under a row of ours: the per-layer choices
    (``recompute/o<level>``), prefetch, budget, and the predicted against the measured step
    time and peak."""
    p = r["plan"]
    budget = "" if p.get("budget_bytes") is None else f", budget {p['budget_bytes'] / MiB:.1f} MiB"
    peak = r.get("peak_step_bytes")
    measured_peak = "-" if peak is None else f"{peak / MiB:.1f}"
    return (f"{'':>16}plan: {' '.join(p['choices'])}, prefetch {p['prefetch_layers']}{budget}; "
            f"predicted {p['predicted_s'] * 1e3:.2f} ms / peak {p['predicted_peak_bytes'] / MiB:.1f} MiB, "
            f"measured {r['step_s'] * 1e3:.2f} ms / peak {measured_peak} MiB "
            f"(x{_f(r.get('step_over_predicted'), '.2f')})")


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
    """PASS/FAIL lines of every comparison."""
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
