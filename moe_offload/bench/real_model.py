"""The slice benchmark (``python -m moe_offload --model slice``, the CPU default; the GPU
default is the full-depth run of :mod:`~moe_offload.bench.full_model`): a Hugging Face
Qwen3-MoE built from a config (random weights, no download), the peers, and our planner's
plans budgeted at each peer's measured step PEAK (max allocated above the step start:
``budget_bytes`` is the peak), at half of it, and at <= 1.03x of no plan's step time.

The model on a GPU is a slice of Qwen3-30B-A3B: hidden 2048, 32 query / 4 KV heads of 128,
128 experts, top-8, expert ffn 768, 8 decoder layers, vocab 32768, bf16, SDPA, the router
aux loss in the loss (``output_router_logits=True``), one sequence of ``--seq`` tokens
(8192 by default).  On the CPU a tiny version runs in seconds (engine in emulate mode).

Every row runs in this process on the same weights and tokens.  Per row: ``warmup``
untimed and ``iters`` timed steps (forward = ``model(ids, labels=ids).loss``, backward =
``loss.backward()``; median), one step measuring activation memory (allocated after the
forward minus before, from a clean state: previous graph freed, ``gc.collect()``,
parameter gradients allocated), then one *check* step for gradients.

Bitwise gradients: the check step runs under :func:`deterministic_check`: strict
``torch.use_deterministic_algorithms(True)`` (``warn_only=False``: with ``warn_only``
torch 2.11 warns and still runs cuDNN attention's non-deterministic backward, which made
every row of the first H200 run read NO), ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before
cuBLAS starts, SDPA limited to flash attention (deterministic backward in strict mode) or
math, and integer ``histc`` exempted (exact in any order).  Every row's gradients are
compared with ``none``'s check step, and ``none`` is checked against itself (a second
check step) so a non-deterministic kernel shows as ``none`` failing, not as a false alarm
on a plan row.  A check step that raises (an op without a deterministic kernel) leaves the
row's timings and says why in its note.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .measure import grads_bitwise_equal, measure_memory, time_steps
from .peers import PEERS, install_peer, torchtune_available

__all__ = ["QWEN3_SLICE", "QWEN3_TINY", "build_qwen3", "real_rows", "run_real", "target_checks",
           "format_targets", "format_slice_table", "max_rel_error", "plan_math_changing"]

# hidden, heads, kv heads, head dim, experts, top-k, expert ffn, layers, vocab, dense ffn
QWEN3_SLICE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                   num_hidden_layers=8, vocab_size=32768, intermediate_size=6144)
QWEN3_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  num_hidden_layers=4, vocab_size=256, intermediate_size=128)

# Peers whose memory our plans are asked to match (and halve).
BUDGET_PEERS = ("checkpoint", "sac", "save_on_cpu+ckpt", "hf_offload", "torchtune+ckpt")
TIME_TOL = 1.03
# plan@time is solved for TIME_TOL x none's measured step, less this margin for the
# prediction error.  1%: since the recompute options are calibrated on pooled probe samples
# (plan.calibrate_recompute), the error of recompute-only plans should be ~1-2%; the 3% of the
# third H200 run left no room for the mix the memory target needs (norms+fc1 on every layer is
# 1.00x, each layer moved to norms+mlp adds ~1.3 ms for 261 MiB: 3 such layers = 1.023x, 0.39x).
TIME_MARGIN = 0.01


def time_limit(none_step_s: Optional[float], ours_none_s: float) -> tuple:
    """``(max_step_s, why)`` of plan@time: ``TIME_TOL`` x the ``none`` row's measured step
    (Hugging Face's experts, the baseline of every ratio) x ``(1 - TIME_MARGIN)``; without
    a ``none`` row, the same factor on our no-plan step."""
    base, name = (none_step_s, "none") if none_step_s else (ours_none_s, "no plan on our experts")
    limit = TIME_TOL * base * (1 - TIME_MARGIN)
    return limit, (f"solved for <= {limit * 1e3:.2f} ms = {TIME_TOL} x {name} "
                   f"{base * 1e3:.2f} ms x (1 - {TIME_MARGIN} margin)")


def build_qwen3(dims: dict, seq: int, device: str, dtype: torch.dtype, seed: int,
                layers: Optional[int] = None):
    """``(model, ids)``: Qwen3-MoE from a config (SDPA, grouped_mm experts, aux loss on),
    random weights seeded by ``seed``, in train mode; ``ids`` ``(1, seq)``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    kw = dict(dims)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = Qwen3MoeConfig(**kw, output_router_logits=True, router_aux_loss_coef=0.001,
                         max_position_embeddings=max(seq, 4096), use_cache=False)
    cfg._attn_implementation = "sdpa"
    try:
        cfg._experts_implementation = "grouped_mm"     # HF's batched grouped GEMM path
    except Exception:   # a transformers without that switch keeps its default
        pass
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to(dtype).train()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
    return model, ids


@dataclass
class _Row:
    name: str
    family: str
    owner: str
    description: str


def real_rows(torchtune: bool) -> list:
    """The rows in run order (peers first: the plans' budgets are their measured memory)."""
    desc = {"none": "no saving trick", "checkpoint": "HF gradient checkpointing (torch, non-reentrant)",
            "sac": "torch selective checkpointing (save mm/grouped_mm/SDPA outputs)",
            "save_on_cpu+ckpt": "torch save_on_cpu (pinned) + checkpointing",
            "hf_offload": "HF checkpointing with offload=True (save_on_cpu per layer)",
            "torchtune": "torchtune OffloadActivations",
            "torchtune+ckpt": "torchtune OffloadActivations + checkpointing"}
    rows = [_Row(p, p if p == "none" else "peer", "baseline" if p == "none" else "peer", desc[p])
            for p in PEERS if torchtune or not p.startswith("torchtune")]
    for peer in BUDGET_PEERS:
        if peer.startswith("torchtune") and not torchtune:
            continue
        rows.append(_Row(f"plan@{peer}", "planned", "ours", f"planner: fastest within {peer}'s step peak"))
        rows.append(_Row(f"plan@half-{peer}", "planned", "ours",
                         f"planner: fastest within half of {peer}'s step peak"))
    rows.append(_Row("plan@time", "planned", "ours",
                     f"planner: least memory predicted within {TIME_TOL}x of none's measured time "
                     f"less a {TIME_MARGIN:.0%} margin (target: measured <= {TIME_TOL}x)"))
    return rows


def _params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _grads(params, to_cpu: bool) -> list:
    return [None if p.grad is None else (p.grad.detach().to("cpu", copy=True) if to_cpu
                                         else p.grad.detach().clone()) for p in params]


class _IntegerHistc(torch.overrides.TorchFunctionMode):
    """Lets ``torch.histc`` on *integer* input run in strict deterministic mode.

    torch flags ``histc`` on CUDA as non-deterministic for every dtype (float bins are
    atomic float adds), so strict mode raises on Hugging Face's expert counts (its
    ``grouped_mm`` experts and the router aux loss count tokens per expert with an int32
    ``histc``).  Integer atomic adds give the same counts in any order: the result is
    bitwise reproducible, so the flag is lifted for exactly that call.  The mode is part
    of autograd's thread-local state, so it also covers recomputation in backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.histc, torch.Tensor.histc) and args and \
                isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            torch.use_deterministic_algorithms(False)
            try:
                return func(*args, **kwargs)
            finally:
                torch.use_deterministic_algorithms(True, warn_only=False)
        return func(*args, **kwargs)


def check_attention_backends(cuda: bool) -> list:
    """The SDPA backends the check step allows: on CUDA flash attention (whose backward
    takes its deterministic kernel under strict deterministic mode; torch 2.11's cuDNN
    attention backward has no such switch) with math (deterministic) as the fallback;
    on the CPU every backend (the CPU kernels are deterministic)."""
    from torch.nn.attention import SDPBackend
    if cuda:
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    return [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b is not None]


CHECK_MODES = ("strict", "math")


@contextlib.contextmanager
def deterministic_check(cuda: bool, mode: str = "strict"):
    """The context of a check step.

    ``"strict"``: ``torch.use_deterministic_algorithms(True)`` with ``warn_only=False`` (an
    op without a deterministic kernel raises instead of warning), integer ``histc``
    exempted (:class:`_IntegerHistc`), SDPA limited to :func:`check_attention_backends`.
    ``"math"`` (the fallback when a strict step raised): deterministic algorithms with
    ``warn_only=True`` (ops with a deterministic variant take it; others warn) and SDPA
    limited to the math backend, whose backward is plain matmuls and softmax.  cuBLAS
    needs ``CUBLAS_WORKSPACE_CONFIG`` set before it starts (the CLI sets ``:4096:8`` first
    thing); it is checked here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    if cuda and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        raise RuntimeError("deterministic check: CUBLAS_WORKSPACE_CONFIG must be :4096:8 or "
                           ":16:8 before CUDA starts (python -m moe_offload sets it)")
    old = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    strict = mode == "strict"
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    backends = check_attention_backends(cuda) if strict else [SDPBackend.MATH]
    try:
        with sdpa_kernel(backends), (_IntegerHistc() if strict else contextlib.nullcontext()):
            yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _check_step(step, params, cuda: bool = False, mode: str = "strict") -> list:
    for p in params:
        p.grad = None
    torch.manual_seed(1234)
    with deterministic_check(cuda, mode):
        loss = step()
        loss.backward()
    del loss
    return _grads(params, to_cpu=True)


def _row_check(step, params, cuda: bool) -> tuple:
    """``(grads, mode, errors)``: the first check mode whose step does not raise."""
    errors = []
    for mode in CHECK_MODES:
        try:
            return _check_step(step, params, cuda, mode), mode, errors
        except RuntimeError as e:
            errors.append(f"{mode}: {type(e).__name__}: {e}"[:200])
            for p in params:
                p.grad = None
    return None, None, errors


def _bitwise(row: dict, name: str, step, params, refs: dict, ref_key: str, cuda: bool) -> tuple:
    """The row's check step(s).  ``none`` is compared with a second check step of itself
    and becomes the reference of its experts (``ref_key``) in that mode.  Other rows
    return ``(grads, mode)`` to compare once their strategy is removed (the reference is
    computed then when this mode has none yet)."""
    grads, mode, errors = _row_check(step, params, cuda)
    row["check_mode"] = mode
    if errors:
        row["check_errors"] = errors
    if grads is None:
        row["bitwise_equal"] = None
        row["note"] = "every check step raised: " + "; ".join(errors)
        return None, None
    if name == "none":
        refs[(ref_key, mode)] = grads
        again = _check_step(step, params, cuda, mode)
        row["bitwise_equal"] = grads_bitwise_equal(again, grads)
        if not row["bitwise_equal"]:
            row["note"] = "two deterministic check steps differ: bitwise checks unreliable"
        return None, None
    return grads, mode


def run_real(cfg, progress: Callable = None, log=sys.stderr) -> dict:
    """Run every row of the real-model benchmark -> ``{"rows", "planner"}``; rows carry the
    same keys as the synthetic benchmark's (ratios are added by ``derive``)."""
    from ..plan import measure_model
    from .peers import use_our_experts
    from ..plan.memory_plan import candidates, choose
    from ..offload import release_lag

    cuda = cfg.is_cuda
    if cuda:   # deterministic cuBLAS for the check steps (read when cuBLAS starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dims = QWEN3_SLICE if cuda else QWEN3_TINY
    model, ids = build_qwen3(dims, cfg.seq, cfg.device, cfg.torch_dtype, cfg.seed,
                             layers=cfg.layers_explicit)
    layers = model.model.layers
    params = _params(model)

    def base_step():
        return model(input_ids=ids, labels=ids).loss

    threshold = 256 * 1024 if cuda else 1024
    rows, refs, peak_of, step_of, figures, cands = [], {}, {}, {}, None, None
    ref_key = "hf"                     # which experts the reference check steps ran on
    plan_info = {}
    cal_shown = False
    specs = real_rows(torchtune_available())
    if cfg.strategies:
        keep = set(cfg.strategies) | {"none"}
        specs = [s for s in specs if s.name in keep or s.family in keep]
    items = [("qwen3", s) for s in specs]
    for _, spec in (progress(items, cfg.progress, "qwen3") if progress else items):
        row = {"stack": "qwen3", "base_stack": "qwen3", "strategy": spec.name, "family": spec.family,
               "owner": spec.owner, "description": spec.description, "reference": "none",
               "status": "ok", "note": "", "output_bytes": 0, "plan": None, "prefetch_layers": None}
        installed, pending = None, (None, None)
        try:
            if spec.name == "hf_offload" and not cuda:
                raise _Skip("HF's offload pins host memory: it needs an accelerator")
            if spec.family == "planned" and "ours_experts" not in plan_info:
                # Plans run on our experts when the transformers integration exists; their
                # gradients are then compared with a no-plan step on our experts.
                try:
                    plan_info["ours_experts"] = use_our_experts(model)
                except Exception as e:  # the integration misbehaved: plan on HF's experts
                    plan_info["ours_experts"] = False
                    plan_info["ours_experts_error"] = f"{type(e).__name__}: {e}"[:300]
                if plan_info["ours_experts"]:
                    ref_key = "ours"       # references on our experts, computed when needed
                    plan_info["reference"] = "none on our experts (the integration's kernels)"
            if spec.family == "planned":
                row["reference"] = "none+ours_experts" if plan_info["ours_experts"] else "none"
                if figures is None:
                    figures = measure_model(model, base_step, layers, min_offload_bytes=threshold,
                                            iters=max(1, cfg.iters // 2), warmup=min(1, cfg.warmup))
                    cands = candidates(figures[1])
                    plan_info["measured"] = _figures_summary(figures[1])
                    plan_info["calibration"] = dict(figures[1].calibration)
                if spec.name == "plan@time":
                    limit, why = time_limit(step_of.get("none"), figures[1].step_none_s)
                    plan = choose(model, layers, figures[1], cands, None, max_step_s=limit,
                                  min_offload_bytes=threshold, emulate=not cuda)
                    row["note"] = why
                else:
                    peer = spec.name.split("@", 1)[1]
                    frac = 0.5 if peer.startswith("half-") else 1.0
                    peer = peer[5:] if peer.startswith("half-") else peer
                    if peer not in peak_of:
                        raise _Skip(f"{peer} has no measured peak")
                    budget = int(peak_of[peer] * frac)      # the peak is the budget (issue 16)
                    low = min(c.peak_bytes for c in cands)
                    if budget < low and frac < 1 and peak_of[peer] < low:
                        raise _Skip(f"same plan as plan@{peer}: both budgets are below the "
                                    f"least peak any plan reaches ({low / 2**20:.1f} MiB)")
                    if budget < low:
                        # Below what any plan reaches: run at the least peak and say so.
                        row["note"] = minimum_note(figures[1], cands, budget, step_of.get("none"))
                        row["requested_budget_bytes"] = budget
                        budget = low
                    plan = choose(model, layers, figures[1], cands, budget,
                                  min_offload_bytes=threshold, emulate=not cuda)
                handle = plan.apply()
                installed = _plan_installed(handle)
                row["plan"] = {"predicted_s": plan.predicted_step_s,
                               "predicted_bytes": plan.predicted_activation_bytes,
                               "predicted_peak_bytes": plan.predicted_peak_bytes,
                               "peak_moment": plan.peak_moment,
                               "head": getattr(plan.prediction, "head", "none"),
                               "math_changing": plan_math_changing(plan),
                               "budget_bytes": plan.budget_bytes,
                               "prefetch_layers": plan.prefetch_layers,
                               "offloaded_layers": plan.prediction.engine_layers,
                               "choices": [str(c) for c in plan.choices]
                               + (["loss:ckpt"] if plan.prediction.loss_checkpoint else []),
                               "describe": plan.describe()}
                if not cal_shown:          # printed once, above the first plan's table
                    cal_shown = True
                    row["plan"]["calibration_text"] = calibration_text(figures[1])
                row["prefetch_layers"] = plan.prefetch_layers
                row["offloaded_layers"] = plan.prediction.engine_layers
            else:
                installed = install_peer(spec.name, model, layers, cuda)
            step = installed.wrap(base_step)
            _measure_row(row, step, params, cfg, cuda, getattr(installed, "reset", None))
            d2h, h2d = installed.moved_bytes()
            row.update(d2h_bytes=int(d2h), h2d_bytes=int(h2d), engine_stats=installed.stats())
            pending = _bitwise(row, spec.name, step, params, refs, ref_key, cuda)
            if spec.owner in ("peer", "baseline"):
                peak_of[spec.name] = row["peak_step_bytes"]
                step_of[spec.name] = row["step_s"]
        except _Skip as e:
            row.update(status="skipped", note=str(e))
        except Exception as e:  # a failing strategy is a row, not the end of the run
            row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
        finally:
            if installed is not None:
                installed.remove()
            for p in params:
                p.grad = None
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        grads, mode = pending
        if grads is not None:          # compare with the reference now that nothing is installed
            try:
                if (ref_key, mode) not in refs:
                    refs[(ref_key, mode)] = _check_step(base_step, params, cuda, mode)
                row["bitwise_equal"] = grads_bitwise_equal(grads, refs[(ref_key, mode)])
                if not row["bitwise_equal"]:
                    row["grad_max_rel_error"] = max_rel_error(grads, refs[(ref_key, mode)])
            except RuntimeError as e:
                row["bitwise_equal"] = None
                row["note"] = f"reference check step raised: {type(e).__name__}: {e}"[:300]
            finally:
                for p in params:
                    p.grad = None
            del grads
        rows.append(row)
        if cfg.progress:
            print(f"  qwen3 {spec.name}: " + (
                f"step {row['step_s'] * 1e3:.2f} ms, act {row['act_bytes'] / 2**20:.1f} MiB, "
                f"d2h {row['d2h_bytes'] / 1e6:.1f} MB, bitwise {row['bitwise_equal']}"
                if row["status"] == "ok" else f"[{row['status']}] {row['note']}"), file=log, flush=True)
    return {"rows": rows, "planner": plan_info}


class _Skip(Exception):
    pass


def _plan_installed(handle):
    from .peers import Installed

    def moved():
        s = handle.stats()
        return int(s.get("offloaded_bytes", 0)), int(s.get("reloaded_bytes", 0))

    def stats():
        return {k: v for k, v in handle.stats().items() if isinstance(v, (int, float, str, bool))}
    inst = Installed(remove=handle.remove, moved=moved, stats=stats)
    inst.reset = handle.reset_stats
    return inst


def _measure_row(row: dict, step, params, cfg, cuda: bool, reset=None) -> None:
    def before():
        for p in params:
            p.grad = None

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
    for p in params:                      # weight grads exist, as after the first step
        p.grad = torch.zeros_like(p)
    gc.collect()
    if reset is not None:
        reset()                           # the moved bytes of the memory step only
    mem = measure_memory(step, backward, cuda)
    row.update(fwd_s=t.fwd_s, bwd_s=t.bwd_s, step_s=t.step_s, all_step_s=t.all_step_s,
               act_bytes=mem.act_bytes, peak_bytes=mem.peak_bytes, base_bytes=mem.base_bytes,
               peak_step_bytes=mem.peak_bytes - mem.base_bytes, memory_source=mem.source)


def minimum_note(f, cands, budget: int, none_step_s: Optional[float]) -> str:
    """Why the peak ``budget`` is out of reach: the least peak any plan reaches, what sets it,
    and what the least-peak plan keeps after the forward."""
    from ..plan.solve import resident_bytes
    best = min(cands, key=lambda c: (c.peak_bytes, c.step_s))
    lay = sum(resident_bytes(lf.groups[c.recompute], c.offload)
              for lf, c in zip(f.layers, best.choices))
    base = none_step_s or f.step_none_s
    return (f"peak budget {budget / 2**20:.1f} MiB is below the least peak any plan reaches, "
            f"{best.peak_bytes / 2**20:.1f} MiB (set by the {best.peak_moment or 'step'}); that plan "
            f"keeps {best.act_bytes / 2**20:.1f} MiB after the forward ({lay / 2**20:.1f} MiB in the "
            f"layers, {(best.act_bytes - lay) / 2**20:.1f} MiB outside them that no option moves); "
            f"run at that minimum, predicted {best.step_s / base:.2f}x none's time")


def max_rel_error(got: list, ref: list) -> float:
    """``max |got - ref| / max |ref|`` over every gradient (float64)."""
    num = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got, ref)
               if a is not None and b is not None), default=0.0)
    den = max((float(b.double().abs().max()) for b in ref if b is not None), default=0.0)
    return num / den if den else num


