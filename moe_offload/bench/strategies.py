"""The strategies as data: one :class:`Strategy` per benchmark row, and the runners.

A :class:`Runner` binds a strategy to a stack: it runs one step's forward
(``forward(layers, x) -> y``; the backward is ``y.backward(dy)``), reports the bytes it
moved each way in that step, and undoes what it installed at :meth:`Runner.close`.
Adding a strategy is one :class:`Strategy` entry in :func:`strategy_list`.

The peers are torch's own: ``save_on_cpu`` around the forward, ``checkpoint`` per layer.

Every row of ours is a :class:`~moe_offload.plan.MemoryPlan` of the general planner, run by
:class:`PlanRunner` through ``plan.apply()`` (the recompute switches, and the offload
engine entered around each layer's call by :class:`~moe_offload.OffloadedLayers`).  The
plans are built on the stack's figures, measured once per stack by
:func:`~moe_offload.plan.measure_model` (``PlanInfo.figures``):

- fixed rows give the per-layer choices (:func:`~moe_offload.plan.make_plan`):
  ``offload_but_last`` / ``offload_all`` / ``offload_partial`` offload everything the first
  ``L-1`` / ``L`` / ``L/2`` layers save (``Choice("none", 3)``); ``offload_recompute_all``
  checkpoints every layer and offloads its inputs (``Choice("layer", 3)``);
- ``offload_hideable``, ``fc1_recompute+offload`` and ``<recipe>+offload`` are the least
  step peak the planner predicts within 1.02x of its stack's step without a plan
  (``plan_memory(budget_bytes=None, max_time_x=1.02)``); on the ``fused/fc1`` and recipe
  stacks only offload is measured (``options=("none",)``), so those rows only offload;
- ``plan@<peer>`` is the fastest plan whose predicted step **peak** (above the step start,
  parameter gradients allocated: the planner's ``budget_bytes``) is at most the peer's
  measured step peak (``peak_step_bytes``, the smallest over the stacks it ran on, so one
  row serves the engine and the system comparison); ``plan@half-<peer>`` half of it;
  ``plan@half-none`` half the largest no-plan peak.  Budgets are peaks, not the activation
  memory after the forward: the peak is what decides whether a step fits.

A leaf input that requires grad (the stack input) never travels: the caller holds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..plan import Choice, make_plan, plan_memory

__all__ = ["Strategy", "Runner", "PlanInfo", "PlanRunner", "plan_dict", "strategy_list",
           "strategy_names", "PEER_FAMILIES", "Skip", "HIDDEN_TIME_X"]

PEER_FAMILIES = ("save_on_cpu", "checkpoint")

#: The time limit of the "hidden" rows, relative to the stack's step without a plan.
HIDDEN_TIME_X = 1.02


@dataclass
class PlanInfo:
    """What a runner may need when it is built: the stack's layer count, device and layer
    list (``model``), the engine's size threshold (small problems lower it so something
    moves), ``figures()``: the stack's planner figures (``measure_model``'s
    ``(layers, ModelFigures)``, measured on first use), and ``peer_peak_bytes``:
    ``{peer strategy: its smallest measured step peak}`` (``"none"``: the largest)."""
    num_layers: int
    cuda: bool
    model: Optional[nn.Module] = None
    figures: Optional[Callable[[], tuple]] = None
    min_offload_bytes: int = 256 * 1024
    peer_peak_bytes: Optional[dict] = None


class Skip(Exception):
    """Raised by a ``make`` when the strategy does not apply to this run."""


class Runner:
    """One strategy bound to a stack.  Subclasses override :meth:`forward`."""

    def forward(self, layers, x: torch.Tensor) -> torch.Tensor:
        """Forward of one step -> output (backward is ``y.backward(dy)``)."""
        for layer in layers:
            x = layer(x)
        return x

    def begin_step(self) -> None:
        """Called before each step (resets per-step counters)."""

    def moved_bytes(self) -> tuple:
        """``(d2h_bytes, h2d_bytes)`` moved by the last step."""
        return 0, 0

    def stats(self) -> dict:
        """Extra engine statistics of the last step (JSON-able)."""
        return {}

    def close(self) -> None:
        """Undo what the runner installed (hooks, wrappers, contexts)."""


class SaveOnCpuRunner(Runner):
    """``torch.autograd.graph.save_on_cpu`` around the whole forward (pinned on CUDA).

    It moves every saved tensor, parameters included, counted as its pack hook sees them;
    on the CPU it moves nothing (reported as 0)."""

    def __init__(self, info: PlanInfo):
        self.cuda, self.nbytes = info.cuda, 0

    def forward(self, layers, x):
        hooks = torch.autograd.graph.save_on_cpu(pin_memory=self.cuda)
        pack = hooks.pack_hook

        def counting(t):
            self.nbytes += t.numel() * t.element_size()
            return pack(t)
        hooks.pack_hook = counting
        with hooks:
            return super().forward(layers, x)

    def begin_step(self):
        self.nbytes = 0

    def moved_bytes(self):
        return (self.nbytes, self.nbytes) if self.cuda else (0, 0)


class CheckpointRunner(Runner):
    """``torch.utils.checkpoint`` per layer (``use_reentrant=False``)."""

    def forward(self, layers, x):
        for layer in layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x


class PlanRunner(Runner):
    """Runs a :class:`~moe_offload.plan.MemoryPlan`: ``plan.apply()`` when built, the plain
    layer loop per step, the engine's counters from the plan's handle, ``remove()`` at
    :meth:`close` (the stack is as before)."""

    def __init__(self, plan):
        self.plan = plan
        self.handle = plan.apply()

    def begin_step(self):
        self.handle.reset_stats()

    def moved_bytes(self):
        s = self.handle.stats()
        return int(s.get("offloaded_bytes", 0)), int(s.get("reloaded_bytes", 0))

    def stats(self):
        return {k: v for k, v in self.handle.stats().items() if isinstance(v, (int, float, str, bool))}

    def close(self):
        self.handle.remove()


def plan_dict(plan) -> dict:
    """A plan's row fields (JSON-able; see :mod:`moe_offload.bench.report_json`)."""
    return {"choices": [str(c) for c in plan.choices], "prefetch_layers": plan.prefetch_layers,
            "offloaded_layers": plan.prediction.engine_layers, "budget_bytes": plan.budget_bytes,
            "predicted_s": plan.predicted_step_s, "predicted_fwd_s": plan.prediction.fwd_s,
            "predicted_bytes": plan.predicted_activation_bytes,
            "predicted_peak_bytes": plan.predicted_peak_bytes, "peak_moment": plan.peak_moment}


