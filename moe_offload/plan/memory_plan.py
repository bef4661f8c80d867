"""``plan_memory``: measure a model, pick the fastest keep/offload/recompute mix that fits an
activation-memory budget, and apply it.

How the figures come about and how the search works: :mod:`moe_offload.plan.solve`.
What the options do to a layer: :mod:`moe_offload.plan.modules`.

The arithmetic this planner is built for (Qwen3-30B-A3B slice, 8 layers, 8192 tokens, bf16,
H200; details in ``docs/planner.md``): a 165 ms step saves 13.9 GiB -- experts 54%, norms 25%,
attention 11%, router 2%, LM head + loss 8%.  The copy window is forward (62 ms) x 55 GB/s =
3.2 GiB (23%).  Recomputing norms removes 16% net (their bf16 inputs are saved instead) for about
5% of the step; attention outputs (1.4 GiB in all) and then MoE-block bytes of the leading layers
fill the window for free; past that, checkpointing HF's experts removes 49% for about 16%, the
loss checkpoint 4% for about 1 ms, whole layers (inputs offloaded) all but the inputs for 30-38%.
"""
from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..offload import (OptOutContext, first_grad_tensor, get_cpu_offload_context, mark_not_offload,
                       release_lag)
from .measure import (activation_bytes_after_forward, count_saved, pinned_bandwidth, time_step)
from .modules import (RECOMPUTE_OPTIONS, Wrappers, find_layers, has_loss_function,
                      install_loss_checkpoint, install_recompute, layer_modules, options_for)
from .solve import (OFFLOAD_LEVELS, Choice, LayerFigures, ModelFigures, Prediction,
                    pooled_extras, predict, refine, search, split_extra)

__all__ = ["plan_memory", "MemoryPlan", "PlanHandle", "measure_model", "make_plan", "choose",
           "calibrate_offload", "calibrate_recompute", "probe_plans"]

GiB = float(1 << 30)
MiB = float(1 << 20)