def plan_math_changing(plan) -> bool:
    """True when the plan's head option changes the math (a chunked loss, not bitwise)."""
    head = getattr(plan.prediction, "head", "none")
    hf = plan.figures.heads.get(head) if hasattr(plan.figures, "heads") else None
    return bool(hf is not None and not getattr(hf, "exact", True))


def _figures_summary(f) -> dict:
    return {"step_none_s": f.step_none_s, "act_none_bytes": f.act_none_bytes,
            "pre_fwd_s": f.pre_fwd_s, "post_fwd_s": f.post_fwd_s,
            "loss_saved_bytes": f.loss_saved_bytes, "loss_extra_s": f.loss_extra_s,
            "attention_s_per_GB": f.attention_s_per_byte * 1e9,
            "block_s_per_GB": f.block_s_per_byte * 1e9,
            "d2h_Bps": f.d2h_Bps, "h2d_Bps": f.h2d_Bps,
            "layer_fwd_s": [l.fwd_s for l in f.layers],
            "extra_s": f.layers[0].extra_s,
            "layer0_saved_bytes": {k: sum(v.values()) for k, v in f.layers[0].groups.items()}}


def target_checks(rows: list) -> list:
    """The targets on this run: ``[{"target", "status", "detail"}]``.  Budgets are the
    peers' measured step peaks (issue 16); ``plan@time`` keeps issue 11's target."""
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
        if r is not None and r.get("requested_budget_bytes") is not None:
            add(f"at {peer}'s peak: <= 1.15x none's time", False,
                f"{txt(r)}: peak target out of reach: {r['note']}")
            continue
        add(f"at {peer}'s peak: <= 1.15x none's time",
            None if r is None else r["time_x"] <= 1.15, txt(r) if r else "row did not run")
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


