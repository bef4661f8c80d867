"""The planner's cost model and search (pure Python on measured figures; no torch).

A plan gives each decoder layer a :class:`Choice`: a recompute option (``modules.py``) and
an offload level, and the engine a prefetch depth ``p``.

Offload levels (module kinds whose saved storages the layer sends to the host; the rest of
the layer runs inside an engine opt-out region):

====  =========================================================
0     nothing (the whole layer is opted out)
1     attention (and tensors saved outside any named module)
2     + the MLP / MoE block: router, experts
3     everything, norms included
====  =========================================================

Memory after forward (what ``allocated after forward - before`` measures)::

    act(plan) = act(none) - sum_i [saved_i(none) - resident_i(choice_i)]

``act(none)`` is measured (the allocator on the GPU; the counted saved bytes on the CPU);
``saved_i(none)`` is every byte layer ``i`` alone saves without a plan, ``resident_i`` what it
still holds with its choice: unmovable storages (below the engine threshold) plus storages
one of whose savers is a kind the level does not offload.  Storages saved by several layers
(e.g. rotary cos/sin) and outside the layers (embedding, LM head, loss) count as fixed.

Time (one step, the engine's schedule):

- Forward: layers back to back (``fwd_i``, measured per layer).  One D2H stream copies each
  offloading layer's bytes at ``d2h_Bps``, starting when the layer starts (tensors are
  saved as it runs) and ending no earlier than the layer ends.  Entering layer ``j`` waits
  for the copies of offloaded layer ``j - lag`` with the engine's own rule
  (:func:`moe_offload.offload.release_lag`: ``lag = max(2, L - k)``, ``k`` = the engine's
  offloaded-layer count), and the forward ends when every copy is done.  So copies are
  free while the bytes fit the *copy window* ``forward time x bandwidth``.
- Backward: the part after the layers first, then layers ``L-1 .. 0``, each
  ``bwd_i + extra_i(option)``; reaching layer ``j`` issues the reloads of layers
  ``j .. j-p`` not yet issued (one H2D stream at ``h2d_Bps``); a layer waits for its own.
  ``bwd_i`` is the measured backward split by forward-time share; ``extra_i`` is the
  measured step-time increase of the recompute option (run on every layer) split the same
  way (see "Calibration": on the GPU it is the measured-per-option term of the probes).

Outside the layers, a Hugging Face model's loss can be checkpointed too (it then saves the
bf16 logits instead of the fp32 log-softmax output): a model-wide on/off with its measured
cost and saving.

The search: every plan with one choice for the first ``m`` layers and another for the
rest (``m = 0..L``; every pair of choices), each with its best prefetch depth, with and
without the loss checkpoint; the fastest
plan whose predicted memory fits the budget wins (ties: less memory), then :func:`refine`
changes one layer's choice at a time while that keeps the plan within the budget and makes it
faster (for a time limit: smaller within the limit).  Layers of a decoder
are alike, so "a leading block does more" covers the useful mixes: leading layers are the
ones whose copies have the whole rest of the forward to hide and whose reloads come last.

Calibration (measured in-process by :func:`~moe_offload.plan.memory_plan.measure_model`
on the GPU, zero elsewhere).  The copy rates are what the engine's own copies of this
model's tensors achieve (bytes over the copies' GPU time, from its ``stats()``), not a
256 MiB microbenchmark.  Offloading also costs time the schedule above does not see (the
hooks' host time when the forward is host-bound, the allocator serving the copies'
storages, copy traffic contending with compute): the first H200 run measured 5-25% more
than this schedule for plans moving the MoE block and norms, and nothing extra for
attention-only offload.  Two probe plans measure it per byte: attention offload (level 1)
on all but the last layer, then the MoE block and norms too (level 3 with the cheapest
recompute option that is not the whole layer); each probe's measured step minus its
schedule prediction, over the bytes it adds, is ``attention_s_per_byte`` /
``block_s_per_byte`` (never negative).  A plan pays ``bytes x rate`` for the bytes each
layer moves (:meth:`ModelFigures.offload_cost_s`).

The measured-per-option recompute term.  A recompute option costs more than re-running
its kernels: each non-reentrant checkpoint wrapper (four RMSNorms per Qwen3-MoE layer:
input, post-attention, q and k) adds host work per call in forward and backward (the
saved-tensor hooks, the recompute bookkeeping), which lengthens a host-bound forward, and
re-materializes fp32 intermediates.  So no option's cost is modelled from its kernels:
``extra_i(option)`` is always ``(step with the option on every layer - step without a
plan)`` split by forward share.  On the CPU (and with probes off) that difference comes
from :func:`measure_model`'s one pass over the options (``warmup + iters`` steps each).
On the GPU :func:`~moe_offload.plan.memory_plan.calibrate_recompute` times every offered
option again, installed through :meth:`MemoryPlan.apply` (the path the plan then runs),
together with a no-plan step, *before* the offload probes (whose per-byte costs must not
absorb a recompute cost the model misses); each option's figure is the median of the
pooled samples of both passes, minus the pooled no-plan median
(:func:`pooled_extras`).  Pooling matters: one H200 run measured the same all-layer
norms+fc1 configuration at 153.7 ms (two planner samples) and 156.6-173.2 ms (five bench
samples): a host-bound step jitters by +-5%.

Approximations: forward time does not depend on the option; recompute times are
whole-model means split by forward share; the per-byte offload cost is linear.
"""
from __future__ import annotations

