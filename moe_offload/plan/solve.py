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

Peak (the step's highest allocated bytes above its start, what ``budget_bytes`` means).  The
step passes through these moments; the peak is the highest of them:

- the forward, at the entry of layer ``j``: the bytes saved before the layers, plus each
  earlier layer's bytes -- all it saved while its copies are not yet released (the engine
  releases layer ``i`` at the entry of layer ``i + lag``), its resident bytes after that;
- the forward's end: ``act(plan)`` plus the head option's forward transient (the loss's
  logits and log-softmax while they are computed);
- the head's backward: ``act(plan)`` plus the head option's backward transient (the
  gradient of the logits);
- layer ``j``'s backward: ``C_j`` (what the step holds at that moment besides activations:
  the gradient flowing back, shared storages, the bytes saved before the layers; measured
  without a plan) plus, for each layer ``i <= j``, all its saved bytes if its reloads have
  been issued (the engine issues layers ``j .. j-p`` on reaching ``j``) or it keeps them on
  the device, else its resident bytes; plus ``T_j(option)``, the transient of the layer's
  own backward with its recompute option (the recomputed tensors, gradient buffers and
  workspaces: measured with the option on every layer).

On the GPU ``C_j``, ``T_j`` and the head's transients are read from the allocator during
the measured steps (:class:`~moe_offload.plan.measure.StepMemory`); on the CPU they come
from counted bytes (a recompute re-creates what its option dropped; no workspaces).
The prefetch depth is chosen per plan: the fastest depth whose peak fits the budget.

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

__all__ = ["OFFLOAD_LEVELS", "HEAD_OPTIONS", "FALLBACK", "Choice", "LayerFigures", "HeadFigures",
           "ModelFigures", "Prediction", "resident_bytes", "moved_bytes", "predict", "search",
           "refine", "applied", "pooled_extras", "split_extra"]

#: What can be done to the code after the layers (final norm, LM head, loss): keep it as
#: it is, checkpoint it from the final norm's input (bitwise), or compute the loss in token
#: chunks so the logits of all tokens never exist at once (changes the summation order).
HEAD_OPTIONS = ("none", "checkpoint", "chunked")

#: The deepest prefetch the search tries (reloads issued this many layers ahead).
MAX_PREFETCH = 8

#: With more layers than this, the search splits the stack at a grid of points (plus the
#: first and last few) rather than at every layer; :func:`refine` then moves single layers.
SPLIT_GRID = 16

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
    #: ``C_j``: bytes held at the start of this layer's backward besides activations.
    bwd_fixed: int = 0
    #: ``T_j(option)``: the transient of this layer's backward above its start.
    bwd_transient: Dict[str, int] = field(default_factory=dict)

    def saved(self, option: str) -> int:
        """Every byte the layer saves with recompute ``option``."""
        return sum(self.groups[option].values())

    def moved(self, c: "Choice") -> int:
        """Bytes the layer copies with choice ``c`` (its own and shared storages)."""
        return moved_bytes(self.groups[c.recompute], c.offload) + \
            moved_bytes(self.shared.get(c.recompute, {}), c.offload)

    @property
    def options(self) -> List[str]:
        """Recompute options measured for this layer."""
        return list(self.groups)


