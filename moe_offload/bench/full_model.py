"""The main job on the full-depth model (``python -m moe_offload`` on a GPU, ``--model full``).

Qwen3-30B-A3B as its config says (48 layers, hidden 2048, 32/4 heads of 128, 128 experts,
top-8, expert ffn 768, vocab 151,936, bf16, SDPA, router aux loss in the loss), random
weights built directly on the device, fine-tuned the way people do it on one GPU: base
weights frozen, LoRA adapters on attention q/k/v/o (peft, when it imports; else attention
and router weights train) and AdamW.  Where the weights do not fit in half the device
memory (an H100 80 GB), the model keeps the most layers whose weights do, and says so.

For every strategy of the registry that runs here (:func:`full_strategies`) the run finds the **longest sequence** (one
sequence, a multiple of ``unit`` = 4096 tokens, at most ``cap``) whose training step
(forward + backward + ``optimizer.step()``) fits the device, and its tokens/s there; then
each strategy's tokens/s at HF checkpointing's longest sequence.

Predict, then confirm: a peer's step peak (``max_memory_allocated`` above the step start)
is measured at ``unit`` and ``2 * unit`` tokens; peak is close to linear in tokens with
SDPA, so the line through the two gives the longest multiple of ``unit`` under the memory
left (device memory less what is allocated at the step start, less an allocator reserve);
one step there confirms it (an out-of-memory step steps down by one ``unit``).  Ours
(``moe_offload.fit`` with our experts) is measured once at ``unit`` tokens; the
planner's figures scaled to each candidate length (``ModelFigures.scaled``) say which
lengths have a plan whose predicted whole-step peak fits: the longest is confirmed with
one step, and its measured peak compared with the prediction.

Step times are predicted before every long step (``t = a L + b L^2`` through the two short
probes, ``b`` at least attention's FLOPs: attention is quadratic), and a step that would
pass the run's time budget (``--time-budget``) is skipped and reported as such: the whole
default run fits one 10-minute device call.  Pinned host memory is predicted the same way
for the peers that offload to the host, and bounds their longest length (a host out of
memory would end the process).  The arithmetic and the measured step live in
:mod:`~moe_offload.bench.full_steps`; our row in :mod:`~moe_offload.bench.full_ours`.

On the CPU a tiny config runs the same logic in seconds, with an emulated device memory
(``--device-memory-mib``; peaks from the profiler's host accounting), so the search,
the strategies and the report are tested without a GPU.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch

from ..plan.fit import host_available_bytes
from .full_steps import (WARM_ALWAYS_S, GiB, MiB, Deadline, FullRun, Trainer, attention_c2,
                         cleanup, fmt_bytes, layers_that_fit,
                         longest_fitting, make_ids, peak_line, predict_time, time_model, timed_at)
from .strategies import Context, Skip, liger_causal_lm_loss, strategies_for
from .workloads import build_qwen3, model_workload

__all__ = ["QWEN3_FULL", "QWEN3_FULL_TINY", "FULL_ORDER", "full_strategies", "build_full",
           "run_full", "format_full_report", "full_targets"]

QWEN3_FULL = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                  num_hidden_layers=48, vocab_size=151936, intermediate_size=6144,
                  rope_theta=1e6, tie_word_embeddings=False)
# The CPU stand-in: same structure, a vocabulary large enough that the head matters.
QWEN3_FULL_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       num_hidden_layers=4, vocab_size=2048, intermediate_size=128,
                       tie_word_embeddings=False)
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------ the strategies
# Run order: HF checkpointing first (its longest is every row's comparison length), then
# ours (the targets), then the peers, save_on_cpu last (it pins the head's and loss's saved
# tensors too: tens of GB of host memory per step at long lengths, its steps are the slowest).
FULL_ORDER = ("checkpoint", "ours", "none", "liger+ckpt", "sac", "hf_offload", "torchtune+ckpt",
              "save_on_cpu+ckpt")


def full_strategies() -> list:
    """The registry's strategies of the full-depth run (``kinds`` has ``"full"``), in
    :data:`FULL_ORDER`."""
    rows = {s.name: s for s in strategies_for("full")}
    return [rows[n] for n in FULL_ORDER if n in rows] + [s for n, s in rows.items() if n not in FULL_ORDER]


# ------------------------------------------------------------------ the model
def build_full(dims: dict, device: str, dtype: torch.dtype, seed: int, layers: int,
               max_tokens: int):
    """The HF model (random weights on ``device``), LoRA (or trainable attention + router)
    applied, and ``(model, trainable_params, setup_note)``."""
    model, _ = build_qwen3(dims, max(max_tokens, 4096), device, dtype, seed, layers=layers)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        note = _add_lora(model, seed)
    except Exception as e:   # noqa: BLE001 - peft missing or incompatible: trainable attention
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in model.named_parameters():
            if "lora_" not in name and (any(k in name for k in LORA_TARGETS)
                                        or name.endswith("mlp.gate.weight")):
                p.requires_grad_(True)
        why = "peft does not import" if isinstance(e, ImportError) else \
            f"peft failed ({type(e).__name__}: {str(e)[:120]})"
        note = f"{why}: attention q/k/v/o and router weights train (base frozen otherwise)"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("build_full: no trainable parameter")
    return model, params, note


def _add_lora(model, seed: int) -> str:
    """peft LoRA adapters on attention q/k/v/o (in place); ``lora_B`` drawn small and
    non-zero (as after some training: every adapter gradient is non-trivial)."""
    import peft
    from peft import LoraConfig, inject_adapter_in_model
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                     target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(cfg, model)
    gen = torch.Generator().manual_seed(seed + 7)
    n = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            n += 1
            p.requires_grad_(True)
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen).mul_(1e-3).to(p.dtype))
    if n == 0:
        raise RuntimeError("peft injected no adapter")
    return (f"peft {peft.__version__} LoRA r={LORA_RANK} on {'/'.join(LORA_TARGETS)}; experts "
            "without adapters: peft's target_parameters on the experts runs (our experts path too, "
            "inside peft's ParamWrapper) but builds W + BA for all experts each forward, an "
            "E x 3FH weight per layer kept for backward (~1.2 GB per layer here), and hides the "
            "experts from the planner")


def loss_fn_for(model, ids: torch.Tensor, loss: str) -> Callable[[], torch.Tensor]:
    """``() -> loss`` of one forward on ``ids``: the model's loss, or Liger's."""
    if loss == "liger":
        return lambda: liger_causal_lm_loss(model, ids)
    return lambda: model(input_ids=ids, labels=ids).loss


# ------------------------------------------------------------------ the run
def _new_row(s) -> dict:
    return {"strategy": s.name, "owner": s.owner, "description": s.description, "status": "ok",
            "note": "", "probes": [], "line": None, "time_model": None, "predicted_longest": None,
            "longest": None, "longest_capped": False, "attempts": [], "peak_bytes": None,
            "predicted_peak_bytes": None, "step_s": None, "tokens_per_s": None, "timing": None,
            "next_predicted_peak_bytes": None, "avail_bytes": None, "at_ref": None,
            "bitwise_equal": None}


def _probe(run: FullRun, row: dict, loss_for: Callable[[int], Callable]) -> bool:
    """Warm step, then measured steps at ``unit`` and ``2 * unit``: the peak line and the
    time model.  False when not even ``unit`` fits."""
    u = run.unit
    warm = run.trainer.step(loss_for(u))
    if not warm.ok:
        row.update(longest=0, note=f"does not fit at {u} tokens: {warm.error}")
        return False
    for tokens in (u, 2 * u):
        if 2 * u > run.cap and tokens == 2 * u:
            break
        r = run.trainer.step(loss_for(tokens))
        if not r.ok:
            row["probes"].append({"tokens": tokens, "ok": False, "error": r.error})
            break
        row["probes"].append({"tokens": tokens, "ok": True, "peak_bytes": r.peak_bytes,
                              "step_s": r.step_s, "host_bytes": r.host_bytes})
    good = [p for p in row["probes"] if p["ok"]]
    row["line"] = peak_line([(p["tokens"], p["peak_bytes"]) for p in good])
    c1, c2 = time_model([(p["tokens"], p["step_s"]) for p in good])
    if c2 < run.attn_c2:      # two short probes hardly see attention's L^2: use its FLOPs as a floor
        c1, c2 = max(0.0, c1 - (run.attn_c2 - c2) * good[-1]["tokens"]), run.attn_c2
    row["time_model"] = (c1, c2)
    run.say("    probes: " + ", ".join(f"{p['tokens']}: {p['peak_bytes'] / MiB:.0f} MiB "
                                        f"{p['step_s']:.2f} s" for p in good))
    return True


def _peer_row(run: FullRun, s, row: dict, ref_tokens: Optional[int]) -> None:
    """Probe, predict the longest length, confirm it (stepping down on out of memory),
    then the step at ``ref_tokens`` (HF checkpointing's longest)."""
    model = run.model
    installed = s.install(model_workload(model, run.layers, run.cuda), Context())
    try:
        ids_cache = {}

        def loss_for(tokens):
            if tokens not in ids_cache:
                ids_cache.clear()
                ids_cache[tokens] = make_ids(run.vocab, tokens, "cuda" if run.cuda else "cpu",
                                             run.seed)
            return installed.wrap(loss_fn_for(model, ids_cache[tokens], s.loss))
        if not _probe(run, row, loss_for):
            return
        a, b = row["line"]
        avail = run.trainer.avail_bytes()
        row["avail_bytes"] = avail
        pred = longest_fitting(a, b, avail, run.unit, run.cap)
        host = [(p["tokens"], p["host_bytes"]) for p in row["probes"] if p["ok"] and p.get("host_bytes")]
        if run.host_limit and len(host) >= 2 and host[-1][1] > 64 * MiB:
            # Pinned host memory grows with tokens too (save_on_cpu, HF offload, torchtune):
            # a length past the host's memory would end the process, not just the row.
            ha, hb = peak_line(host)
            by_host = longest_fitting(ha, hb, run.host_limit, run.unit, run.cap)
            row["host_line"] = (ha, hb)
            if by_host < pred:
                row["note"] = (f"limited by pinned host memory: {fmt_bytes(ha + hb * by_host)} of "
                               f"{fmt_bytes(run.host_limit)} allowed at {by_host}")
                pred = by_host
        ran = max(p["tokens"] for p in row["probes"] if p["ok"])
        if pred < ran and not row.get("host_line"):
            pred = ran     # a probe ran there: the line's reserve margin does not undo a measurement
        row["predicted_longest"] = pred
        run.say(f"    predicted longest {pred} tokens (peak {a / MiB:.0f} MiB + {b * run.unit / MiB:.1f} "
                f"MiB per {run.unit} tokens, room {avail / MiB:.0f} MiB, cap {run.cap})")
        length = pred
        limited = row["note"]
        while length >= max(run.unit, pred - 2 * run.unit):   # at most two steps down
            got = timed_at(run, loss_for, length, predict_time(row["time_model"], length), "longest",
                           warm=s.name == "checkpoint")   # its time is every row's reference
            row["attempts"].append(got)
            if got["ok"] is None:           # skipped for time: the prediction stands, unconfirmed
                row["note"] = f"longest {length} predicted, not confirmed ({got['error']})"
                break
            if got["ok"] and limited:
                row["longest_host_limited"] = True
            if got["ok"]:
                row.update(longest=length, peak_bytes=got["peak_bytes"], step_s=got["step_s"],
                           timing=got["timing"], tokens_per_s=length / got["step_s"],
                           predicted_peak_bytes=a + b * length, longest_capped=length >= run.cap,
                           next_predicted_peak_bytes=a + b * (length + run.unit))
                break
            length -= run.unit
            row["note"] = (limited + "; " if limited else "") + f"predicted {pred} did not fit"
        if row["longest"] is None and length < run.unit:
            row["longest"] = 0
        if ref_tokens:
            row["at_ref"] = _at_ref(run, row, loss_for, ref_tokens, a + b * ref_tokens, avail,
                                    warm=False)
    finally:
        installed.remove()
        run.trainer.opt.zero_grad(set_to_none=False)
        cleanup(run.cuda)


def _at_ref(run: FullRun, row: dict, loss_for, ref_tokens: int, predicted_peak: float,
            avail: float, warm: bool = True) -> dict:
    """The step at HF checkpointing's longest length (reused when it is the row's own)."""
    if row["longest"] == ref_tokens and row["step_s"]:
        return {"tokens": ref_tokens, "ok": True, "step_s": row["step_s"],
                "tokens_per_s": row["tokens_per_s"], "peak_bytes": row["peak_bytes"],
                "timing": row["timing"], "error": ""}
    known = row["longest"] if row["longest"] is not None else row["predicted_longest"]
    if known is not None and known < ref_tokens:    # no step past its (host or device) limit
        return {"tokens": ref_tokens, "ok": False, "error": f"longer than its longest "
                f"({known}): predicted peak {fmt_bytes(predicted_peak)}, room "
                f"{fmt_bytes(avail)}" + (f"; {row['note']}" if row["note"] else ""),
                "step_s": None, "tokens_per_s": None}
    got = timed_at(run, loss_for, ref_tokens, predict_time(row["time_model"], ref_tokens),
                   "at checkpointing's longest", warm=warm)
    got["tokens_per_s"] = ref_tokens / got["step_s"] if got["ok"] else None
    return got


def run_full(cfg, log=sys.stderr, on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """The full-model run -> ``{"setup", "rows", "ours"}`` (see the module docstring).
    ``on_row(result_so_far)`` after every row (the CLI rewrites its JSON: a run cut short
    keeps what it measured)."""
    t_start = time.monotonic()
    cuda = cfg.is_cuda
    dims = dict(QWEN3_FULL if cuda else QWEN3_FULL_TINY)
    dtype = cfg.torch_dtype if cuda else torch.float32
    unit = cfg.unit
    if cuda:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        device_bytes = free + torch.cuda.memory_reserved()
    else:
        device_bytes = None
    if cfg.layers_explicit:
        layers, layer_note = cfg.layers_explicit, f"{cfg.layers_explicit} layers (--layers)"
    elif cuda:
        layers, layer_note = layers_that_fit(dims, total, 2)
    else:
        layers, layer_note = dims["num_hidden_layers"], "CPU: tiny config"
    print(f"full model: {layer_note}", file=log, flush=True)
    t0 = time.monotonic()
    model, params, train_note = build_full(dims, cfg.device, dtype, cfg.seed, layers, 4 * cfg.cap)
    build_s = time.monotonic() - t0
    print(f"built in {build_s:.1f} s; {train_note}", file=log, flush=True)
    if not cuda:
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        device_bytes = wbytes + cfg.device_memory_mib * MiB
    try:
        from ..plan.fit import RESERVE_FRACTION, RESERVE_MIN_BYTES
    except ImportError:
        RESERVE_FRACTION, RESERVE_MIN_BYTES = 0.03, GiB
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * device_bytes)) if cuda else MiB
    trainer = Trainer(model, params, cuda, device_bytes, reserve)
    deadline = Deadline(cfg.time_budget - (time.monotonic() - t_start), margin_s=20.0 if cuda else 0.0)
    host_avail = host_available_bytes() if cuda else None
    run = FullRun(model, model.model.layers, trainer, cuda, unit, cfg.cap, dims["vocab_size"],
                  cfg.seed, deadline, log, cfg.progress, {},
                  attention_c2(dims, layers) if cuda else 0.0,
                  int(0.8 * host_avail) if host_avail else None)
    setup = {"dims": dims, "layers": layers, "layer_note": layer_note, "train_note": train_note,
             "trainable_params": sum(p.numel() for p in params),
             "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
             "device_bytes": int(device_bytes), "reserve_bytes": reserve, "unit": unit,
             "cap": cfg.cap, "build_s": build_s, "time_budget_s": cfg.time_budget,
             "host_limit_bytes": run.host_limit}
    rows, ours_info = [], {}
    wanted = set(cfg.strategies) if cfg.strategies else None
    ref_tokens = None
    strategies = full_strategies()
    for s in strategies:
        if wanted is not None and s.name not in wanted and s.name != "checkpoint":
            continue
        row = _new_row(s)
        why = s.requires() if s.requires else None
        print(f"[{len(rows) + 1}/{len(strategies)}] {s.name} ({deadline.left():.0f} s left)",
              file=log, flush=True)
        if why:
            row.update(status="skipped", note=why)
        elif deadline.left() < 30:
            row.update(status="skipped", note="time budget spent")
        else:
            try:
                if s.name == "ours":
                    from .full_ours import ours_row
                    ours_info = ours_row(run, row, ref_tokens) or {}
                else:
                    _peer_row(run, s, row, ref_tokens if s.name != "checkpoint" else None)
            except Skip as e:
                row.update(status="skipped", note=str(e))
            except Exception as e:   # noqa: BLE001 - a failing row is reported, not fatal
                row.update(status="error", note=f"{type(e).__name__}: {e}"[:400])
                trainer.opt.zero_grad(set_to_none=False)
                cleanup(cuda)
        if row.get("time_model") and s.name != "ours":
            run.time_models[s.name] = row["time_model"]
            run.time_models.setdefault("_any", row["time_model"])
        if s.name == "checkpoint" and row["status"] == "ok" and row["longest"]:
            ref_tokens = row["longest"]
            row["at_ref"] = _at_ref(run, row, None, ref_tokens, 0, 0)
            if not cfg.cap_explicit and 2 * ref_tokens > run.cap and not row["longest_capped"]:
                setup["cap_note"] = (f"cap raised from {run.cap} to {2 * ref_tokens}: twice HF "
                                     f"checkpointing's longest")
                run.cap = 2 * ref_tokens
                setup["cap"] = run.cap
        rows.append(row)
        print("  " + _row_line(row, run.cap), file=log, flush=True)
        if on_row is not None:
            setup["elapsed_s"] = time.monotonic() - t_start
            try:
                on_row({"setup": setup, "rows": rows, "ours": ours_info})
            except Exception as e:   # noqa: BLE001 - a failed write is reported, not fatal
                print(f"  (partial report not written: {type(e).__name__}: {e})", file=log, flush=True)
    setup["ref_tokens"] = ref_tokens
    setup["elapsed_s"] = time.monotonic() - t_start
    return {"setup": setup, "rows": rows, "ours": ours_info}


