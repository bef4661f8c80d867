"""Our row of the full-model run (:mod:`~moe_offload.bench.full_model`): our experts and
``moe_offload.fit``, with the planner's prediction (not trial and error) finding the
longest sequence.

1. our experts (``use_moe_offload_experts``) replace HF's ``grouped_mm`` path;
2. ``fit(model, step_fn, optimizer)`` at ``unit`` tokens measures the model and gives the
   activation budget the device leaves (:class:`~moe_offload.plan.StepBudget`); one unit,
   because measuring runs the model once without a plan;
3. for a candidate length ``L`` the measured figures scaled by ``L / unit``
   (``fit(..., figures=..., scale=L / unit)``, no step run) give a plan or fit's
   refusal; the longest ``L`` (a multiple of ``unit``, at most the cap) with a plan is found
   by bisection on the number of units;
4. one (two where the time budget allows) step(s) there confirm it, the measured peak is
   compared with the plan's ``predicted_peak_bytes``; the same at HF checkpointing's
   longest length;
5. gradients: one deterministic check step at ``unit`` tokens with the longest plan
   applied against the same model without a plan (bitwise unless the plan holds an
   option that changes the math: then labelled, with the measured error).
"""
from __future__ import annotations

from typing import Callable, Optional

from .full_steps import cleanup, fmt_bytes, make_ids, predict_time, timed_at

__all__ = ["ours_row", "bisect_longest", "math_changing"]


def bisect_longest(fits: Callable[[int], bool], top: int) -> int:
    """The largest ``k`` in ``1..top`` with ``fits(k)`` (assumed monotone: true up to some
    ``k``, false after), 0 when ``fits(1)`` is false.  Tries ``top`` first."""
    if top < 1:
        return 0
    if fits(top):
        return top
    lo, hi = 0, top          # fits(lo) (or lo == 0), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def math_changing(plan) -> list:
    """The plan's options that change the math (the chunked LM-head loss), as text: its
    head option when the planner's figures mark it inexact, else any choice or description
    naming a chunked loss."""
    from .strategies import plan_math_changing
    try:
        if plan_math_changing(plan):
            return [f"head {plan.prediction.head}"]
    except AttributeError:   # not a MemoryPlan: read its text
        pass
    try:
        found = [str(c) for c in plan.choices if "chunk" in str(c).lower()]
    except Exception:   # noqa: BLE001 - a plan without choices has none
        found = []
    text = plan.describe().lower() if hasattr(plan, "describe") else ""
    if not found and "chunk" in text:
        found = ["chunked loss (describe)"]
    return found


def _plan_entry(plan, tokens: int) -> dict:
    return {"tokens": tokens, "predicted_peak_bytes": int(getattr(plan, "predicted_peak_bytes", 0)),
            "predicted_step_s": float(plan.predicted_step_s), "peak_moment": getattr(plan, "peak_moment", ""),
            "math_changing": math_changing(plan), "peak_bytes": None, "step_s": None}


