"""The ``--plot PATH.png`` figure: Pareto chart and memory-over-time trace.

Left: one point per configuration, x = activation memory and y = step time, both as
ratios to ``none``; peers red, ours blue, the baseline black, the peers' published
figures as hollow grey markers (synthetic stacks only).  Right, when traces were recorded
(the synthetic stacks): memory over one step for ``none`` and the best offload
configuration.  Needs matplotlib (``pip install 'moe_offload[bench]'``).
"""
from __future__ import annotations

from typing import Optional

from .checks import PUBLISHED

__all__ = ["PLOT_HINT", "write_plot"]

PLOT_HINT = "plots need matplotlib: pip install 'moe_offload[bench]'"

_COLORS = {"peer": "tab:red", "ours": "tab:blue", "baseline": "black"}


def write_plot(report: dict, path: str) -> Optional[str]:
    """Write the PNG; returns ``None`` on success or the hint when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_HINT
    traces = {k: tr for k, tr in report.get("traces", {}).items() if "t_s" in tr}
    real = report.get("config", {}).get("model") == "qwen3"
    if traces:
        fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(14, 6))
    else:                     # no memory trace recorded (the real-model job): one panel
        fig, ax = plt.subplots(1, 1, figsize=(8, 6))
    rows = [r for r in report["rows"] if r["status"] == "ok" and r.get("act_x") is not None]
    for r in rows:
        # System view: peers on unfused and ours on fused, all relative to unfused none,
        # when the unfused stack ran; otherwise each relative to its own none.
        tx = r.get("time_x_vs_unfused") if r.get("time_x_vs_unfused") is not None else r["time_x"]
        ax_ = r.get("act_x_vs_unfused") if r.get("act_x_vs_unfused") is not None else r["act_x"]
        marker = "s" if r["base_stack"] == "unfused" else "o"
        ax.scatter([ax_], [tx], color=_COLORS.get(r["owner"], "gray"), marker=marker, zorder=3)
        ax.annotate(f"{r['stack']}:{r['strategy']}", (ax_, tx), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for p in (PUBLISHED if not real else ()):
        ax.scatter([p.act_x], [p.time_x], facecolors="none", edgecolors="gray", marker="D", zorder=2)
        ax.annotate(p.name, (p.act_x, p.time_x), fontsize=7, color="gray",
                    xytext=(3, -9), textcoords="offset points")
    from matplotlib.lines import Line2D
    ax.legend(handles=[Line2D([], [], color=c, marker="o", linestyle="", label=k) for k, c in _COLORS.items()]
              + [Line2D([], [], color="gray", marker="D", markerfacecolor="none", linestyle="",
                        label="published (not measured)")], fontsize=8, loc="upper right")
    if real:
        ax.set_xlabel("activation memory (x none: the Hugging Face model as it is)")
        ax.set_ylabel("step time (x none)")
    else:
        ax.set_xlabel("activation memory (x unfused none; o = our fused stack, s = unfused)")
        ax.set_ylabel("step time (x unfused none)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("step time vs activation memory (red peers, blue ours, grey published)")

    if traces:
        for name, tr in traces.items():
            ax_t.plot([t * 1e3 for t in tr["t_s"]], [b / 2**20 for b in tr["bytes"]], marker=".", label=name)
            ax_t.axvline(tr["fwd_end_s"] * 1e3, color="gray", alpha=0.3, linestyle="--")
        ax_t.set_xlabel("time in step (ms; dashed: end of forward)")
        ax_t.set_ylabel("memory above step start (MiB)")
        ax_t.set_title("memory over one step")
        ax_t.legend(fontsize=8)
    env = report["env"]
    fig.suptitle(f"moe_offload bench | {env['device']} | torch {env['torch']} | {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