def _x(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


SLICE_COLUMNS = (("strategy", 22, "<"), ("owner", 8, "<"), ("step ms", 9, ">"), ("time x", 7, ">"),
                 ("act MiB", 9, ">"), ("act x", 6, ">"), ("PEAK MiB", 9, ">"), ("peak x", 6, ">"),
                 ("D2H MB", 8, ">"), ("H2D MB", 8, ">"), ("bitwise", 7, ">"))


def _cells(cells) -> str:
    return " ".join(format(str(c), f"{a}{w}") for c, (_, w, a) in zip(cells, SLICE_COLUMNS)).rstrip()


def format_slice_table(rows: list) -> str:
    """The slice's table: time, memory after the forward, and the step PEAK (max allocated
    above the step start, parameter gradients allocated) with its ratio to none's; under
    each plan row its budget (a peer's peak), predicted against measured step and peak."""
    mib = 2 ** 20
    out = [_cells([c[0] for c in SLICE_COLUMNS]), "-" * (sum(c[1] + 1 for c in SLICE_COLUMNS) - 1)]
    for r in rows:
        head = [r["strategy"], r["owner"]]
        if r["status"] != "ok":
            out.append(_cells(head) + f"  [{r['status']}] {r['note']}")
            continue
        bit = {True: "yes", False: "NO", None: "n/a"}[r.get("bitwise_equal")]
        if r.get("bitwise_equal") is False and (r.get("plan") or {}).get("math_changing"):
            bit = "math"
        out.append(_cells(head + [
            f"{r['step_s'] * 1e3:.2f}", _x(r.get("time_x"), ".2f"), f"{r['act_bytes'] / mib:.1f}",
            _x(r.get("act_x")), f"{r['peak_step_bytes'] / mib:.1f}", _x(r.get("peak_x")),
            f"{r['d2h_bytes'] / 1e6:.1f}", f"{r['h2d_bytes'] / 1e6:.1f}", bit]))
        p = r.get("plan")
        if p:
            pk = p.get("predicted_peak_bytes") or 0
            budget = "" if p.get("budget_bytes") is None else f"peak budget {p['budget_bytes'] / mib:.1f} MiB; "
            out.append(f"{'':>4}plan: {' '.join(p['choices'])}, prefetch {p['prefetch_layers']}; {budget}"
                       f"predicted {p['predicted_s'] * 1e3:.2f} ms / peak {pk / mib:.1f} MiB"
                       + (f" ({p['peak_moment']})" if p.get("peak_moment") else "")
                       + f", measured {r['step_s'] * 1e3:.2f} ms / peak {r['peak_step_bytes'] / mib:.1f} MiB "
                       f"(x{_x(r.get('step_over_predicted'), '.2f')} / x{r['peak_step_bytes'] / max(pk, 1):.3f})"
                       + (f"; math-changing head {p.get('head')}: max rel grad error "
                          f"{_x(r.get('grad_max_rel_error'), '.1e')}" if p.get("math_changing") else ""))
            if r.get("note"):
                out.append(f"{'':>4}note: {r['note']}")
    return "\n".join(out)


def format_targets(checks: list) -> str:
    """One line per target."""
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
    return ("bitwise: one check step per row vs none's (plans: vs none on our experts), seeded, "
            "under strict torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG="
            ":4096:8, SDPA flash (deterministic backward) or math, integer histc exempted; "
            "fallback when strict raises: math SDPA, warn-only [" + (used or "no check ran") + "]")


def calibration_text(f) -> str:
    """The planner's measured recompute costs (whole model, per option: pooled median step
    minus no plan's, and what the first pass alone measured) and offload probes, one line
    each."""
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


def format_plans(rows: list) -> str:
    """The planner's calibration, then each plan row's per-layer table
    (``MemoryPlan.describe``)."""
    out = []
    for r in rows:
        if r["status"] == "ok" and r.get("plan"):
            if r["plan"].get("calibration_text"):
                out.append(r["plan"]["calibration_text"])
            out.append(f"{r['strategy']}:\n{r['plan']['describe']}")
    return "\n\n".join(out)