def _figures(info: PlanInfo) -> tuple:
    if info.figures is None or info.model is None:
        raise Skip("no planner figures for this stack")
    return info.figures()


def _fixed(choices: Callable[[int], list]) -> Callable[[PlanInfo], Runner]:
    """A row that runs the given per-layer choices (``choices(L)``)."""
    def make(info: PlanInfo) -> Runner:
        return PlanRunner(make_plan(info.model, _figures(info), choices(info.num_layers),
                                    min_offload_bytes=info.min_offload_bytes, emulate=not info.cuda))
    return make


def _but_last(L: int) -> list:
    if L < 2:
        raise Skip("needs >= 2 layers")
    return [Choice("none", 3)] * (L - 1) + [Choice("none", 0)]


def _first(k_of: Callable[[int], int], choice: Choice) -> Callable[[int], list]:
    return lambda L: [choice] * k_of(L) + [Choice("none", 0)] * (L - k_of(L))


def _hidden(info: PlanInfo) -> Runner:
    """The least peak the planner predicts within :data:`HIDDEN_TIME_X` of no plan."""
    plan = plan_memory(info.model, None, None, max_time_x=HIDDEN_TIME_X, figures=_figures(info),
                       min_offload_bytes=info.min_offload_bytes, emulate=not info.cuda)
    if all(c == Choice("none", 0) for c in plan.choices):
        raise Skip(f"the planner finds no saving within {HIDDEN_TIME_X}x of no plan")
    return PlanRunner(plan)


def _budgeted(peer: str, fraction: float) -> Callable[[PlanInfo], Runner]:
    """The fastest plan whose predicted step peak fits ``fraction`` of ``peer``'s measured one."""
    def make(info: PlanInfo) -> Runner:
        peak = (info.peer_peak_bytes or {}).get(peer)
        if peak is None:
            raise Skip(f"{peer} was not measured (its step peak is the budget)")
        budget = int(peak * fraction)
        figures = _figures(info)
        try:
            plan = plan_memory(info.model, None, budget, figures=figures,
                               min_offload_bytes=info.min_offload_bytes, emulate=not info.cuda)
        except ValueError as e:
            raise Skip(f"no plan fits {budget / 2**20:.1f} MiB: {e}") from None
        return PlanRunner(plan)
    return make