import statistics

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["OFFLOAD_LEVELS", "Choice", "LayerFigures", "ModelFigures", "Prediction",
           "resident_bytes", "moved_bytes", "predict", "search", "refine", "minimum_bytes",
           "pooled_extras", "split_extra"]

OFFLOAD_LEVELS = {
    0: frozenset(),
    1: frozenset({"attention", "other"}),
    2: frozenset({"attention", "other", "mlp", "router", "experts"}),
    3: frozenset({"attention", "other", "mlp", "router", "experts", "norm"}),
}


@dataclass(frozen=True)
class Choice:
    """One layer's recompute option and offload level."""
    recompute: str = "none"
    offload: int = 0

    def __str__(self) -> str:
        return f"{self.recompute}/o{self.offload}"


@dataclass
class LayerFigures:
    """Measured figures of one layer: forward and backward seconds; per recompute option
    its extra step seconds and saved groups ``{(kinds, movable): bytes}`` (``shared``: the
    storages it saves that other layers save too: copied when it offloads, never freed)."""
    fwd_s: float
    bwd_s: float
    extra_s: Dict[str, float]
    groups: Dict[str, Dict[tuple, int]]
    shared: Dict[str, Dict[tuple, int]] = field(default_factory=dict)

    def moved(self, c: "Choice") -> int:
        """Bytes the layer copies with choice ``c`` (its own and shared storages)."""
        return moved_bytes(self.groups[c.recompute], c.offload) + \
            moved_bytes(self.shared.get(c.recompute, {}), c.offload)

    @property
    def options(self) -> List[str]:
        """Recompute options measured for this layer."""
        return list(self.groups)


@dataclass
class ModelFigures:
    """Everything the model needs: the layers, the time before / after them, the measured
    activation memory without a plan, and the bandwidths.  ``loss_extra_s`` /
    ``loss_saved_bytes``: cost and gain of checkpointing the loss (``None``: no such
    option).  ``step_samples``: every timed step per recompute option on all layers
    (``"none"``: no plan), pooled by :func:`pooled_extras`."""
    layers: List[LayerFigures]
    pre_fwd_s: float
    post_fwd_s: float
    pre_bwd_s: float
    post_bwd_s: float
    act_none_bytes: int
    d2h_Bps: float
    h2d_Bps: float
    loss_saved_bytes: int = 0
    loss_extra_s: Optional[float] = None
    attention_s_per_byte: float = 0.0
    block_s_per_byte: float = 0.0
    calibration: dict = field(default_factory=dict)
    step_samples: Dict[str, List[float]] = field(default_factory=dict)

    def offload_cost_s(self, layer: "LayerFigures", c: "Choice") -> float:
        """The measured per-byte cost of offloading beyond the copy schedule (see
        "Calibration" in the module docstring): bytes that move at level 1 (attention and
        the layer's loose tensors) at ``attention_s_per_byte``, the rest (MoE block, norms)
        at ``block_s_per_byte``."""
        if not c.offload:
            return 0.0
        total = layer.moved(c)
        first = min(total, layer.moved(Choice(c.recompute, 1)))
        return first * self.attention_s_per_byte + (total - first) * self.block_s_per_byte

    @property
    def step_none_s(self) -> float:
        """Predicted step without a plan (the measured one, by construction)."""
        return (self.pre_fwd_s + self.post_fwd_s + self.pre_bwd_s + self.post_bwd_s
                + sum(l.fwd_s + l.bwd_s for l in self.layers))


