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

from ..offload import OffloadedLayers, OptOutContext, get_cpu_offload_context, release_lag
from .measure import (activation_bytes_after_forward, count_saved, counted_memory, pinned_bandwidth,
                      preserved_state, time_step)
from .modules import (RECOMPUTE_OPTIONS, Wrappers, find_layers, heads_for, install_head,
                      install_recompute, layer_modules, options_for)
from .solve import (OFFLOAD_LEVELS, Choice, applied, HeadFigures, LayerFigures, ModelFigures, Prediction,
                    pooled_extras, predict, refine, search, split_extra)

__all__ = ["plan_memory", "MemoryPlan", "PlanHandle", "measure_model", "make_plan", "choose",
           "candidates",
           "calibrate_offload", "calibrate_recompute", "probe_plans"]

GiB = float(1 << 30)
MiB = float(1 << 20)


class PlanHandle:
    """An applied :class:`MemoryPlan`: ``stats()`` (the engine's counters plus the plan's
    predictions), ``reset_stats()``, ``remove()`` (the model is as before)."""

    def __init__(self, plan: "MemoryPlan") -> None:
        self.plan = plan
        self.context = None
        self._wrappers = Wrappers()
        self._hooks = []
        self._layers = None          # offload.OffloadedLayers, when the plan offloads

    def stats(self) -> dict:
        """Engine counters (``offloaded_bytes``, ``reloaded_bytes``, ...; zeros without
        offload) and ``predicted_step_s`` / ``predicted_activation_bytes``."""
        out = self.context.stats() if self.context is not None else OptOutContext().stats()
        out.update(predicted_step_s=self.plan.predicted_step_s,
                   predicted_activation_bytes=self.plan.predicted_activation_bytes,
                   predicted_peak_bytes=self.plan.predicted_peak_bytes)
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
        if self._layers is not None:
            self._layers.remove()
            self._layers = None
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
    def predicted_peak_bytes(self) -> int:
        """Predicted peak of the step above its start (bytes; what ``budget_bytes`` bounds):
        the highest of the moments in :mod:`moe_offload.plan.solve` ("Peak")."""
        return self.prediction.peak_bytes

    @property
    def peak_moment(self) -> str:
        """Which moment of the step sets the predicted peak."""
        return self.prediction.peak_moment

    @property
    def head(self) -> str:
        """The head option (``"none"``, ``"checkpoint"``, ``"chunked"``)."""
        return self.prediction.head

    @property
    def exact(self) -> bool:
        """Gradients are bitwise those without a plan (no option that changes the math)."""
        return self.figures.heads[self.head].exact

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
        install_head(self.model, self.head, handle._wrappers)
        for layer, c in zip(self.layers, self.choices):
            install_recompute(layer, c.recompute, handle._wrappers)
        k = self.prediction.engine_layers
        if k == 0:
            return
        L = len(self.layers)
        ctx, sync = get_cpu_offload_context(
            True, k, L, min_offload_bytes=self.min_offload_bytes,
            retain_pinned_cpu_buffers=True, prefetch_layers=self.prefetch_layers,
            emulate=self.emulate)
        handle.context = ctx
        # Each layer call is one engine layer (offload.OffloadedLayers: entered outside the
        # layer's hooks and its own checkpointing); an offloaded-range layer whose level
        # is 0 runs inside an opt-out, and in the others the module kinds the level does
        # not offload run inside one (a hook pair per such module).
        inner = [OptOutContext() if i < k and c.offload == 0 else None
                 for i, c in enumerate(self.choices)]
        handle._layers = OffloadedLayers(self.layers, ctx, sync, inner=inner)
        for i, (layer, c) in enumerate(zip(self.layers, self.choices)):
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
        loss = {"none": "", "checkpoint": ", loss checkpointed",
                "chunked": ", loss chunked (changes the summation order)"}.get(self.head, "")
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
        lines.append(f"predicted peak above the step start: {self.predicted_peak_bytes / MiB:.1f} MiB, "
                     f"set by the {self.peak_moment}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


_LEVEL_TEXT = {0: "-", 1: "attention + unnamed", 2: "attention + unnamed, MoE/MLP", 3: "all"}


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
    on every layer; on the GPU the last of them also reads the allocator at the step's
    moments (the peak model's transients, :class:`~moe_offload.plan.measure.StepMemory`).
    Parameter grads are allocated (zeros) during the measurement, so they are not part of
    the measured peak; the model is left as it was found (``.grad``, RNG states, buffers,
    training mode: :func:`~moe_offload.plan.measure.preserved_state`).
    ``calibrate`` (default: on the GPU, not emulated): time every recompute option again
    with :func:`calibrate_recompute` (pooled measured-per-option costs), then run the two
    probe plans of :func:`calibrate_offload` (measured copy rates, per-byte offload cost)."""
    with preserved_state(model):
        return _measure_model(model, step_fn, layers, min_offload_bytes, options, iters, warmup,
                              bandwidth, emulate, calibrate)


def _measure_model(model, step_fn, layers, min_offload_bytes, options, iters, warmup, bandwidth,
                   emulate, calibrate) -> tuple:
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
    memory = {}
    samples = {}
    base = base_saved = None
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
            timing = time_step(layers, step_fn, iters, warmup, cuda, zero, memory=cuda)
        finally:
            wr.remove()
        for i in range(L):
            if applies[i]:
                groups[i][opt] = saved.by_layer[i]
                shared[i][opt] = saved.shared_by_layer[i]
        samples[opt] = list(timing.step_samples)
        if opt == "none":
            base, base_saved = timing, saved
        memory[opt] = (timing.memory or counted_memory(saved, base_saved), applies)
    heads = {}
    loss_saved, loss_extra = 0, None
    for head in _heads_to_measure(model, options):
        wr = Wrappers()
        try:
            install_head(model, head, wr)
            saved = count_saved(model, layers, step_fn, min_offload_bytes)
            timing = time_step(layers, step_fn, iters, warmup, cuda, zero, memory=cuda)
        finally:
            wr.remove()
        h_saved = max(0, base_saved.outside_bytes - saved.outside_bytes)
        h_extra = max(0.0, timing.step_s - base.step_s)
        heads[head] = _head_figures(timing.memory, h_extra, h_saved, chunked=head == "chunked")
        if head == "checkpoint":
            loss_saved, loss_extra = h_saved, h_extra
    heads["none"] = _head_figures(memory["none"][0], 0.0, 0)
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
    _set_backward_memory(lfs, memory)
    figures = ModelFigures(lfs, pre, post, pre * bwd_per_fwd, post * bwd_per_fwd, int(act_none),
                           float(bandwidth[0]), float(bandwidth[1]), int(loss_saved), loss_extra,
                           step_samples=samples, heads=heads, pre_bytes=base_saved.pre_bytes,
                           tokens=base_saved.tokens)
    for opt, total in pooled_extras(samples).items():
        split_extra(figures, opt, total)
    if calibrate if calibrate is not None else (cuda and not emulate):
        calibrate_recompute(model, layers, step_fn, figures, iters=max(iters, 4), warmup=warmup,
                            min_offload_bytes=min_offload_bytes, emulate=emulate)
        calibrate_offload(model, layers, step_fn, figures, iters=iters, warmup=warmup,
                          min_offload_bytes=min_offload_bytes, emulate=emulate)
    gc.collect()
    return layers, figures


def _heads_to_measure(model: nn.Module, options: Optional[Sequence[str]]) -> List[str]:
    """The head options that apply to ``model`` and are asked for (``options`` names them:
    ``"loss"`` is the checkpoint; ``None``: all that apply)."""
    return [h for h in heads_for(model)
            if options is None or (("loss" if h == "checkpoint" else h) in options)]


def _head_figures(mem, extra_s: float, saved_bytes: int, chunked: bool = False) -> HeadFigures:
    """A head option's figures from its measured step (no transients on the CPU).  The
    chunked loss changes the summation order (not exact) and its transients are those of
    one chunk, whatever the tokens (fixed)."""
    kw = dict(exact=not chunked, fixed_transient=chunked)
    if mem is None or not mem.measured:
        return HeadFigures(extra_s, saved_bytes, **kw)
    return HeadFigures(extra_s, saved_bytes, max(0, mem.fwd_peak - mem.fwd_end),
                       max(0, mem.head_peak - mem.fwd_end), **kw)


def _set_backward_memory(lfs: List[LayerFigures], memory: dict) -> None:
    """``C_j`` from the no-plan step (what its layer ``j`` backward starts with, less the
    activations of layers ``0..j``) and ``T_j(option)`` from the step with the option on
    every layer (the highest during layer ``j``'s backward above its start)."""
    none, _ = memory["none"]
    below = 0
    for j, lf in enumerate(lfs):
        below += lf.saved("none")
        lf.bwd_fixed = max(0, none.layer_start[j] - below)
    for opt, (mem, applies) in memory.items():
        for j, lf in enumerate(lfs):
            if applies[j]:
                lf.bwd_transient[opt] = max(0, mem.layer_peak[j] - mem.layer_start[j])


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
    offered = {o for lf in f.layers for o in lf.options}
    heavy = next(o for o in ("norms+mlp", "norms+fc1", "norms+experts", "norms", "none")
                 if o in offered)
    block = [applied(lf, Choice(heavy, 3 if i < L - 1 else 0)) for i, lf in enumerate(f.layers)]
    return [("attention", tuple([Choice("none", 1)] * (L - 1) + [Choice("none", 0)])),
            ("block", tuple(block))]


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
                calibrate: Optional[bool] = None, exact: bool = False,
                host_bytes: Optional[int] = None) -> MemoryPlan:
    """Measure ``model`` and return the fastest :class:`MemoryPlan` whose predicted step
    **peak** is ``<= budget_bytes``.

    The peak is the highest memory allocated during one step (forward, loss, backward with
    its recomputes and reloads) above the step's start, as ``torch.cuda.max_memory_allocated``
    sees it, with the parameters' gradients already allocated (the planner's convention;
    :func:`~moe_offload.fit` adds gradients, optimizer state and the allocator's reserve).
    The activation memory after the forward stays a reported figure
    (:attr:`MemoryPlan.predicted_activation_bytes`).  Measuring leaves the model as it was
    found: ``.grad``, RNG states, buffers and training mode are restored.

    Args:
        model: the model (its parameters' device decides GPU or CPU measurement).
        step_fn: ``step_fn() -> loss``: one forward on the example batch (the planner runs
            the backward).
        budget_bytes: the step's peak above its start, in bytes.
            ``None`` with ``max_time_x``: the least peak predicted within ``max_time_x``
            times the step without a plan; ``None`` with ``max_step_s``: the least peak
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
        exact: only options whose gradients are bitwise those without a plan (leaves out
            the chunked loss).
        host_bytes: the most pinned host memory the plan may fill (bytes moved per step).

    Raises:
        ValueError: the budget is below the smallest peak any plan reaches (the message
            says that minimum and what sets it).
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
    cands = candidates(f, budget_bytes, exact=exact)
    return choose(model, layer_list, f, cands, budget_bytes, max_time_x=max_time_x,
                  max_step_s=max_step_s, min_offload_bytes=min_offload_bytes, emulate=emulate,
                  exact=exact, host_bytes=host_bytes)


def candidates(f: ModelFigures, peak_limit: Optional[int] = None, *, exact: bool = False) -> List[Prediction]:
    """Every candidate plan on ``f`` (:func:`~moe_offload.plan.solve.search`), with the head
    options allowed (``exact``: only those that keep gradients bitwise)."""
    heads = [h for h, hf in f.heads.items() if hf.exact or not exact]
    return search(f, release_lag, heads=heads, peak_limit=peak_limit)


def choose(model, layers, f: ModelFigures, cands: List[Prediction], budget_bytes: Optional[int],
           *, max_time_x: Optional[float] = None, max_step_s: Optional[float] = None,
           min_offload_bytes: int = 256 * 1024, emulate: bool = False, exact: bool = False,
           host_bytes: Optional[int] = None) -> MemoryPlan:
    """Pick from candidate predictions (see :func:`plan_memory`).  Without a budget the
    time limit is ``max_step_s`` when given, else ``max_time_x`` x the step without a
    plan; when nothing is predicted within it, the fastest candidate."""
    allowed_heads = {h for h, hf in f.heads.items() if hf.exact or not exact}
    cands = [c for c in cands if c.head in allowed_heads]

    def host_ok(p: Prediction) -> bool:
        return host_bytes is None or sum(p.moved_bytes) <= host_bytes
    if host_bytes is not None and not any(host_ok(c) for c in cands):
        raise ValueError(f"plan_memory: no plan moves at most host_bytes={host_bytes} bytes")
    cands = [c for c in cands if host_ok(c)]
    if budget_bytes is None:
        if max_step_s is None and max_time_x is None:
            raise ValueError("choose: give budget_bytes, max_time_x or max_step_s")
        limit = max_step_s if max_step_s is not None else f.step_none_s * max_time_x
        limit = max(limit, min(c.step_s for c in cands))
        ok = [c for c in cands if c.step_s <= limit]
        best = min(ok, key=lambda c: (c.peak_bytes, c.step_s))
        best = refine(f, best, release_lag,
                      lambda a, b: (a.peak_bytes, a.step_s) < (b.peak_bytes, b.step_s),
                      lambda p: p.step_s <= limit and host_ok(p))
    else:
        ok = [c for c in cands if c.peak_bytes <= budget_bytes]
        if not ok:
            low = min(cands, key=lambda c: c.peak_bytes)
            raise ValueError(
                f"plan_memory: budget_bytes={budget_bytes} ({budget_bytes / MiB:.1f} MiB) is below "
                f"the smallest step peak any plan reaches: {low.peak_bytes} bytes "
                f"({low.peak_bytes / MiB:.1f} MiB, set by the {low.peak_moment}); "
                f"{low.peak_bytes - budget_bytes} bytes are missing")
        best = min(ok, key=lambda c: (c.step_s, c.peak_bytes))
        best = refine(f, best, release_lag,
                      lambda a, b: (a.step_s, a.peak_bytes) < (b.step_s, b.peak_bytes),
                      lambda p: p.peak_bytes <= budget_bytes and host_ok(p),
                      peak_limit=budget_bytes)
    return MemoryPlan(model, layers, best, budget_bytes, f, min_offload_bytes, emulate)


def make_plan(model: nn.Module, figures: tuple, choices: Sequence[Choice], *,
              prefetch_layers: Optional[int] = None, budget_bytes: Optional[int] = None,
              loss_checkpoint: bool = False, head: Optional[str] = None,
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
    pred = predict(f, list(choices), release_lag, prefetch_layers, loss_checkpoint, head=head)
    return MemoryPlan(model, layers, pred, budget_bytes, f, min_offload_bytes, emulate)