@dataclass
class HeadFigures:
    """The code after the layers under one head option (:data:`HEAD_OPTIONS`):
    ``extra_s`` its step time over ``"none"``'s, ``saved_bytes`` the activation bytes it
    saves less than ``"none"`` after the forward, ``fwd_transient`` / ``bwd_transient`` the
    highest bytes above the forward's end while the loss runs forward / backward, ``exact``
    whether gradients are bitwise those of ``"none"`` (``max_rel_error``: the measured
    error when they are not); ``fixed_transient``: the transients do not grow with the
    tokens (the chunked loss works a fixed number of tokens at a time:
    :meth:`ModelFigures.scaled` keeps them)."""
    extra_s: float = 0.0
    saved_bytes: int = 0
    fwd_transient: int = 0
    bwd_transient: int = 0
    exact: bool = True
    max_rel_error: Optional[float] = None
    fixed_transient: bool = False


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
    #: Head options measured (``"none"`` always; ``"checkpoint"`` from the two loss fields).
    heads: Dict[str, HeadFigures] = field(default_factory=dict)
    #: Bytes saved before the first layer (embedding); for the forward's peak.
    pre_bytes: int = 0
    #: Tokens of the measured batch (first layer's input rows), when known.
    tokens: Optional[int] = None

    def __post_init__(self) -> None:
        self.heads.setdefault("none", HeadFigures())
        if self.loss_extra_s is not None and "checkpoint" not in self.heads:
            self.heads["checkpoint"] = HeadFigures(self.loss_extra_s, self.loss_saved_bytes)

    def scaled(self, r: float) -> "ModelFigures":
        """These figures at ``r`` times the measured tokens: every byte count and every
        time multiplied by ``r`` (an approximation: saved bytes and transients of
        attention with a memory-efficient kernel grow linearly with tokens; attention's
        time grows faster, so times at ``r > 1`` are a lower bound), except the transients
        of a head option that works a fixed number of tokens at a time
        (``HeadFigures.fixed_transient``: the chunked loss); bandwidths and per-byte costs
        unchanged.  The first H100 run of the full-depth main job scaled the chunked loss's
        ~3 GiB transient at 4096 tokens linearly and predicted 36.7 GiB where 27.9 GiB was
        measured at 16384 tokens (-24%): a fixed transient grown 4x."""
        import copy

        def b(x):
            return int(round(x * r))
        out = copy.deepcopy(self)
        out.__dict__.pop("_bytes", None)          # the per-choice byte cache of the search
        for lf in out.layers:
            lf.fwd_s *= r
            lf.bwd_s *= r
            lf.extra_s = {k: v * r for k, v in lf.extra_s.items()}
            lf.groups = {o: {k: b(v) for k, v in g.items()} for o, g in lf.groups.items()}
            lf.shared = {o: {k: b(v) for k, v in g.items()} for o, g in lf.shared.items()}
            lf.bwd_fixed = b(lf.bwd_fixed)
            lf.bwd_transient = {k: b(v) for k, v in lf.bwd_transient.items()}
        for name in ("pre_fwd_s", "post_fwd_s", "pre_bwd_s", "post_bwd_s"):
            setattr(out, name, getattr(out, name) * r)
        out.act_none_bytes = b(out.act_none_bytes)
        out.loss_saved_bytes = b(out.loss_saved_bytes)
        if out.loss_extra_s is not None:
            out.loss_extra_s *= r
        out.heads = {k: HeadFigures(h.extra_s * r, b(h.saved_bytes),
                                    h.fwd_transient if h.fixed_transient else b(h.fwd_transient),
                                    h.bwd_transient if h.fixed_transient else b(h.bwd_transient),
                                    h.exact, h.max_rel_error, h.fixed_transient)
                     for k, h in out.heads.items()}
        out.pre_bytes = b(out.pre_bytes)
        out.tokens = None if out.tokens is None else b(out.tokens)
        out.step_samples = {k: [v * r for v in vs] for k, vs in out.step_samples.items()}
        return out

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
    head: str = "none"
    peak_bytes: int = 0
    peak_moment: str = ""

    @property
    def loss_checkpoint(self) -> bool:
        """The head option is the bitwise loss checkpoint."""
        return self.head == "checkpoint"

    @property
    def engine_layers(self) -> int:
        """The engine's ``num_layers`` argument: one past the index of the last layer that
        offloads (0: none).  Not a count: a layer before it may offload nothing (its
        choice's level 0 opts it out)."""
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


class _Bytes:
    """Per layer and choice: ``(moved, resident, saved, none_saved, moved at level 1)``
    bytes, computed once
    per figures object (the search predicts thousands of plans on the same figures)."""

    def __init__(self, f: ModelFigures) -> None:
        self.f, self.cache = f, {}

    def __call__(self, j: int, c: Choice) -> tuple:
        key = (j, c)
        got = self.cache.get(key)
        if got is None:
            lf = self.f.layers[j]
            moved = lf.moved(c)
            first = min(moved, lf.moved(Choice(c.recompute, 1))) if c.offload else 0
            got = self.cache[key] = (moved, resident_bytes(lf.groups[c.recompute], c.offload),
                                     lf.saved(c.recompute), lf.saved("none"), first)
        return got


def _bytes_of(f: ModelFigures) -> _Bytes:
    b = f.__dict__.get("_bytes")
    if b is None or b.f is not f:
        b = f.__dict__["_bytes"] = _Bytes(f)
    return b


def _simulate(f: ModelFigures, choices: Sequence[Choice], moved: Sequence[int], p: int,
              lag: int) -> tuple:
    """``(forward end, step end)`` seconds of the schedule in the module docstring."""
    L = len(f.layers)
    t = f.pre_fwd_s
    d2h, copied = 0.0, [None] * L
    inv_d2h, inv_h2d = 1.0 / f.d2h_Bps, 1.0 / f.h2d_Bps
    for j, lf in enumerate(f.layers):
        i = j - lag
        if i >= 0 and copied[i] is not None and copied[i] > t:
            t = copied[i]
        start = t
        t += lf.fwd_s
        if moved[j]:
            d2h = max((d2h if d2h > start else start) + moved[j] * inv_d2h, t)
            copied[j] = d2h
    fwd_end = max([t] + [c for c in copied if c is not None]) + f.post_fwd_s
    t = fwd_end + f.post_bwd_s
    h2d, landed = t, [None] * L
    nxt = L - 1                       # the next layer whose reload is not issued yet
    for j in range(L - 1, -1, -1):
        lo = j - p if j - p > 0 else 0
        while nxt >= lo:
            if moved[nxt]:
                h2d = (t if t > h2d else h2d) + moved[nxt] * inv_h2d
                landed[nxt] = h2d
            nxt -= 1
        if landed[j] is not None and landed[j] > t:
            t = landed[j]
        lf = f.layers[j]
        t += lf.bwd_s + lf.extra_s.get(choices[j].recompute, 0.0)
    return fwd_end, t + f.pre_bwd_s