def ours_row(run, row: dict, ref_tokens: Optional[int]) -> dict:
    """Fill ``row`` (see the module docstring); returns ``{"text", "budget", ...}`` for
    the report."""
    from .. import fit
    from .workloads import model_workload
    model, cuda, unit = run.model, run.cuda, run.unit
    device = "cuda" if cuda else "cpu"
    if not model_workload(model, run.layers, cuda).use_our_experts():
        raise RuntimeError("our experts do not run on this model (use_moe_offload_experts refused)")
    info = {"text": ""}
    try:
        # fit measures the model without a plan once: at one unit, where that fits (48 layers
        # at 8192 tokens without a plan would need more than an H200 has).
        t0 = unit
        ids0 = make_ids(run.vocab, t0, device, run.seed)
        step0 = lambda: model(input_ids=ids0, labels=ids0).loss   # noqa: E731
        warm = run.trainer.step(step0)                              # Adam state, as after step 1
        if not warm.ok:
            row.update(longest=0, note=f"does not fit at {t0} tokens on our experts: {warm.error}")
            return info
        run.say(f"    fit: measuring at {t0} tokens")
        kw = dict(device_memory_bytes=run.trainer.device_bytes, reserve_bytes=run.trainer.reserve_bytes,
                  layers=run.layers, emulate=None if cuda else True)
        handle = fit(model, step0, run.trainer.opt, **kw)
        figures, budget, plan0 = (run.layers, handle.plan.figures), handle.budget, handle.plan
        handle.remove()
        act_budget = int(budget.activation_budget_bytes)
        info["budget"] = budget.describe() if hasattr(budget, "describe") else str(budget)
        info["fit_plan"] = plan0.describe()
        row["avail_bytes"] = act_budget
        plans, refusals = {}, {}

        def plan_at(tokens: int):
            """fit at ``tokens``: the figures measured at ``t0`` scaled, no step run."""
            if tokens not in plans:
                try:
                    h = fit(model, step0, run.trainer.opt, figures=figures, scale=tokens / t0, **kw)
                except ValueError as e:
                    plans[tokens], refusals[tokens] = None, str(e).split("\n")[0][:300]
                else:
                    h.remove()
                    plans[tokens] = h.plan
            return plans[tokens]
        k = bisect_longest(lambda k: plan_at(k * unit) is not None, run.cap // unit)
        pred = k * unit
        row["predicted_longest"] = pred
        nxt = pred + unit
        if nxt <= run.cap and plan_at(nxt) is None:
            info["next_refusal"] = f"{nxt} tokens: {refusals.get(nxt, '')}"
        run.say(f"    fit's prediction: longest {pred} tokens (activation budget "
                f"{fmt_bytes(act_budget)}); {len(plans)} lengths planned")
        tm = run.time_models.get("checkpoint") or run.time_models.get("_any")
        row["time_model"] = tm
        ids_cache = {}

        def loss_for(tokens):
            if tokens not in ids_cache:
                ids_cache.clear()
                ids_cache[tokens] = make_ids(run.vocab, tokens, device, run.seed)
            ids = ids_cache[tokens]
            return lambda: model(input_ids=ids, labels=ids).loss

        def t_pred(tokens, plan):
            if tm:
                return predict_time(tm, tokens)
            return plan.predicted_step_s
        row["plans"] = []
        length = pred
        while length >= max(unit, pred - unit):   # one step down at most: the prediction decides
            plan = plan_at(length)
            if plan is None:
                break
            entry = _plan_entry(plan, length)
            h = plan.apply()
            try:
                got = timed_at(run, loss_for, length, t_pred(length, plan), "ours longest",
                               warm=False)   # tokens/s here is secondary: a long step runs once
            finally:
                h.remove()
                cleanup(cuda)
            row["attempts"].append(got)
            entry.update(peak_bytes=got["peak_bytes"], step_s=got["step_s"], ok=got["ok"])
            row["plans"].append(entry)
            if got["ok"] is None:
                row["note"] = f"longest {length} predicted, not confirmed ({got['error']})"
                break
            if got["ok"]:
                row.update(longest=length, peak_bytes=got["peak_bytes"], step_s=got["step_s"],
                           timing=got["timing"], tokens_per_s=length / got["step_s"],
                           predicted_peak_bytes=entry["predicted_peak_bytes"],
                           longest_capped=length >= run.cap)
                info["longest_plan"] = plan.describe()
                break
            length -= unit                  # the prediction was wrong: say so, step down once more
            row["note"] = f"predicted {pred} did not fit: {got['error'][:120]}"
        if row["longest"] is None and not row["note"]:
            row["longest"] = 0
        if ref_tokens and row["longest"] == ref_tokens:      # the same step: reuse it
            row["at_ref"] = {"tokens": ref_tokens, "ok": True, "step_s": row["step_s"],
                             "tokens_per_s": row["tokens_per_s"], "peak_bytes": row["peak_bytes"],
                             "timing": row["timing"], "error": ""}
        elif ref_tokens:
            plan = plan_at(ref_tokens)
            if plan is None:
                row["at_ref"] = {"tokens": ref_tokens, "ok": False, "step_s": None,
                                 "tokens_per_s": None, "error": "no plan fits at this length"}
            else:
                entry = _plan_entry(plan, ref_tokens)
                h = plan.apply()
                try:
                    got = timed_at(run, loss_for, ref_tokens, t_pred(ref_tokens, plan),
                                    "ours at checkpointing's longest")
                finally:
                    h.remove()
                    cleanup(cuda)
                got["tokens_per_s"] = ref_tokens / got["step_s"] if got["ok"] else None
                entry.update(peak_bytes=got["peak_bytes"], step_s=got["step_s"], ok=got["ok"])
                row["plans"].append(entry)
                row["at_ref"] = got
                info["ref_plan"] = plan.describe()
        check_plan = plans.get(row["longest"]) or plan_at(ref_tokens or unit) or plan0
        _bitwise(run, row, check_plan, loss_for(unit))
        info["text"] = _ours_text(info, row)
    finally:
        try:
            model.set_experts_implementation("grouped_mm")
        except Exception as e:   # noqa: BLE001
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"experts not switched back: {e}"
        run.trainer.opt.zero_grad(set_to_none=False)
        cleanup(cuda)
    return info


def _bitwise(run, row: dict, plan, step) -> None:
    """One deterministic check step at ``unit`` tokens with ``plan`` applied vs without."""
    from .measure import check_step, first_check_step, grads_bitwise_equal, max_rel_error
    params = run.trainer.params
    run.say(f"    bitwise check at {run.unit} tokens")
    h = plan.apply()
    try:
        got, mode, errors = first_check_step(step, params, run.cuda)
    finally:
        h.remove()
        for p in params:
            p.grad = None
        cleanup(run.cuda)
    if got is None:
        row["bitwise_detail"] = "every check step raised: " + "; ".join(errors)
        return
    ref = check_step(step, params, run.cuda, mode)
    for p in params:
        p.grad = None
    eq = grads_bitwise_equal(got, ref)
    row["bitwise_equal"] = eq
    row["math_changing"] = math_changing(plan)
    detail = (f"{len(ref)} trainable tensors at {run.unit} tokens, check mode {mode}, plan "
              f"{'of ' + str(row['longest']) + ' tokens' if row['longest'] else 'of fit at ' + str(run.unit)}")
    if not eq:
        row["grad_max_rel_error"] = max_rel_error(got, ref)
        detail += (f"; max |diff| / max |grad| = {row['grad_max_rel_error']:.2e}"
                   + (f" (math-changing options: {', '.join(row['math_changing'])})"
                      if row["math_changing"] else " (no math-changing option: a transport bug)"))
    row["bitwise_detail"] = detail


def _ours_text(info: dict, row: dict) -> str:
    parts = ["ours: fit's budget", info.get("budget", "-")]
    for p in row.get("plans", []):
        if p.get("peak_bytes") and p.get("predicted_peak_bytes"):
            parts.append(f"  plan at {p['tokens']} tokens: predicted peak "
                         f"{fmt_bytes(p['predicted_peak_bytes'])}, measured {fmt_bytes(p['peak_bytes'])} "
                         f"({p['peak_bytes'] / p['predicted_peak_bytes'] - 1:+.1%}); predicted step "
                         f"{p['predicted_step_s']:.2f} s (figures scaled linearly), measured "
                         f"{p['step_s']:.2f} s" + (f"; peak at {p['peak_moment']}" if p['peak_moment'] else ""))
    if info.get("next_refusal"):
        parts.append(f"fit one unit longer: {info['next_refusal']}")
    if info.get("longest_plan"):
        parts += ["plan at our longest:", info["longest_plan"]]
    return "\n".join(parts)