# ------------------------------------------------------------------ report
def _longest_text(row: dict) -> str:
    if row["longest"] is None:
        return "-"
    if row["longest"] == 0:
        return "none fits"
    return f">= {row['longest']}" if row["longest_capped"] else str(row["longest"])


def _row_line(row: dict, cap: int) -> str:
    if row["status"] != "ok":
        return f"{row['strategy']}: [{row['status']}] {row['note']}"
    tps = row["tokens_per_s"]
    return (f"{row['strategy']}: longest {_longest_text(row)} (cap {cap})"
            + (f", {tps:.0f} tokens/s" if tps else "") + (f" ({row['note']})" if row["note"] else ""))


def _size(v, scale: int) -> str:
    return "-" if v is None else f"{v / scale:.2f}"


def full_targets(rows: list) -> list:
    """The issue's full-depth targets on this run: ``[{"target", "status", "detail"}]``."""
    by = {r["strategy"]: r for r in rows if r["status"] == "ok"}
    out = []

    def add(target, ok, detail):
        out.append({"target": target, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": detail})
    ck, us = by.get("checkpoint"), by.get("ours")
    if ck and ck.get("longest_capped"):
        add("our longest sequence >= 2x HF checkpointing's", None,
            f"HF checkpointing reached the cap ({ck['longest']}): raise --cap")
    elif ck and us and ck["longest"] and us["longest"] is not None:
        capped = " (ours reached the cap)" if us["longest_capped"] else ""
        add("our longest sequence >= 2x HF checkpointing's", us["longest"] >= 2 * ck["longest"],
            f"ours {us['longest']}{capped} vs checkpointing {ck['longest']}: "
            f"{us['longest'] / ck['longest']:.2f}x")
    else:
        add("our longest sequence >= 2x HF checkpointing's", None, "a row did not run")
    ours_ref = (us or {}).get("at_ref") or {}
    ck_ref = (ck or {}).get("at_ref") or {}
    if ours_ref.get("tokens_per_s") and ck_ref.get("tokens_per_s"):
        x = ours_ref["tokens_per_s"] / ck_ref["tokens_per_s"]
        add("at HF checkpointing's longest: our tokens/s >= 1.25x its", x >= 1.25,
            f"{ours_ref['tokens_per_s']:.0f} vs {ck_ref['tokens_per_s']:.0f} tokens/s at "
            f"{ck_ref['tokens']} tokens: {x:.2f}x")
    else:
        add("at HF checkpointing's longest: our tokens/s >= 1.25x its", None, "not measured")
    plans = (us or {}).get("plans") or []
    measured = [p for p in plans if p.get("peak_bytes") and p.get("predicted_peak_bytes")]
    if measured:
        errs = [(p["tokens"], p["peak_bytes"] / p["predicted_peak_bytes"] - 1) for p in measured]
        add("predicted peak within 5% of measured (our plan rows)", all(abs(e) <= 0.05 for _, e in errs),
            ", ".join(f"{t}: {e:+.1%}" for t, e in errs))
    else:
        add("predicted peak within 5% of measured (our plan rows)", None, "no plan step measured")
    if us is not None and us.get("bitwise_equal") is not None:
        detail = us.get("bitwise_detail", "")
        add("gradients bitwise equal to the same model without a plan", us["bitwise_equal"] is True
            or bool(us.get("math_changing")), detail)
    else:
        add("gradients bitwise equal to the same model without a plan", None, "not checked")
    return out


def format_full_report(result: dict) -> str:
    """The table (one line per strategy), the comparison at checkpointing's longest, the
    plans, and the targets."""
    st, rows = result["setup"], result["rows"]
    cap = st["cap"]
    scale, un = (GiB, "GiB") if st["device_bytes"] >= 4 * GiB else (MiB, "MiB")
    lines = [f"full model: {st['layer_note']}; {st['train_note']}"
             + (f"; {st['cap_note']}" if st.get("cap_note") else ""),
             f"trainable {st['trainable_params'] / 1e6:.1f} M params; weights "
             f"{st['weight_bytes'] / GiB:.1f} GiB; device {st['device_bytes'] / GiB:.1f} GiB "
             f"(reserve {st['reserve_bytes'] / GiB:.2f} GiB); lengths: multiples of {st['unit']}, "
             f"cap {cap}; time budget {st['time_budget_s']:.0f} s, used {st.get('elapsed_s', 0):.0f} s",
             "", f"{'strategy':<18} {'owner':<8} {'longest':>9} {'pred':>7} {'tok/s':>8} "
             f"{'peak ' + un:>9} {'pred ' + un:>9} {'next ' + un:>9} {'room ' + un:>9}  "
             f"{'@ref tok/s':>10} {'@ref x':>6}", "-" * 112]
    ref = st.get("ref_tokens")
    ck_ref = next((r["at_ref"] for r in rows if r["strategy"] == "checkpoint" and r.get("at_ref")), None)

    def cold(timing) -> str:
        return "*" if timing and str(timing).startswith("cold") else ""
    for r in rows:
        head = f"{r['strategy']:<18} {r['owner']:<8}"
        if r["status"] != "ok":
            lines.append(f"{head} [{r['status']}] {r['note']}")
            continue
        at = r.get("at_ref") or {}
        tps = at.get("tokens_per_s")
        x = tps / ck_ref["tokens_per_s"] if tps and ck_ref and ck_ref.get("tokens_per_s") else None
        lines.append(
            f"{head} {_longest_text(r):>9} {str(r['predicted_longest'] or '-'):>7} "
            f"{(format(r['tokens_per_s'], '.0f') + cold(r.get('timing')) if r['tokens_per_s'] else '-'):>8} "
            f"{_size(r['peak_bytes'], scale):>9} {_size(r['predicted_peak_bytes'], scale):>9} "
            f"{_size(r['next_predicted_peak_bytes'], scale):>9} {_size(r['avail_bytes'], scale):>9}  "
            f"{(format(tps, '.0f') + cold(at.get('timing')) if tps else '-'):>10} "
            f"{(format(x, '.2f') if x else '-'):>6}"
            + (f"  note: {r['note']}" if r["note"] else "")
            + (f"  @ref: {at['error']}" if at.get("error") else ""))
    lines += ["", f"longest: one sequence, the longest multiple of {st['unit']} whose step (forward + "
              f"backward + AdamW step) fits; pred = predicted from the probes (peers: peak line "
              f"through {st['unit']} and {2 * st['unit']} tokens; ours: fit's figures measured at "
              f"{st['unit']} and scaled); next = predicted peak one {st['unit']} longer; room = what a "
              f"step may use above its start (ours: fit's activation budget); @ref = at HF checkpointing's "
              f"longest ({ref}); * = one cold step (a step over {WARM_ALWAYS_S:.0f} s runs once: time budget; "
              f"HF checkpointing and ours at its longest always run a warm second step); peak = "
              f"max_memory_allocated above the step start (gradients held across steps)"]
    if st["device_bytes"] < 4 * GiB:
        lines.append("CPU: an emulated device; peaks are the profiler's host bytes (offload copies "
                     "count too), so the memory and speed targets need a GPU: this run checks the "
                     "plumbing")
    ours = result.get("ours") or {}
    if ours.get("text"):
        lines += ["", ours["text"]]
    lines += ["", "targets (issue 16, full depth)"]
    lines += [f"  {c['status']:<5} {c['target']}: {c['detail']}" for c in full_targets(rows)]
    return "\n".join(lines)