def _layer_peak(f: ModelFigures, choices: Sequence[Choice], moved, resident, saved, p: int,
                lag: int) -> Tuple[int, str]:
    """``(bytes, moment)``: the highest of the moments inside the layers (module docstring,
    "Peak"): entering each layer in the forward, each layer's backward."""
    L = len(f.layers)
    res_sum, back_sum = [0], [0]                                 # prefix sums
    for r, x, m in zip(resident, saved, moved):
        res_sum.append(res_sum[-1] + r)
        back_sum.append(back_sum[-1] + (x - r if m else 0))     # what a reload brings back

    def window(lo: int, hi: int) -> int:                         # back[lo..hi-1]
        lo = max(lo, 0)
        return back_sum[hi] - back_sum[lo] if hi > lo else 0
    best = (0, "")
    for j in range(1, L):          # entering layer j, before layer j - lag is released
        held = f.pre_bytes + res_sum[j] + window(j - lag, j)
        if held > best[0]:
            best = (held, f"forward, entering layer {j}")
    for j in range(L - 1, -1, -1):
        lf = f.layers[j]
        here = lf.bwd_fixed + res_sum[j + 1] + window(j - p, j + 1) + \
            lf.bwd_transient.get(choices[j].recompute, 0)
        if here > best[0]:
            best = (here, f"backward of layer {j} ({choices[j].recompute})")
    return best


def _predictions(f: ModelFigures, choices: Sequence[Choice], release_lag, heads: Sequence[str],
                 prefetch_layers: Optional[int], peak_limit: Optional[int]) -> List[Prediction]:
    """One :class:`Prediction` per head option for the layer ``choices``: the layers'
    schedule and peak are computed once per prefetch depth; a head option adds its cost,
    its saving and its two moments (the forward's end and the loss's backward), which do
    not depend on the depth."""
    L = len(f.layers)
    if len(choices) != L:
        raise ValueError(f"need {L} choices, got {len(choices)}")
    for h in heads:
        if h not in f.heads:
            raise ValueError(f"head option {h!r} was not measured (measured: {sorted(f.heads)})")
    nbytes = _bytes_of(f)
    figs = [nbytes(j, c) for j, c in enumerate(choices)]
    moved = [x[0] for x in figs]
    resident = [x[1] for x in figs]
    saved = [x[2] for x in figs]
    act = f.act_none_bytes - sum(x[3] - x[1] for x in figs)
    k = max((i + 1 for i, c in enumerate(choices) if c.offload), default=0)
    lag = release_lag(k, L) if k else L
    if prefetch_layers is not None:
        depths = [prefetch_layers]
    else:
        depths = range(1, min(L, MAX_PREFETCH) + 1) if k else [0]
    runs, worse = [], 0
    for p in depths:                   # deeper prefetch: never slower, never a lower peak
        fwd, step = _simulate(f, choices, moved, p, lag)
        peak, moment = _layer_peak(f, choices, moved, resident, saved, p, lag)
        runs.append((p, fwd, step, peak, moment))
        if peak_limit is not None and peak > peak_limit:
            break                      # deeper ones only add bytes
        if len(runs) > 1 and step >= runs[-2][2] * (1 - 1e-9):
            worse += 1
            if worse >= 2:
                break                  # two depths without a gain: the copies are hidden
        else:
            worse = 0
    cost = sum(x[4] * f.attention_s_per_byte + (x[0] - x[4]) * f.block_s_per_byte
               for x in figs)               # ModelFigures.offload_cost_s, from cached bytes
    out = []
    for h in heads:
        hf = f.heads[h]
        a = act - hf.saved_bytes
        head_peak = max((a + hf.fwd_transient, "forward end (loss)"),
                        (a + hf.bwd_transient, "loss backward"))
        best = None
        for p, fwd, step, peak, moment in runs:
            total = max(head_peak, (peak, moment))
            fits = peak_limit is None or total[0] <= peak_limit
            if best is None or (fits and not best[0]) or (fits == best[0] and step < best[3] * (1 - 1e-9)):
                best = (fits, p, fwd, step, total)
        fits, p, fwd, step, (peak, moment) = best
        out.append(Prediction(tuple(choices), p, step + hf.extra_s + cost, fwd, a, tuple(moved),
                              h, peak, moment))
    return out