def _leaf_inputs(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.grad_fn is None and a.requires_grad:
            yield a


class PlanHandle:
    """An applied :class:`MemoryPlan`: ``stats()`` (the engine's counters plus the plan's
    predictions), ``reset_stats()``, ``remove()`` (the model is as before)."""

    def __init__(self, plan: "MemoryPlan") -> None:
        self.plan = plan
        self.context = None
        self._wrappers = Wrappers()
        self._hooks = []

    def stats(self) -> dict:
        """Engine counters (``offloaded_bytes``, ``reloaded_bytes``, ...; zeros without
        offload) and ``predicted_step_s`` / ``predicted_activation_bytes``."""
        out = self.context.stats() if self.context is not None else OptOutContext().stats()
        out.update(predicted_step_s=self.plan.predicted_step_s,
                   predicted_activation_bytes=self.plan.predicted_activation_bytes)
        return out

    def reset_stats(self) -> None:
        """Zero the engine's counters."""
        if self.context is not None:
            self.context.reset_stats()

    def remove(self) -> None:
        """Remove every hook and wrapper the plan installed."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._wrappers.remove()
        self.context = None


@dataclass
class MemoryPlan:
    """A plan for ``layers`` of ``model``: one :class:`~moe_offload.plan.solve.Choice` per
    layer and the engine's prefetch depth, with its predictions.  Build it with
    :func:`plan_memory`; :meth:`apply` installs it."""
    model: nn.Module
    layers: nn.ModuleList
    prediction: Prediction
    budget_bytes: Optional[int]
    figures: ModelFigures
    min_offload_bytes: int = 256 * 1024
    emulate: bool = False

    @property
    def choices(self) -> tuple:
        """Per-layer choices."""
        return self.prediction.choices

    @property
    def predicted_step_s(self) -> float:
        """Predicted seconds of one step (forward + backward)."""
        return self.prediction.step_s

    @property
    def predicted_activation_bytes(self) -> int:
        """Predicted activation memory after the forward (bytes)."""
        return self.prediction.act_bytes

    @property
    def prefetch_layers(self) -> int:
        """Reloads the engine issues ahead in backward."""
        return self.prediction.prefetch_layers

    def apply(self) -> PlanHandle:
        """Install the plan on the model (recompute wrappers, the offload context and its
        layer hooks); returns a :class:`PlanHandle`."""
        handle = PlanHandle(self)
        try:
            self._install(handle)
        except Exception:
            handle.remove()
            raise
        return handle

    def _install(self, handle: PlanHandle) -> None:
        if self.prediction.loss_checkpoint:
            install_loss_checkpoint(self.model, handle._wrappers)
        for layer, c in zip(self.layers, self.choices):
            install_recompute(layer, c.recompute, handle._wrappers)
        k = self.prediction.offloaded_layers
        if k == 0:
            return
        L = len(self.layers)
        ctx, sync = get_cpu_offload_context(
            True, k, L, min_offload_bytes=self.min_offload_bytes,
            retain_pinned_cpu_buffers=True, prefetch_layers=self.prefetch_layers,
            emulate=self.emulate)
        handle.context = ctx
        for i, (layer, c) in enumerate(zip(self.layers, self.choices)):
            opt_out = OptOutContext() if i < k and c.offload == 0 else None

            def pre(module, args, kwargs, opt_out=opt_out):
                for t in _leaf_inputs(args, kwargs):
                    mark_not_offload(t)        # the caller holds it: moving frees nothing
                ctx.__enter__()
                if opt_out is not None:
                    opt_out.__enter__()

            def post(module, args, kwargs, output, opt_out=opt_out):
                import sys
                exc = sys.exc_info() if output is None else (None, None, None)
                try:
                    if opt_out is not None:
                        opt_out.__exit__(*exc)
                finally:
                    ctx.__exit__(*exc)
                if exc[0] is None and torch.is_grad_enabled():
                    x = first_grad_tensor(output)
                    if x is not None:
                        sync(x)

            handle._hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handle._hooks.append(layer.register_forward_hook(post, with_kwargs=True, always_call=True))
            if i >= k or c.offload in (0, 3) or c.recompute == "layer":
                continue
            kinds = OFFLOAD_LEVELS[c.offload]
            for _, (m, kind) in layer_modules(layer).items():
                if kind in kinds:
                    continue
                out = OptOutContext()

                def enter(mod, args, out=out):
                    out.__enter__()     # a pre-hook's return value would replace args

                def leave(mod, args, output, out=out):
                    out.__exit__(None, None, None)
                handle._hooks.append(m.register_forward_pre_hook(enter))
                handle._hooks.append(m.register_forward_hook(leave, always_call=True))

    def describe(self) -> str:
        """A readable table: per layer its choice, saved / resident / moved MiB, and the
        predictions."""
        f = self.figures
        loss = ", loss checkpointed" if self.prediction.loss_checkpoint else ""
        lines = [f"MemoryPlan: {len(self.layers)} layers, prefetch {self.prefetch_layers}, "
                 f"budget {_mib(self.budget_bytes)}{loss}",
                 f"{'layer':>5} {'recompute':<14} {'offload':<25} {'saved MiB':>10} "
                 f"{'resident MiB':>12} {'moved MiB':>10}"]
        from .solve import resident_bytes
        for i, (lf, c) in enumerate(zip(f.layers, self.choices)):
            kinds = _LEVEL_TEXT[c.offload]
            if c.recompute == "layer" and c.offload:
                kinds = "layer inputs"
            g = lf.groups[c.recompute]
            lines.append(f"{i:>5} {c.recompute:<14} {kinds:<25} {sum(g.values()) / MiB:>10.1f} "
                         f"{resident_bytes(g, c.offload) / MiB:>12.1f} {lf.moved(c) / MiB:>10.1f}")
        lines.append(f"predicted: step {self.predicted_step_s * 1e3:.2f} ms "
                     f"({self.predicted_step_s / f.step_none_s:.2f}x of no plan, "
                     f"{f.step_none_s * 1e3:.2f} ms), activation memory "
                     f"{self.predicted_activation_bytes / MiB:.1f} MiB "
                     f"({self.predicted_activation_bytes / max(f.act_none_bytes, 1):.2f}x of "
                     f"{f.act_none_bytes / MiB:.1f} MiB)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


_LEVEL_TEXT = {0: "-", 1: "attention", 2: "attention, MoE/MLP block", 3: "all"}


def _mib(b) -> str:
    return "none" if b is None else f"{b / MiB:.1f} MiB"


def _zero_grad(model: nn.Module) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def zero():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
    return zero


def measure_model(model: nn.Module, step_fn: Callable[[], torch.Tensor], layers=None, *,
                  min_offload_bytes: int = 256 * 1024, options: Optional[Sequence[str]] = None,
                  iters: int = 3, warmup: int = 1, bandwidth: Optional[tuple] = None,
                  emulate: Optional[bool] = None, calibrate: Optional[bool] = None) -> tuple:
    """Measure ``model`` for the planner -> ``(layers, ModelFigures)``.

    Runs, for each recompute option (all that apply, or ``options``; ``"loss"`` names the
    loss checkpoint), one counting forward and ``warmup + iters`` timed steps with the option
    on every layer.  Parameter grads
    are allocated (zeros) and zeroed before each step; they are left zeroed.
    ``calibrate`` (default: on the GPU, not emulated): time every recompute option again
    with :func:`calibrate_recompute` (pooled measured-per-option costs), then run the two
    probe plans of :func:`calibrate_offload` (measured copy rates, per-byte offload cost)."""
    layers = find_layers(model, layers)
    L = len(layers)
    cuda = next(model.parameters()).is_cuda
    if emulate is None:
        emulate = not cuda
    per_layer = [options_for(l) for l in layers]
    wanted = list(options) if options is not None else list(RECOMPUTE_OPTIONS)
    if "none" not in wanted:
        wanted = ["none"] + wanted
    zero = _zero_grad(model)
    groups = [dict() for _ in range(L)]
    extra = [dict() for _ in range(L)]
    shared = [dict() for _ in range(L)]
    samples = {}
    base = None
    for opt in wanted:
        applies = [opt in per_layer[i] for i in range(L)]
        if not any(applies):
            continue
        wr = Wrappers()
        try:
            for i, layer in enumerate(layers):
                if applies[i]:
                    install_recompute(layer, opt, wr)
            saved = count_saved(model, layers, step_fn, min_offload_bytes)
            timing = time_step(layers, step_fn, iters, warmup, cuda, zero)
        finally:
            wr.remove()
        for i in range(L):
            if applies[i]:
                groups[i][opt] = saved.by_layer[i]
                shared[i][opt] = saved.shared_by_layer[i]
        samples[opt] = list(timing.step_samples)
        if opt == "none":
            base, base_saved = timing, saved
            continue
    loss_saved, loss_extra = 0, None
    if has_loss_function(model) and (options is None or "loss" in options):
        wr = Wrappers()
        try:
            install_loss_checkpoint(model, wr)
            saved = count_saved(model, layers, step_fn, min_offload_bytes)
            timing = time_step(layers, step_fn, iters, warmup, cuda, zero)
        finally:
            wr.remove()
        loss_saved = max(0, base_saved.outside_bytes - saved.outside_bytes)
        loss_extra = max(0.0, timing.step_s - base.step_s)
    if cuda:
        act_none = activation_bytes_after_forward(step_fn, zero)
    else:
        act_none = base_saved.total
    if bandwidth is None:
        bandwidth = pinned_bandwidth(next(model.parameters()).device) if cuda and not emulate \
            else (55e9, 55e9)
    fwd_layers = sum(base.layer_fwd_s)
    pre = base.pre_s
    post = max(0.0, base.fwd_s - pre - fwd_layers)
    bwd_per_fwd = base.bwd_s / max(base.fwd_s, 1e-12)
    lfs = [LayerFigures(base.layer_fwd_s[i], base.layer_fwd_s[i] * bwd_per_fwd, extra[i], groups[i],
                        shared[i]) for i in range(L)]
    figures = ModelFigures(lfs, pre, post, pre * bwd_per_fwd, post * bwd_per_fwd, int(act_none),
                           float(bandwidth[0]), float(bandwidth[1]), int(loss_saved), loss_extra,
                           step_samples=samples)
    for opt, total in pooled_extras(samples).items():
        split_extra(figures, opt, total)
    if calibrate if calibrate is not None else (cuda and not emulate):
        calibrate_recompute(model, layers, step_fn, figures, iters=max(iters, 4), warmup=warmup,
                            min_offload_bytes=min_offload_bytes, emulate=emulate)
        calibrate_offload(model, layers, step_fn, figures, iters=iters, warmup=warmup,
                          min_offload_bytes=min_offload_bytes, emulate=emulate)
    gc.collect()
    return layers, figures


def recompute_probes(f: ModelFigures) -> list:
    """``[(option, choices)]``: no plan, then every measured recompute option on every
    layer that offers it (the rest keep everything), nothing offloaded."""
    opts = []
    for lf in f.layers:
        opts += [o for o in lf.options if o not in opts]
    opts = ["none"] + [o for o in opts if o != "none"]
    return [(o, tuple(Choice(o if o in lf.groups else "none", 0) for lf in f.layers))
            for o in opts]


def calibrate_recompute(model: nn.Module, layers, step_fn, f: ModelFigures, *, iters: int = 3,
                        warmup: int = 1, min_offload_bytes: int = 256 * 1024,
                        emulate: bool = False) -> dict:
    """Time no plan and each recompute option on every layer again, installed through
    :meth:`MemoryPlan.apply`, pool the samples with :func:`measure_model`'s
    (``f.step_samples``) and set each layer's ``extra_s`` from the pooled medians
    (``solve.py``, "The measured-per-option recompute term").  Returns
    ``{option: {"probe_s", "pooled_s", "samples", "extra_total_s", "before_total_s"}}``,
    also kept in ``f.calibration["recompute"]``."""
    cuda = next(model.parameters()).is_cuda
    zero = _zero_grad(model)
    before = {o: sum(lf.extra_s.get(o, 0.0) for lf in f.layers) for o in
              {o for lf in f.layers for o in lf.options}}
    out = {}
    for opt, choices in recompute_probes(f):
        pred = predict(f, list(choices), release_lag)
        handle = MemoryPlan(model, layers, pred, None, f, min_offload_bytes, emulate).apply()
        try:
            timing = time_step(layers, step_fn, iters, warmup, cuda, zero)
        finally:
            handle.remove()
        pooled = f.step_samples.setdefault(opt, [])
        pooled.extend(timing.step_samples)
        out[opt] = {"probe_s": timing.step_s, "pooled_s": statistics.median(pooled),
                    "samples": len(pooled)}
    extras = pooled_extras(f.step_samples)
    for opt, total in extras.items():
        split_extra(f, opt, total)
        if opt in out:
            out[opt].update(extra_total_s=total, before_total_s=before.get(opt, 0.0))
    f.calibration["recompute"] = out
    gc.collect()
    return out


def probe_plans(f: ModelFigures) -> list:
    """The two calibration probes (``solve.py``, "Calibration"): attention offload on all
    but the last layer, then the MoE block and norms too (level 3 with the cheapest
    recompute option short of the whole layer)."""
    L = len(f.layers)
    common = [o for o in f.layers[0].options if all(o in lf.groups for lf in f.layers)]
    heavy = next(o for o in ("norms+mlp", "norms+fc1", "norms+experts", "norms", "none")
                 if o in common)
    return [("attention", tuple([Choice("none", 1)] * (L - 1) + [Choice("none", 0)])),
            ("block", tuple([Choice(heavy, 3)] * (L - 1) + [Choice(heavy, 0)]))]


def calibrate_offload(model: nn.Module, layers, step_fn, f: ModelFigures, *, iters: int = 3,
                      warmup: int = 1, min_offload_bytes: int = 256 * 1024,
                      emulate: bool = False) -> dict:
    """Run the probe plans (:func:`probe_plans`) and set ``f``'s measured copy rates and
    per-byte offload costs in place (``solve.py``, "Calibration"); returns what was
    measured (``{probe: {"step_s", "moved_bytes", "d2h_Bps", "h2d_Bps"}}``)."""
    if len(f.layers) < 2:
        return {}
    cuda = next(model.parameters()).is_cuda
    zero = _zero_grad(model)
    out, runs = {}, []
    for name, choices in probe_plans(f):
        pred = predict(f, list(choices), release_lag)
        handle = MemoryPlan(model, layers, pred, None, f, min_offload_bytes, emulate).apply()
        try:
            timing = time_step(layers, step_fn, iters, warmup, cuda, zero)
            st = handle.stats()
        finally:
            handle.remove()
        runs.append((name, choices, timing.step_s, st))
        out[name] = {"step_s": timing.step_s, "moved_bytes": sum(pred.moved_bytes)}
    d2h_b = sum(st.get("offloaded_bytes", 0) for *_, st in runs)
    d2h_s = sum(st.get("d2h_copy_seconds", 0.0) for *_, st in runs)
    h2d_b = sum(st.get("reloaded_bytes", 0) for *_, st in runs)
    h2d_s = sum(st.get("h2d_copy_seconds", 0.0) for *_, st in runs)
    if d2h_s > 0 and d2h_b > 0:        # the engine's own copies of this model's tensors
        f.d2h_Bps = d2h_b / d2h_s
    if h2d_s > 0 and h2d_b > 0:
        f.h2d_Bps = h2d_b / h2d_s
    f.attention_s_per_byte = f.block_s_per_byte = 0.0
    for name, choices, measured, _ in runs:
        pred = predict(f, list(choices), release_lag)
        moved = [lf.moved(c) for lf, c in zip(f.layers, choices)]
        first = [min(m, lf.moved(Choice(c.recompute, 1))) for m, lf, c in zip(moved, f.layers, choices)]
        if name == "attention":
            nbytes = sum(first)
            f.attention_s_per_byte = max(0.0, measured - pred.step_s) / max(nbytes, 1)
        else:
            nbytes = sum(moved) - sum(first)
            f.block_s_per_byte = max(0.0, measured - pred.step_s) / max(nbytes, 1)
        out[name].update(predicted_s=pred.step_s, d2h_Bps=f.d2h_Bps, h2d_Bps=f.h2d_Bps)
    out["attention_s_per_GB"] = f.attention_s_per_byte * 1e9
    out["block_s_per_GB"] = f.block_s_per_byte * 1e9
    if "recompute" in f.calibration:      # calibrate_recompute's figures stay
        out.setdefault("recompute", f.calibration["recompute"])
    f.calibration = out
    return out


def plan_memory(model: nn.Module, step_fn: Callable[[], torch.Tensor], budget_bytes: Optional[int],
                *, layers=None, min_offload_bytes: int = 256 * 1024,
                options: Optional[Sequence[str]] = None, max_time_x: Optional[float] = None,
                max_step_s: Optional[float] = None,
                iters: int = 3, warmup: int = 1, bandwidth: Optional[tuple] = None,
                emulate: Optional[bool] = None, figures: Optional[tuple] = None,
                calibrate: Optional[bool] = None) -> MemoryPlan:
    """Measure ``model`` and return the fastest :class:`MemoryPlan` whose predicted
    activation memory after the forward is ``<= budget_bytes``.

    Args:
        model: the model (its parameters' device decides GPU or CPU measurement).
        step_fn: ``step_fn() -> loss``: one forward on the example batch (the planner runs
            the backward).
        budget_bytes: activation-memory budget (allocated after forward minus before).
            ``None`` with ``max_time_x``: the least memory predicted within ``max_time_x``
            times the step without a plan; ``None`` with ``max_step_s``: the least memory
            predicted within ``max_step_s`` seconds (e.g. a peer's measured step).
        layers: the decoder-layer list (default: found, see
            :func:`~moe_offload.plan.modules.find_layers`).
        min_offload_bytes: the engine's size threshold.
        options: recompute options to consider (default: all that apply).
        iters, warmup: timed steps per option.
        bandwidth: ``(d2h_Bps, h2d_Bps)`` (default: measured on the GPU; 55e9 each under
            emulate).
        emulate: run the engine in emulate mode (default: when the model is on the CPU).
        figures: ``(layers, ModelFigures)`` from :func:`measure_model` (skip measuring).
        calibrate: run :func:`calibrate_offload` (default: on the GPU, not emulated).

    Raises:
        ValueError: the budget is below the smallest activation memory any plan reaches
            (the message says that minimum).
    """
    if budget_bytes is None and max_time_x is None and max_step_s is None:
        raise ValueError("plan_memory: give budget_bytes, max_time_x or max_step_s")
    if budget_bytes is not None and budget_bytes < 0:
        raise ValueError(f"plan_memory: budget_bytes must be >= 0, got {budget_bytes}")
    cuda = next(model.parameters()).is_cuda
    emulate = (not cuda) if emulate is None else emulate
    if figures is None:
        figures = measure_model(model, step_fn, layers, min_offload_bytes=min_offload_bytes,
                                options=options, iters=iters, warmup=warmup,
                                bandwidth=bandwidth, emulate=emulate, calibrate=calibrate)
    layer_list, f = figures
    cands = search(f, release_lag)
    return choose(model, layer_list, f, cands, budget_bytes, max_time_x=max_time_x,
                  max_step_s=max_step_s, min_offload_bytes=min_offload_bytes, emulate=emulate)


def choose(model, layers, f: ModelFigures, cands: List[Prediction], budget_bytes: Optional[int],
           *, max_time_x: Optional[float] = None, max_step_s: Optional[float] = None,
           min_offload_bytes: int = 256 * 1024, emulate: bool = False) -> MemoryPlan:
    """Pick from candidate predictions (see :func:`plan_memory`).  Without a budget the
    time limit is ``max_step_s`` when given, else ``max_time_x`` x the step without a
    plan; when nothing is predicted within it, the fastest candidate."""
    if budget_bytes is None:
        if max_step_s is None and max_time_x is None:
            raise ValueError("choose: give budget_bytes, max_time_x or max_step_s")
        limit = max_step_s if max_step_s is not None else f.step_none_s * max_time_x
        limit = max(limit, min(c.step_s for c in cands))
        ok = [c for c in cands if c.step_s <= limit]
        best = min(ok, key=lambda c: (c.act_bytes, c.step_s))
        best = refine(f, best, release_lag, lambda a, b: (a.act_bytes, a.step_s) < (b.act_bytes, b.step_s),
                      lambda p: p.step_s <= limit)
    else:
        ok = [c for c in cands if c.act_bytes <= budget_bytes]
        if not ok:
            low = min(c.act_bytes for c in cands)
            raise ValueError(
                f"plan_memory: budget_bytes={budget_bytes} ({budget_bytes / MiB:.1f} MiB) is below "
                f"the minimum activation memory any plan reaches: {low} bytes "
                f"({low / MiB:.1f} MiB)")
        best = min(ok, key=lambda c: (c.step_s, c.act_bytes))
        best = refine(f, best, release_lag, lambda a, b: (a.step_s, a.act_bytes) < (b.step_s, b.act_bytes),
                      lambda p: p.act_bytes <= budget_bytes)
    return MemoryPlan(model, layers, best, budget_bytes, f, min_offload_bytes, emulate)


def make_plan(model: nn.Module, figures: tuple, choices: Sequence[Choice], *,
              prefetch_layers: Optional[int] = None, budget_bytes: Optional[int] = None,
              loss_checkpoint: bool = False,
              min_offload_bytes: int = 256 * 1024, emulate: Optional[bool] = None) -> MemoryPlan:
    """A :class:`MemoryPlan` with the given per-layer ``choices`` (no search), predicted
    on ``figures`` (from :func:`measure_model`)."""
    layers, f = figures
    for i, c in enumerate(choices):
        if not isinstance(c, Choice) or c.offload not in OFFLOAD_LEVELS:
            raise ValueError(f"choices[{i}] must be a Choice with offload in 0..3, got {c!r}")
        if c.recompute not in f.layers[i].groups:
            raise ValueError(f"choices[{i}]: recompute option {c.recompute!r} was not measured for "
                             f"layer {i} (measured: {f.layers[i].options})")
    if emulate is None:
        emulate = not next(model.parameters()).is_cuda
    pred = predict(f, list(choices), release_lag, prefetch_layers, loss_checkpoint)
    return MemoryPlan(model, layers, pred, budget_bytes, f, min_offload_bytes, emulate)