def _planned_rows() -> list:
    rows = []
    for peer in PEER_FAMILIES:
        for tag, fraction in (("", 1.0), ("half-", 0.5)):
            what = "the" if not tag else "half the"
            rows.append(Strategy(
                f"plan@{tag}{peer}", "planned", "ours", "", "none", _budgeted(peer, fraction),
                description=f"planner's fastest plan within {what} step peak of {peer}",
                needs=(peer,), after_peers=True))
    rows.append(Strategy(
        "plan@half-none", "planned", "ours", "", "none", _budgeted("none", 0.5),
        description="planner's fastest plan within half the largest no-offload step peak "
                    "(the system-level 'hideable' point)", after_peers=True))
    return rows


@dataclass(frozen=True)
class Strategy:
    """One benchmark row.

    ``variant``: the stack variant it runs on: ``""`` (the plain fused/unfused stack),
    ``"fc1"`` (``fused/fc1``) or ``"recipe"`` (``fused/<recipe>``).
    ``owner``: ``"baseline"``, ``"peer"`` or ``"ours"``.  ``family``: what it does.
    ``reference``: the strategy (same stack) whose gradients must be bitwise equal;
    ``None``: no bitwise expectation (different numerics).
    ``fused_only``: needs our fused stack (ops-level features).
    ``make(info) -> Runner``.  ``needs``: strategies whose rows it uses (they run too);
    ``after_peers``: run after every stack's peers (its budget comes from them)."""
    name: str
    family: str
    owner: str
    variant: str
    reference: Optional[str]
    make: Callable[[PlanInfo], Runner]
    fused_only: bool = False
    description: str = ""
    needs: tuple = ()
    after_peers: bool = False


def strategy_list(recipe: Optional[str]) -> list:
    """Every strategy, in run order (a variant's base runs before its combinations)."""
    everything = Choice("none", 3)
    rows = [
        Strategy("none", "none", "baseline", "", None, lambda info: Runner(),
                 description="no saving trick"),
        Strategy("save_on_cpu", "save_on_cpu", "peer", "", "none", SaveOnCpuRunner,
                 description="torch save_on_cpu (pinned on CUDA)"),
        Strategy("checkpoint", "checkpoint", "peer", "", "none", lambda info: CheckpointRunner(),
                 description="torch checkpoint per layer"),
        Strategy("fc1_recompute", "fc1_recompute", "ours", "fc1", "none", lambda info: Runner(),
                 fused_only=True, description="GroupedMLP recompute='fc1'"),
        Strategy("offload_but_last", "offload", "ours", "", "none", _fixed(_but_last),
                 description="our engine, every layer but the last (L-1)"),
        Strategy("offload_all", "offload", "ours", "", "none", _fixed(_first(lambda L: L, everything)),
                 description="our engine, all L layers"),
        Strategy("offload_partial", "offload", "ours", "", "none",
                 _fixed(_first(lambda L: max(1, L // 2), everything)),
                 description="our engine, first L/2 layers"),
        Strategy("offload_hideable", "planned", "ours", "", "none", _hidden,
                 description=f"least peak the planner predicts within {HIDDEN_TIME_X}x of none"),
        Strategy("offload_recompute_all", "offload_recompute", "ours", "", "none",
                 _fixed(_first(lambda L: L, Choice("layer", 3))),
                 description="every layer checkpointed, its inputs offloaded"),
        Strategy("fc1_recompute+offload", "fc1_recompute", "ours", "fc1", "fc1_recompute", _hidden,
                 fused_only=True,
                 description=f"recompute='fc1' everywhere + the least-peak offload within "
                             f"{HIDDEN_TIME_X}x"),
    ] + _planned_rows()
    if recipe is not None:
        rows += [
            Strategy(recipe, "quantized", "ours", "recipe", None, lambda info: Runner(),
                     fused_only=True, description=f"recipe {recipe!r}"),
            Strategy(f"{recipe}+offload", "quantized", "ours", "recipe", recipe, _hidden,
                     fused_only=True,
                     description=f"recipe {recipe!r} + the least-peak offload within {HIDDEN_TIME_X}x"),
        ]
    return rows


def strategy_names(recipe: Optional[str]) -> list:
    """Valid ``--strategies`` entries: every strategy name and family."""
    rows = strategy_list(recipe)
    names = [s.name for s in rows]
    return names + sorted({s.family for s in rows} - set(names))