def predict(f: ModelFigures, choices: Sequence[Choice], release_lag,
            prefetch_layers: Optional[int] = None, loss_checkpoint: bool = False, *,
            head: Optional[str] = None, peak_limit: Optional[int] = None) -> Prediction:
    """Predicted figures of ``choices``; ``prefetch_layers=None`` picks the fastest depth
    (with ``peak_limit``: the fastest whose peak fits, when one does).  ``release_lag(k, L)``
    is the engine's release rule; ``head`` (or ``loss_checkpoint=True`` for
    ``"checkpoint"``) the head option, with its cost and saving."""
    head = head if head is not None else ("checkpoint" if loss_checkpoint else "none")
    return _predictions(f, choices, release_lag, [head], prefetch_layers, peak_limit)[0]


#: When a plan offers a layer a recompute option it does not have (a dense layer among MoE
#: layers, a layer without norms), the layer gets the first of these it has instead.
FALLBACK = {"norms+fc1": ("norms+experts", "norms+mlp", "norms", "none"),
            "norms+experts": ("norms+fc1", "norms+mlp", "norms", "none"),
            "norms+mlp": ("norms+experts", "norms", "none"), "norms": ("none",),
            "layer": ("none",), "none": ()}


def _all_choices(f: ModelFigures) -> List[Choice]:
    """Every choice some layer offers (recompute options of any layer, in first-seen
    order, each with its offload levels)."""
    opts: List[str] = []
    for lf in f.layers:
        opts += [o for o in lf.options if o not in opts]
    out = []
    for r in opts:
        levels = (0, 3) if r == "layer" else tuple(OFFLOAD_LEVELS)
        out += [Choice(r, o) for o in levels]
    return out


def applied(lf: LayerFigures, c: Choice) -> Choice:
    """``c`` as layer ``lf`` can take it: the same choice when the layer offers its option,
    else the first option of :data:`FALLBACK` it offers, at the same offload level."""
    if c.recompute in lf.groups:
        return c
    for r in FALLBACK.get(c.recompute, ()) + ("none",):
        if r in lf.groups:
            return Choice(r, (3 if c.offload else 0) if r == "layer" else c.offload)
    raise ValueError(f"layer offers none of {c.recompute!r}'s fallbacks (measured: {lf.options})")


def search(f: ModelFigures, release_lag, allowed: Optional[Sequence[Choice]] = None, *,
           heads: Optional[Sequence[str]] = None, peak_limit: Optional[int] = None) -> List[Prediction]:
    """Every candidate plan (see the module docstring), deduplicated, for each head option
    in ``heads`` (default: every measured one); ``peak_limit`` steers each plan's prefetch
    depth (see :func:`predict`)."""
    L = len(f.layers)
    choices = list(allowed) if allowed is not None else _all_choices(f)
    heads = [h for h in (heads if heads is not None else f.heads) if h in f.heads]
    splits = range(0, L + 1) if L <= SPLIT_GRID else sorted(
        {round(L * q / SPLIT_GRID) for q in range(SPLIT_GRID + 1)} | {1, 2, 3, L - 1})
    seen, out = set(), []
    for lead in choices:
        for rest in choices:
            for m in splits:
                if (m == 0 and lead != choices[0]) or (m == L and rest != choices[0]):
                    continue
                plan = tuple(applied(lf, lead if i < m else rest) for i, lf in enumerate(f.layers))
                if plan in seen:
                    continue
                seen.add(plan)
                out.extend(_predictions(f, plan, release_lag, heads, None, peak_limit))
    return out


def refine(f: ModelFigures, start: Prediction, release_lag, better, fits,
           allowed: Optional[Sequence[Choice]] = None, max_passes: int = 4, *,
           peak_limit: Optional[int] = None) -> Prediction:
    """Local search from ``start``: change one layer's choice at a time, keep a change when
    the new plan ``fits`` and is ``better`` than the current one; stop after a pass
    without a change (or ``max_passes``)."""
    choices = list(allowed) if allowed is not None else _all_choices(f)
    best = start
    for _ in range(max_passes):
        changed = False
        for i in range(len(f.layers)):
            for c in choices:
                if c.recompute not in f.layers[i].groups or c == best.choices[i]:
                    continue
                plan = list(best.choices)
                plan[i] = c
                p = predict(f, plan, release_lag, head=best.head, peak_limit=peak_limit)
                if fits(p) and better(p, best):
                    best, changed = p, True
        if not changed:
            break
    return best