@dataclass(frozen=True)
class Prediction:
    """A plan's choices, prefetch depth and predicted figures."""
    choices: Tuple[Choice, ...]
    prefetch_layers: int
    step_s: float
    fwd_s: float
    act_bytes: int
    moved_bytes: Tuple[int, ...] = field(default=())
    loss_checkpoint: bool = False

    @property
    def offloaded_layers(self) -> int:
        """The engine's ``num_layers``: one past the last layer that offloads (0: none)."""
        return max((i + 1 for i, c in enumerate(self.choices) if c.offload), default=0)


def pooled_extras(samples: Dict[str, Sequence[float]]) -> Dict[str, float]:
    """Each recompute option's measured step increase: the median of its step samples
    minus the median of ``samples["none"]``, never negative (``{}`` without ``"none"``
    samples; options without samples are left out)."""
    base = list(samples.get("none", ()))
    if not base:
        return {}
    none_s = statistics.median(base)
    return {opt: max(0.0, statistics.median(v) - none_s)
            for opt, v in samples.items() if opt != "none" and len(v)}


def split_extra(f: "ModelFigures", option: str, total_s: float) -> None:
    """Set ``extra_s[option]`` of the layers measured with ``option`` to ``total_s`` split by
    their forward-time share (equal shares when no forward time was measured)."""
    on = [lf for lf in f.layers if option in lf.groups]
    share = sum(lf.fwd_s for lf in on)
    for lf in on:
        lf.extra_s[option] = total_s * (lf.fwd_s / share if share > 0 else 1.0 / len(on))


def resident_bytes(groups: Dict[tuple, int], level: int) -> int:
    """Bytes a layer still holds after the forward at offload ``level``."""
    kinds = OFFLOAD_LEVELS[level]
    return sum(b for (savers, movable), b in groups.items() if not movable or not savers <= kinds)


def moved_bytes(groups: Dict[tuple, int], level: int) -> int:
    """Bytes a layer copies to the host at offload ``level`` (a storage moves when any of
    its savers offloads)."""
    kinds = OFFLOAD_LEVELS[level]
    return sum(b for (savers, movable), b in groups.items() if movable and savers & kinds)


def _memory(f: ModelFigures, choices: Sequence[Choice]) -> int:
    saved = 0
    for lf, c in zip(f.layers, choices):
        none = sum(lf.groups["none"].values())
        saved += none - resident_bytes(lf.groups[c.recompute], c.offload)
    return f.act_none_bytes - saved


def _simulate(f: ModelFigures, choices: Sequence[Choice], moved: Sequence[int], p: int,
              lag: int) -> tuple:
    L = len(f.layers)
    t = f.pre_fwd_s
    d2h, copied = 0.0, {}
    for j, lf in enumerate(f.layers):
        i = j - lag
        if i >= 0 and i in copied:
            t = max(t, copied[i])
        start, t = t, t + lf.fwd_s
        if moved[j]:
            d2h = max(max(d2h, start) + moved[j] / f.d2h_Bps, t)
            copied[j] = d2h
    fwd_end = max([t] + list(copied.values())) + f.post_fwd_s
    t = fwd_end + f.post_bwd_s
    h2d, landed = t, {}
    for j in range(L - 1, -1, -1):
        for i in range(j, max(j - p, 0) - 1, -1):
            if moved[i] and i not in landed:
                h2d = max(t, h2d) + moved[i] / f.h2d_Bps
                landed[i] = h2d
        if j in landed:
            t = max(t, landed[j])
        lf = f.layers[j]
        t += lf.bwd_s + lf.extra_s.get(choices[j].recompute, 0.0)
    return fwd_end, t + f.pre_bwd_s


