"""Plan per-layer saving modes for a memory budget: which layers offload, which recompute fc1.

Pure functions on measured per-layer figures (no torch).  A :class:`Plan` of an ``L``-layer
stack says:

- the first ``k`` layers offload everything they save (``offload_mode`` ``"activation"``:
  ``x`` and the fc1 output; ``"fc1"``: only ``x``, fc1 recomputed in backward;
  ``"checkpoint"``: ``offloaded_checkpoint``, only ``x``, the whole layer recomputed --
  used only with ``k = L``, the smallest memory when fc1 mode does not exist);
- ``fc1_layers``: every layer that runs ``GroupedMLP(recompute="fc1")`` (offloaded or not);
- ``prefetch_layers`` ``p``: reloads the engine issues ahead in backward.

The schedule model (the engine's semantics, ``moe_offload/offload/context.py``), simulated
layer by layer by :func:`simulate`:

Forward.  Compute runs the layers back to back (``fwd_s`` each).  One D2H stream copies the
offloaded bytes in order at ``d2h_Bps``; a layer's ``x`` part is ready when the layer starts,
the rest (fc1 output) when it ends.  Entering layer ``j`` waits for the copies of layer
``i = j - max(2, L - k)`` (forced release), and the forward ends only when every copy is done
(all offloaded layers are released at the exit of the last layer).  So the forward time is
``max(T_fwd, D2H time)`` roughly, plus what the forced releases add.

Backward.  Layers ``L-1 .. 0``; a layer takes ``bwd_s`` (+ ``fc1_extra_s`` in fc1 mode,
+ ``ckpt_extra_s`` in checkpoint mode).  When backward reaches layer ``j`` the engine issues
the reloads of layers ``j, j-1, .., j-p`` not yet issued; one H2D stream serves them in
order at ``h2d_Bps``; layer ``i`` starts only when its reload has landed.

Memory after forward (what the benchmark's ``act`` measures) is
``output_bytes + sum over layers of (resident saved bytes + kept_bytes)`` where an offloaded
layer has no resident saved bytes, a checkpointed one keeps nothing at all, and layer 0's
saved input (``input_bytes``) never counts: the caller allocated it before the forward (the
runners mark it not-offload too, so it is never copied either).

Approximations (say so when reading predicted vs measured): copies run at the measured
pinned bandwidth while compute runs at full speed (no contention); forward time does not
depend on the mode; the per-layer figures are means over the stack.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

__all__ = ["LayerCosts", "Plan", "OFFLOAD_MODES", "layer_memory", "plan_memory", "simulate",
           "candidate_plans", "plan_for_budget", "plan_hidden", "prefetch_for", "costs_from_measurements"]

OFFLOAD_MODES = ("activation", "fc1", "checkpoint")


@dataclass(frozen=True)
class LayerCosts:
    """Measured figures of one layer of a uniform ``num_layers``-layer stack.

    Times in seconds, sizes in bytes, bandwidths in bytes/s.
    ``act_bytes`` / ``fc1_bytes``: bytes one layer saves that the engine would move, in
    activation / fc1 mode (each includes the layer's input ``x``).  ``fc1_extra_s``: extra
    backward time of fc1 mode (``None``: the layer has no fc1 mode).  ``ckpt_extra_s``:
    extra backward time of full recomputation (``None``: ``fwd_s``).  ``kept_bytes``: saved
    bytes per layer too small to move (stay on the device even when the layer offloads).
    ``input_bytes``: the part of layer 0's saved bytes that is the stack input.
    ``output_bytes``: what the forward leaves on the device whatever the plan (the output)."""
    fwd_s: float
    bwd_s: float
    act_bytes: int
    fc1_bytes: int
    output_bytes: int
    num_layers: int
    d2h_Bps: float
    h2d_Bps: float
    fc1_extra_s: Optional[float] = None
    ckpt_extra_s: Optional[float] = None
    kept_bytes: int = 0
    input_bytes: int = 0

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"LayerCosts.num_layers must be an int >= 1, got {self.num_layers!r}")
        if self.d2h_Bps <= 0 or self.h2d_Bps <= 0:
            raise ValueError(f"LayerCosts bandwidths must be > 0, got d2h={self.d2h_Bps} h2d={self.h2d_Bps}")
        for name in ("fwd_s", "bwd_s", "act_bytes", "fc1_bytes", "output_bytes", "kept_bytes",
                     "input_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"LayerCosts.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.fc1_bytes > self.act_bytes or self.input_bytes > self.fc1_bytes:
            raise ValueError("LayerCosts needs input_bytes <= fc1_bytes <= act_bytes, got "
                             f"{self.input_bytes}, {self.fc1_bytes}, {self.act_bytes}")

    @property
    def has_fc1(self) -> bool:
        """True when the layers have an fc1-recompute mode."""
        return self.fc1_extra_s is not None

    @property
    def recompute_s(self) -> float:
        """Extra backward time of a fully recomputed (checkpointed) layer."""
        return self.fwd_s if self.ckpt_extra_s is None else self.ckpt_extra_s


@dataclass(frozen=True)
class Plan:
    """One configuration and its predictions (see the module docstring)."""
    offloaded_layers: int
    offload_mode: str
    fc1_layers: tuple
    prefetch_layers: int
    predicted_s: float
    predicted_fwd_s: float
    predicted_bytes: int

    def mode_of(self, i: int) -> str:
        """``"activation"``, ``"fc1"`` or ``"checkpoint"`` for layer ``i``."""
        if i < self.offloaded_layers and self.offload_mode == "checkpoint":
            return "checkpoint"
        return "fc1" if i in self.fc1_layers else "activation"

    def to_dict(self) -> dict:
        """JSON-able form (``fc1_layers`` as a list)."""
        d = asdict(self)
        d["fc1_layers"] = list(self.fc1_layers)
        return d


def _saved(c: LayerCosts, i: int, mode: str) -> int:
    """Bytes layer ``i`` saves that count / move (layer 0's input excluded)."""
    full = c.act_bytes if mode == "activation" else c.fc1_bytes
    return full - (c.input_bytes if i == 0 else 0)


def layer_memory(c: LayerCosts, i: int, mode: str, offloaded: bool) -> int:
    """Bytes layer ``i`` leaves on the device after the forward."""
    if mode == "checkpoint":
        return 0 if offloaded else _saved(c, i, mode)
    return c.kept_bytes + (0 if offloaded else _saved(c, i, mode))


def _modes(c: LayerCosts, k: int, offload_mode: str, fc1_layers: Sequence[int]) -> list:
    if offload_mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload_mode {offload_mode!r}; expected one of {OFFLOAD_MODES}")
    if not 0 <= k <= c.num_layers:
        raise ValueError(f"offloaded layers must be in 0..{c.num_layers}, got {k}")
    if fc1_layers and not c.has_fc1:
        raise ValueError("fc1 layers requested but the layers have no fc1 mode (fc1_extra_s is None)")
    return ["checkpoint" if i < k and offload_mode == "checkpoint"
            else "fc1" if i in fc1_layers else "activation" for i in range(c.num_layers)]


def plan_memory(c: LayerCosts, k: int, offload_mode: str, fc1_layers: Sequence[int] = ()) -> int:
    """Predicted memory after forward (bytes) of a plan."""
    modes = _modes(c, k, offload_mode, fc1_layers)
    return c.output_bytes + sum(layer_memory(c, i, m, i < k) for i, m in enumerate(modes))


def simulate(c: LayerCosts, k: int, offload_mode: str, fc1_layers: Sequence[int] = (),
             prefetch_layers: int = 1) -> tuple:
    """``(forward_end_s, step_s)`` of a plan under the schedule model (module docstring)."""
    modes = _modes(c, k, offload_mode, fc1_layers)
    L = c.num_layers
    gap = max(2, L - k)
    # Forward: compute clock t, D2H stream free at d2h; copied[i] = when layer i's copies end.
    t, d2h, copied = 0.0, 0.0, {}
    for j in range(L):
        i = j - gap
        if 0 <= i < k:
            t = max(t, copied[i])  # forced release of layer i: compute waits for its copy
        if j < k:
            saved = _saved(c, j, modes[j])
            x_part = min(saved, _saved(c, j, "fc1"))  # ready as the layer starts
            d2h = max(t, d2h) + x_part / c.d2h_Bps
            t += c.fwd_s
            d2h = max(t, d2h) + (saved - x_part) / c.d2h_Bps
            copied[j] = d2h
        else:
            t += c.fwd_s
    fwd_end = max([t] + list(copied.values()))
    # Backward: layer j issues reloads of j..j-p not yet issued; one H2D stream in order.
    t, h2d, landed = fwd_end, fwd_end, {}
    for j in range(L - 1, -1, -1):
        for i in range(j, max(j - prefetch_layers, 0) - 1, -1):
            if i < k and i not in landed:
                h2d = max(t, h2d) + _saved(c, i, modes[i]) / c.h2d_Bps
                landed[i] = h2d
        if j < k:
            t = max(t, landed[j])
        extra = {"activation": 0.0, "fc1": c.fc1_extra_s or 0.0, "checkpoint": c.recompute_s}
        t += c.bwd_s + extra[modes[j]]
    return fwd_end, t


def prefetch_for(c: LayerCosts, k: int, offload_mode: str, fc1_layers: Sequence[int] = ()) -> int:
    """Prefetch depth ``p`` of a plan (0 when ``k = 0``): at least
    ``ceil(H2D time of a layer / its backward time) + 1`` (slack against jitter the model
    does not see), and deeper if the model says it is still faster."""
    if k == 0:
        return 0
    modes = _modes(c, k, offload_mode, fc1_layers)
    extra = {"activation": 0.0, "fc1": c.fc1_extra_s or 0.0, "checkpoint": c.recompute_s}
    need = max(math.ceil((_saved(c, i, modes[i]) / c.h2d_Bps) / max(c.bwd_s + extra[modes[i]], 1e-12))
               for i in range(k))
    p = min(c.num_layers, need + 1)
    best = simulate(c, k, offload_mode, fc1_layers, p)[1]
    for q in range(p + 1, c.num_layers + 1):
        s = simulate(c, k, offload_mode, fc1_layers, q)[1]
        if s < best * (1 - 1e-9):
            p, best = q, s
    return p


def _make(c: LayerCosts, k: int, offload_mode: str, fc1_layers: Sequence[int],
          deep: bool = False) -> Plan:
    """The plan with its predictions; ``deep``: prefetch every offloaded layer (``p = k``)."""
    fc1 = tuple(sorted(fc1_layers))
    p = max(prefetch_for(c, k, offload_mode, fc1), k if deep else 0)
    fwd, step = simulate(c, k, offload_mode, fc1, p)
    return Plan(k, offload_mode, fc1, p, step, fwd, plan_memory(c, k, offload_mode, fc1))


def candidate_plans(c: LayerCosts) -> list:
    """Every plan the planner considers: ``k`` in ``0..L``, the offloaded layers' mode in
    {activation, fc1}, ``r`` fc1 layers among the resident ones (the first ``r`` of them:
    where they sit does not change the model's time or memory), and checkpoint on all ``L``."""
    L, out = c.num_layers, []
    omodes = ("activation", "fc1") if c.has_fc1 else ("activation",)
    for k in range(L + 1):
        for om in (omodes if k else ("activation",)):
            for r in range(L - k + 1 if c.has_fc1 else 1):
                fc1 = (list(range(k)) if om == "fc1" else []) + list(range(k, k + r))
                out.append(_make(c, k, om, fc1))
    out.append(_make(c, L, "checkpoint", ()))
    return out


def _key(p: Plan) -> tuple:
    return (p.predicted_s, p.predicted_bytes, p.offloaded_layers, len(p.fc1_layers))


def plan_for_budget(c: LayerCosts, budget_bytes: int) -> Optional[Plan]:
    """The predicted-fastest plan whose memory after forward is ``<= budget_bytes`` (ties:
    less memory, fewer offloaded layers, fewer fc1 layers); ``None`` when no plan fits (the
    budget is below the output plus what no plan can remove)."""
    fits = [p for p in candidate_plans(c) if p.predicted_bytes <= budget_bytes]
    return min(fits, key=_key) if fits else None


def plan_hidden(c: LayerCosts, time_tol: float = 1.02, fc1_all: bool = False) -> Plan:
    """The least-memory plan predicted within ``time_tol`` of its base (ties: faster).

    ``fc1_all=False``: base = no saving trick; any plan may be picked (in practice pure
    offload hidden under the forward).  ``fc1_all=True``: every layer in fc1 mode, offload of
    the first ``k`` (base = fc1 everywhere, no offload), prefetching all ``k`` layers at once
    (``p = k``: x reloads are small, so holding them early costs little)."""
    if fc1_all:
        if not c.has_fc1:
            raise ValueError("plan_hidden(fc1_all=True) needs layers with an fc1 mode")
        every = tuple(range(c.num_layers))
        plans = [_make(c, k, "fc1", every, deep=True) for k in range(c.num_layers + 1)]
    else:
        plans = candidate_plans(c)
    base = plans[0].predicted_s  # k = 0 (and r = 0 without fc1_all)
    ok = [p for p in plans if p.predicted_s <= base * time_tol]
    return min(ok, key=lambda p: (p.predicted_bytes, p.predicted_s))


def costs_from_measurements(*, num_layers: int, none_fwd_s: float, none_bwd_s: float,
                            none_act_bytes: int, act_saved_bytes: int, fc1_saved_bytes: Optional[int],
                            x_bytes: int, output_bytes: int, d2h_Bps: float, h2d_Bps: float,
                            fc1_bwd_s: Optional[float] = None, ckpt_bwd_s: Optional[float] = None) -> LayerCosts:
    """Per-layer :class:`LayerCosts` from the rows a benchmark already measured.

    Times: the ``none`` row's forward and backward divided by ``L``; fc1's extra = (fc1 row's
    backward - none's backward) / L; recompute's extra likewise from a checkpoint row (else
    the layer's forward time).  Bytes: ``*_saved_bytes`` are what the whole stack saves in
    tensors large enough to move (counted by saved-tensor hooks), divided by ``L``;
    ``kept_bytes`` is what ``none``'s measured memory holds beyond them and the output,
    per layer (small saved tensors and allocator rounding; clipped at 0)."""
    L = num_layers
    act = act_saved_bytes // L
    fc1 = fc1_saved_bytes // L if fc1_saved_bytes is not None else min(act, x_bytes)
    kept = max(0, (none_act_bytes - output_bytes + x_bytes - act_saved_bytes) // L)
    return LayerCosts(
        fwd_s=none_fwd_s / L, bwd_s=none_bwd_s / L, act_bytes=act, fc1_bytes=fc1,
        output_bytes=output_bytes, num_layers=L, d2h_Bps=d2h_Bps, h2d_Bps=h2d_Bps,
        fc1_extra_s=None if fc1_bwd_s is None else max(0.0, (fc1_bwd_s - none_bwd_s) / L),
        ckpt_extra_s=None if ckpt_bwd_s is None else max(0.0, (ckpt_bwd_s - none_bwd_s) / L),
        kept_bytes=kept, input_bytes=min(x_bytes, fc1))
