"""The strategies the benchmark compares, as data.

A :class:`Strategy` says which stack variant it runs on, who it belongs to (the
baseline, a peer, or ours), which strategy its gradients must equal bitwise, and how to
build a :class:`Runner` for a stack.  A runner does the forward of one step
(``forward(layers, x) -> y``) and reports the bytes it moved each way in that step.
Adding a strategy is one :class:`Strategy` entry in :func:`strategy_list`.

Planned rows (``offload_hideable``, ``fc1_recompute+offload``, ``plan@<peer>``,
``plan@half-<peer>``) get a :class:`~moe_offload.plan.stack.Plan` from
:mod:`~moe_offload.plan.stack` on per-layer figures measured by earlier rows
(``PlanInfo.costs``) and run it with :class:`PlannedRunner`.  ``plan@<peer>``'s budget is
the peer's measured activation memory (the smallest over the stacks it ran on, so one row
serves the engine and the system comparison), ``plan@half-<peer>``'s half of it.  The
quantized ``<recipe>+offload`` row still uses :func:`plan_hideable_layers` (bytes that fit
under the forward at the measured bandwidth).

Every offload runner marks the stack input not-offload: the caller holds it, so copying it
would free nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..plan.stack import LayerCosts, Plan, plan_for_budget, plan_hidden, prefetch_for

__all__ = ["Strategy", "Runner", "PlanInfo", "PlannedRunner", "plan_hideable_layers",
           "strategy_list", "strategy_names", "PEER_FAMILIES", "Skip"]

PEER_FAMILIES = ("save_on_cpu", "checkpoint")


def plan_hideable_layers(bytes_per_layer: float, bandwidth_Bps: float, fwd_time_s: float,
                         num_layers: int, margin: float = 0.9) -> int:
    """Largest ``k <= num_layers`` with ``k * bytes_per_layer <= bw * fwd_time * margin``."""
    if bytes_per_layer < 0 or bandwidth_Bps <= 0 or fwd_time_s < 0 or num_layers < 0:
        raise ValueError("plan_hideable_layers needs non-negative sizes and a positive bandwidth")
    if bytes_per_layer == 0:
        return num_layers
    return int(min(num_layers, (bandwidth_Bps * fwd_time_s * margin) // bytes_per_layer))


@dataclass
class PlanInfo:
    """What a runner may need to know when it is built: the run's layer count and device,
    the planner's hideable layer count for the stack, the bytes ``save_on_cpu`` moves,
    and the engine's size threshold (small problems lower it so something moves).
    ``costs``: the planner's per-layer figures of the stack (``None`` until the rows they
    come from ran); ``peer_act_bytes``: ``{peer strategy: smallest measured act bytes}``."""
    num_layers: int
    cuda: bool
    hideable_layers: int
    save_on_cpu_bytes: int = 0
    min_offload_bytes: int = 256 * 1024
    costs: Optional[LayerCosts] = None
    peer_act_bytes: Optional[dict] = None


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
        """Release what the runner holds (pinned buffers, contexts)."""


class SaveOnCpuRunner(Runner):
    """``torch.autograd.graph.save_on_cpu`` around the whole forward (pinned on CUDA).

    It moves every saved tensor, parameters included; the byte count comes from a
    counting pass (``PlanInfo.save_on_cpu_bytes``).  On the CPU it moves nothing."""

    def __init__(self, info: PlanInfo):
        self.cuda, self.nbytes = info.cuda, info.save_on_cpu_bytes

    def forward(self, layers, x):
        with torch.autograd.graph.save_on_cpu(pin_memory=self.cuda):
            return super().forward(layers, x)

    def moved_bytes(self):
        return (self.nbytes, self.nbytes) if self.cuda else (0, 0)


class CheckpointRunner(Runner):
    """``torch.utils.checkpoint`` per layer (``use_reentrant=False``)."""

    def forward(self, layers, x):
        for layer in layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x


class OffloadRunner(Runner):
    """Our engine: ``with ctx: x = layer(x); x = sync(x)`` for each layer.

    The first ``num_layers`` layers offload (``model_layers = L``).  With ``recompute``
    each layer runs as ``offloaded_checkpoint(layer, x)``: only its input is saved (and
    offloaded), the layer is recomputed in backward.  ``prefetch_layers``: passed to the
    engine (``None``: the planner's choice when ``info.costs`` is known, else the engine's
    default).  The stack input is marked not-offload (the caller holds it)."""

    def __init__(self, info: PlanInfo, num_layers: int, recompute: bool = False,
                 prefetch_layers: Optional[int] = None):
        from ..offload import get_cpu_offload_context, offloaded_checkpoint
        self.num_layers = num_layers
        self.checkpoint = offloaded_checkpoint if recompute else None
        if prefetch_layers is None and info.costs is not None and num_layers > 0:
            prefetch_layers = prefetch_for(info.costs, num_layers,
                                           "checkpoint" if recompute else "activation", ())
        self.prefetch_layers = 1 if prefetch_layers is None else prefetch_layers
        self.ctx, self.sync = get_cpu_offload_context(
            True, num_layers, info.num_layers, min_offload_bytes=info.min_offload_bytes,
            retain_pinned_cpu_buffers=True, prefetch_layers=self.prefetch_layers,
            emulate=not info.cuda)

    def forward(self, layers, x):
        from ..offload import mark_not_offload
        mark_not_offload(x)
        for layer in layers:
            with self.ctx:
                x = self.checkpoint(layer, x) if self.checkpoint else layer(x)
            x = self.sync(x)
        return x

    def begin_step(self):
        self.ctx.reset_stats()

    def moved_bytes(self):
        s = self.ctx.stats()
        return int(s.get("offloaded_bytes", 0)), int(s.get("reloaded_bytes", 0))

    def stats(self):
        return {k: v for k, v in self.ctx.stats().items() if isinstance(v, (int, float, str, bool))}

    def close(self):
        self.ctx = self.sync = None


class PlannedRunner(OffloadRunner):
    """Runs a :class:`~moe_offload.plan.stack.Plan`: layer ``i`` in ``plan.mode_of(i)``.

    fc1 layers get ``GroupedMLP.recompute = "fc1"`` for their forward only (the attribute
    is read at each forward; restored right after, so the stack is unchanged between
    steps); the first ``k`` layers offload with ``prefetch_layers = p``; checkpoint mode
    runs ``offloaded_checkpoint``.  ``k = 0`` builds no engine context."""

    def __init__(self, info: PlanInfo, plan: Plan, budget_bytes: Optional[int] = None):
        self.plan, self.budget_bytes = plan, budget_bytes
        if plan.offloaded_layers > 0:
            super().__init__(info, plan.offloaded_layers, plan.offload_mode == "checkpoint",
                             prefetch_layers=plan.prefetch_layers)
        else:
            self.num_layers, self.checkpoint, self.ctx, self.sync = 0, None, None, None

    def forward(self, layers, x):
        from ..offload import mark_not_offload, offloaded_checkpoint
        mark_not_offload(x)
        for i, layer in enumerate(layers):
            mode = self.plan.mode_of(i)
            mlp = getattr(layer, "mlp", None)
            if mode == "fc1" and not hasattr(mlp, "recompute"):
                raise TypeError(f"plan puts layer {i} in fc1 mode but {type(layer).__name__} "
                                "has no GroupedMLP.recompute")
            old = mlp.recompute if mode == "fc1" else None
            try:
                if mode == "fc1":
                    mlp.recompute = "fc1"
                if self.ctx is None:
                    x = layer(x)
                    continue
                with self.ctx:
                    x = offloaded_checkpoint(layer, x) if mode == "checkpoint" else layer(x)
                x = self.sync(x)
            finally:
                if mode == "fc1":
                    mlp.recompute = old
        return x

    def begin_step(self):
        if self.ctx is not None:
            self.ctx.reset_stats()

    def moved_bytes(self):
        return super().moved_bytes() if self.ctx is not None else (0, 0)

    def stats(self):
        return super().stats() if self.ctx is not None else {}


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


def _partial(info: PlanInfo) -> Runner:
    return OffloadRunner(info, max(1, info.num_layers // 2))


def _hideable(info: PlanInfo) -> Runner:
    if info.hideable_layers < 1:
        raise Skip("the hideable budget admits 0 layers")
    return OffloadRunner(info, info.hideable_layers)


def _need_costs(info: PlanInfo) -> LayerCosts:
    if info.costs is None:
        raise Skip("no per-layer figures for the planner (its base rows did not run)")
    return info.costs


def _planned_hidden(info: PlanInfo, fc1_all: bool = False) -> Runner:
    costs = _need_costs(info)
    if fc1_all and not costs.has_fc1:
        raise Skip("the stack has no fc1 mode")
    plan = plan_hidden(costs, time_tol=1.02, fc1_all=fc1_all)
    if plan.offloaded_layers < 1:
        raise Skip("the planner hides no layer under the forward")
    return PlannedRunner(info, plan)


def _planned_budget(peer: str, fraction: float) -> Callable[[PlanInfo], Runner]:
    def make(info: PlanInfo) -> Runner:
        costs = _need_costs(info)
        peer_bytes = (info.peer_act_bytes or {}).get(peer)
        if peer_bytes is None:
            raise Skip(f"{peer} was not measured (its act memory is the budget)")
        budget = int(peer_bytes * fraction)
        plan = plan_for_budget(costs, budget)
        if plan is None:
            raise Skip(f"no plan fits {budget / 2**20:.1f} MiB: the output alone is "
                       f"{costs.output_bytes / 2**20:.1f} MiB")
        return PlannedRunner(info, plan, budget)
    return make


def _planned_rows() -> list:
    rows = []
    for peer in PEER_FAMILIES:
        for tag, fraction in (("", 1.0), ("half-", 0.5)):
            what = "the" if not tag else "half the"
            rows.append(Strategy(
                f"plan@{tag}{peer}", "planned", "ours", "", "none", _planned_budget(peer, fraction),
                description=f"planner's fastest plan within {what} act memory of {peer}",
                needs=("none", "fc1_recompute", peer), after_peers=True))
    rows.append(Strategy(
        "plan@half-none", "planned", "ours", "", "none", _planned_budget("none", 0.5),
        description="planner's fastest plan within half the largest no-offload act memory "
                    "(the system-level 'hideable' point)",
        needs=("none", "fc1_recompute"), after_peers=True))
    return rows


class Skip(Exception):
    """Raised by a ``make`` when the strategy does not apply to this run."""


def strategy_list(recipe: Optional[str]) -> list:
    """Every strategy, in run order (a variant's base runs before its combinations)."""
    rows = [
        Strategy("none", "none", "baseline", "", None, lambda info: Runner(),
                 description="no saving trick"),
        Strategy("save_on_cpu", "save_on_cpu", "peer", "", "none", SaveOnCpuRunner,
                 description="torch save_on_cpu (pinned on CUDA)"),
        Strategy("checkpoint", "checkpoint", "peer", "", "none", lambda info: CheckpointRunner(),
                 description="torch checkpoint per layer"),
        Strategy("fc1_recompute", "fc1_recompute", "ours", "fc1", "none", lambda info: Runner(),
                 fused_only=True, description="GroupedMLP recompute='fc1'"),
        Strategy("offload_but_last", "offload", "ours", "", "none",
                 lambda info: OffloadRunner(info, info.num_layers - 1) if info.num_layers > 1
                 else _raise(Skip("needs >= 2 layers")),
                 description="our engine, every layer but the last (L-1)"),
        Strategy("offload_all", "offload", "ours", "", "none",
                 lambda info: OffloadRunner(info, info.num_layers),
                 description="our engine, all L layers"),
        Strategy("offload_partial", "offload", "ours", "", "none", _partial,
                 description="our engine, first L/2 layers"),
        Strategy("offload_hideable", "planned", "ours", "", "none", _planned_hidden,
                 description="least memory the planner predicts within 1.02x of none",
                 needs=("none", "fc1_recompute")),
        Strategy("offload_recompute_all", "offload_recompute", "ours", "", "none",
                 lambda info: OffloadRunner(info, info.num_layers, recompute=True),
                 description="offloaded_checkpoint on every layer, all L offloaded"),
        Strategy("fc1_recompute+offload", "fc1_recompute", "ours", "fc1", "fc1_recompute",
                 lambda info: _planned_hidden(info, fc1_all=True), fused_only=True,
                 description="recompute='fc1' everywhere + offload hidden under the forward",
                 needs=("none", "fc1_recompute")),
    ] + _planned_rows()
    if recipe is not None:
        rows += [
            Strategy(recipe, "quantized", "ours", "recipe", None, lambda info: Runner(),
                     fused_only=True, description=f"recipe {recipe!r}"),
            Strategy(f"{recipe}+offload", "quantized", "ours", "recipe", recipe, _hideable,
                     fused_only=True, description=f"recipe {recipe!r} + offload of the hideable layers"),
        ]
    return rows


def _raise(exc: Exception):
    raise exc


def strategy_names(recipe: Optional[str]) -> list:
    """Valid ``--strategies`` entries: every strategy name and family."""
    rows = strategy_list(recipe)
    names = [s.name for s in rows]
    return names + sorted({s.family for s in rows} - set(names))