def predict(f: ModelFigures, choices: Sequence[Choice], release_lag,
            prefetch_layers: Optional[int] = None, loss_checkpoint: bool = False) -> Prediction:
    """Predicted figures of ``choices``; ``prefetch_layers=None`` picks the fastest depth.
    ``release_lag(k, L)`` is the engine's release rule; ``loss_checkpoint`` adds the loss
    checkpoint's cost and saving."""
    if loss_checkpoint and f.loss_extra_s is None:
        raise ValueError("loss_checkpoint: the model's loss checkpoint was not measured")
    L = len(f.layers)
    if len(choices) != L:
        raise ValueError(f"need {L} choices, got {len(choices)}")
    moved = [lf.moved(c) for lf, c in zip(f.layers, choices)]
    k = max((i + 1 for i, c in enumerate(choices) if c.offload), default=0)
    lag = release_lag(k, L) if k else L
    depths = [prefetch_layers] if prefetch_layers is not None else (range(1, L + 1) if k else [0])
    best = None
    for p in depths:
        fwd, step = _simulate(f, choices, moved, p, lag)
        if best is None or step < best[2] * (1 - 1e-9):
            best = (p, fwd, step)
    extra_s = f.loss_extra_s if loss_checkpoint else 0.0
    extra_s += sum(f.offload_cost_s(lf, c) for lf, c in zip(f.layers, choices))
    saved = f.loss_saved_bytes if loss_checkpoint else 0
    return Prediction(tuple(choices), best[0], best[2] + extra_s, best[1],
                      _memory(f, choices) - saved, tuple(moved), loss_checkpoint)


def _all_choices(f: ModelFigures) -> List[Choice]:
    common = [o for o in f.layers[0].options if all(o in lf.groups for lf in f.layers)]
    out = []
    for r in common:
        levels = (0, 3) if r == "layer" else tuple(OFFLOAD_LEVELS)
        out += [Choice(r, o) for o in levels]
    return out


def search(f: ModelFigures, release_lag, allowed: Optional[Sequence[Choice]] = None) -> List[Prediction]:
    """Every candidate plan (see the module docstring), deduplicated."""
    L = len(f.layers)
    choices = list(allowed) if allowed is not None else _all_choices(f)
    seen, out = set(), []
    for lead in choices:
        for rest in choices:
            for m in range(0, L + 1):
                if (m == 0 and lead != choices[0]) or (m == L and rest != choices[0]):
                    continue
                plan = tuple([lead] * m + [rest] * (L - m))
                if plan in seen:
                    continue
                seen.add(plan)
                p = predict(f, plan, release_lag)
                out.append(p)
                if f.loss_extra_s is not None:
                    out.append(Prediction(p.choices, p.prefetch_layers, p.step_s + f.loss_extra_s,
                                          p.fwd_s, p.act_bytes - f.loss_saved_bytes, p.moved_bytes,
                                          True))
    return out


def minimum_bytes(candidates: Sequence[Prediction]) -> int:
    """The least predicted activation memory over ``candidates``."""
    return min(c.act_bytes for c in candidates)


def refine(f: ModelFigures, start: Prediction, release_lag, better, fits,
           allowed: Optional[Sequence[Choice]] = None, max_passes: int = 4) -> Prediction:
    """Local search from ``start``: change one layer's choice at a time, keep a change when
    the new plan ``fits`` and is ``better`` than the current one; stop after a pass
    without a change (or ``max_passes``)."""
    choices = list(allowed) if allowed is not None else _all_choices(f)
    best = start
    for _ in range(max_passes):
        changed = False
        for i in range(len(f.layers)):
            for c in choices:
                if c == best.choices[i]:
                    continue
                plan = list(best.choices)
                plan[i] = c
                p = predict(f, plan, release_lag, loss_checkpoint=best.loss_checkpoint)
                if fits(p) and better(p, best):
                    best, changed = p, True
        if not changed:
            break
    return best
