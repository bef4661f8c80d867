"""Every strategy of the benchmark, peers and ours, in one registry: :data:`STRATEGIES`.

A :class:`Strategy` is installed on a :class:`~moe_offload.bench.workloads.Workload`
(``install(workload, ctx) -> Installed``); the :class:`Installed` wraps the step, says
what it moved and undoes itself (``remove()``).  Adding a strategy is one entry.

The peers (torch's, Hugging Face's, torchtune's):

- ``none``: nothing;
- ``save_on_cpu``: ``torch.autograd.graph.save_on_cpu`` around the step (pinned on CUDA);
- ``checkpoint``: every layer checkpointed (torch, non-reentrant); on a Hugging Face model
  through its own switch (``gradient_checkpointing_enable``);
- ``sac``: torch selective activation checkpointing per layer: the outputs of matmuls,
  grouped matmuls and SDPA are saved, the rest recomputed;
- ``save_on_cpu+ckpt``: ``save_on_cpu(pin_memory=True)`` around the step on top of
  ``checkpoint``;
- ``hf_offload``: Hugging Face checkpointing with its ``offload`` switch (newer than transformers
  5.17, which lacks it: the row is skipped with the reason);
- ``torchtune`` / ``torchtune+ckpt``: torchtune's ``OffloadActivations`` (when it imports);
- ``liger+ckpt`` (full-depth run): checkpointing + Liger's fused linear cross-entropy.

Ours are plans of the general planner (:func:`~moe_offload.plan.plan_memory`,
:func:`~moe_offload.plan.make_plan`) on the workload's measured figures, applied with
``plan.apply()``:

- fixed per-layer choices (stacks): ``offload_but_last`` / ``offload_all`` /
  ``offload_partial`` offload everything the first ``L-1`` / ``L`` / ``L/2`` layers save;
  ``offload_recompute_all`` checkpoints every layer and offloads its inputs;
- ``offload_hideable``, ``fc1_recompute+offload``, ``<recipe>+offload``: the least peak
  predicted within :data:`HIDDEN_TIME_X` of the workload's step without a plan;
- ``plan@<peer>`` / ``plan@half-<peer>``: the fastest plan whose predicted step **peak**
  fits the peer's measured step peak (or half of it; ``peak_step_bytes``, the smallest over
  the workloads it ran on; ``half-none``: half the largest no-plan peak).  A budget below
  the least peak any plan reaches runs that least peak, and the row says so;
- ``plan@time``: the least peak predicted within :data:`TIME_TOL` of ``none``'s measured
  step, less :data:`TIME_MARGIN` for the prediction's error;
- ``experts:ours`` / ``experts:ours+ckpt``: a Hugging Face model on our experts, without
  a plan / with its checkpointing (the experts against Hugging Face's ``grouped_mm``).

On a Hugging Face model the plans (and ``experts:*``) run on our experts: the first of
them switches the model (:meth:`~moe_offload.bench.workloads.Workload.use_our_experts`),
so they run after the peers, and their gradients are compared with a step on our experts.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..plan import Choice, make_plan, plan_memory

__all__ = ["Installed", "Skip", "Context", "Strategy", "STRATEGIES", "strategies_for",
           "strategy_names", "HIDDEN_TIME_X", "TIME_TOL", "TIME_MARGIN", "time_limit",
           "torchtune_available", "liger_available", "sac_policy_ops", "hidden_state_loss",
           "liger_causal_lm_loss", "plan_math_changing"]

#: The time limit of the "hideable" rows, relative to the workload's step without a plan.
HIDDEN_TIME_X = 1.02
#: plan@time: within this factor of ``none``'s measured step ...
TIME_TOL = 1.03
#: ... less this margin for the prediction's error (the recompute options are calibrated
#: on pooled probe samples: their error is ~1-2%).
TIME_MARGIN = 0.01
TORCHTUNE_PATH_ENV = "MOE_OFFLOAD_TORCHTUNE_PATH"


class Skip(Exception):
    """The strategy does not apply to this run (the row says why)."""


class Installed:
    """A strategy installed on a workload: ``wrap(step) -> step``, ``moved_bytes()``,
    ``stats()``, ``reset()`` (per-step counters), ``remove()``; ``plan``: the
    :class:`~moe_offload.plan.MemoryPlan` of a row of ours; ``fields``: what the row should
    add (``note``, ``requested_budget_bytes``)."""

    def __init__(self, wrap=None, remove=None, moved=None, stats=None, reset=None, plan=None,
                 fields: Optional[dict] = None) -> None:
        self._wrap, self._remove, self._moved, self._stats, self._reset = wrap, remove, moved, stats, reset
        self.plan, self.fields = plan, dict(fields or {})

    def wrap(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The step to run under this strategy."""
        return self._wrap(step) if self._wrap else step

    def moved_bytes(self) -> tuple:
        """``(d2h, h2d)`` bytes since the last :meth:`reset` (0 when unknown)."""
        return self._moved() if self._moved else (0, 0)

    def stats(self) -> dict:
        """Extra JSON-able figures (the engine's for our plans)."""
        return self._stats() if self._stats else {}

    def reset(self) -> None:
        """Zero the per-step counters."""
        if self._reset:
            self._reset()

    def remove(self) -> None:
        """Undo the installation."""
        if self._remove:
            self._remove()


@dataclass
class Context:
    """What a strategy may read when installed: the peers' measured step peaks
    (``peak_of``: smallest over the workloads; ``"none"``: the largest) and step times."""
    peak_of: dict = field(default_factory=dict)
    step_of: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Strategy:
    """One benchmark row.

    ``kinds``: the workloads it runs on (``"stack"``, ``"hf"``; ``"full"``: the full-depth
    run).  ``variant`` (stacks): ``""``, ``"fc1"`` (runs on ``fused/fc1``) or ``"recipe"``.
    ``reference``: whose gradients must be bitwise equal to the row's: ``"self"`` (a step
    of its own workload with nothing installed), ``"base"`` (of the base stack), ``None``
    (different numerics).  ``needs``: rows it reads (they run too); ``after_peers``: runs
    after every peer.  ``loss``: ``"liger"`` replaces the model's loss (full-depth run).
    ``requires() -> reason or None``: why it cannot run here."""
    name: str
    family: str
    owner: str
    description: str
    install: Optional[Callable[..., Installed]]
    kinds: tuple = ("stack", "hf")
    variant: str = ""
    reference: Optional[str] = "self"
    fused_only: bool = False
    needs: tuple = ()
    after_peers: bool = False
    loss: str = "model"
    requires: Optional[Callable[[], Optional[str]]] = None


# ------------------------------------------------------------------ the peers
def torchtune_available() -> bool:
    """True when ``torchtune.training.OffloadActivations`` imports.

    When it does not and ``$MOE_OFFLOAD_TORCHTUNE_PATH`` names a folder, that folder is added
    to ``sys.path`` and the import tried again.  The GPU check keeps torchtune there because
    torchtune 0.6.1 needs a torchao older than 0.16, which recent peft refuses to run LoRA
    beside: the folder joins the path only when a torchtune row runs, after the adapters
    are in place."""
    try:
        from torchtune.training import OffloadActivations  # noqa: F401
    except Exception:
        extra = os.environ.get(TORCHTUNE_PATH_ENV)
        if not extra or not os.path.isdir(extra) or extra in sys.path:
            return False
        sys.path.append(extra)
        try:
            from torchtune.training import OffloadActivations  # noqa: F401,F811
        except Exception:
            return False
    return True


def liger_available() -> bool:
    """True when Liger Kernel's fused linear cross-entropy imports (it needs triton)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:
        return False
    return True


def _need(available: Callable[[], bool], what: str, module: str) -> Callable[[], Optional[str]]:
    """``requires`` of a row that needs ``module``: ``None`` when ``available()``, else why."""
    def why() -> Optional[str]:
        if available():
            return None
        try:
            __import__(module)
        except Exception as e:   # noqa: BLE001 - the reason is the report
            return f"{what} does not import ({type(e).__name__}: {str(e)[:150]})"
        return f"{what} does not import"
    return why


def _need_cuda() -> Optional[str]:
    return None if torch.cuda.is_available() else "HF's offload pins host memory: it needs an accelerator"


def sac_policy_ops() -> set:
    """The aten ops whose outputs selective checkpointing saves (those this torch has)."""
    names = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _sac_context():
    save = sac_policy_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def _checkpointed(inner, *args, selective: bool = False, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False,
                      **({"context_fn": _sac_context} if selective else {}), **kwargs)


def _per_layer(layers, selective: bool) -> Callable[[], None]:
    """Each layer's forward run under (selective) checkpointing; returns the undo."""
    saved = []
    for layer in layers:
        saved.append((layer, layer.__dict__.get("forward")))
        layer.forward = functools.partial(_checkpointed, layer.forward, selective=selective)

    def undo():
        for layer, prev in saved:
            if prev is not None:
                layer.forward = prev
            else:
                del layer.forward
    return undo


def _hf_checkpointing(model, offload: bool = False) -> Callable[[], None]:
    """Hugging Face's own per-layer checkpointing (torch, non-reentrant), with its
    ``offload`` switch when asked; returns the undo (it also drops the input-embedding hook
    enabling registered, which Hugging Face's disable leaves unless peft's config is loaded).
    Newer transformers (5.2x) take ``offload=True`` as an argument of
    ``activation_checkpointing_enable``; one without it (5.17, the GPU image's) hands it on to
    ``torch.utils.checkpoint``, which is detected: the row is skipped with the reason."""
    had_hook = hasattr(model, "_require_grads_hook")
    enable = getattr(model, "activation_checkpointing_enable", None)
    kw = {"use_reentrant": False}
    if enable is not None and (not offload or "offload" in inspect.signature(enable).parameters):
        enable(activation_checkpointing_kwargs=kw, **({"offload": True} if offload else {}))
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={**kw, **(
            {"offload": True} if offload else {})})
        disable = model.gradient_checkpointing_disable

    def undo():
        disable()
        if not had_hook and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
    if offload:   # a transformers without the switch hands offload=True on to torch: refuse
        for m in model.modules():
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if isinstance(fn, functools.partial) and "offload" in (fn.keywords or {}):
                undo()
                raise Skip("this transformers has no checkpointing offload switch (it would "
                           "pass offload=True on to torch.utils.checkpoint)")
    return undo


def _checkpointing(w) -> Callable[[], None]:
    return _hf_checkpointing(w.model) if w.kind == "hf" else _per_layer(w.layers, selective=False)


def _save_on_cpu(w, undo: Optional[Callable] = None) -> Installed:
    """``save_on_cpu`` around the step (pinned on CUDA), counting what its pack hook sees
    (on the CPU it moves nothing: reported as 0)."""
    moved = [0]

    def wrap(step):
        def run():
            hooks = torch.autograd.graph.save_on_cpu(pin_memory=w.cuda)
            pack = hooks.pack_hook

            def counting(t):
                moved[0] += t.numel() * t.element_size()
                return pack(t)
            hooks.pack_hook = counting
            with hooks:
                return step()
        return run
    return Installed(wrap=wrap, remove=undo, moved=lambda: (moved[0], moved[0]) if w.cuda else (0, 0),
                     reset=lambda: moved.__setitem__(0, 0))


def _torchtune(w, ckpt: bool) -> Installed:
    if not torchtune_available():
        raise Skip("torchtune does not import")
    from torchtune.training import OffloadActivations

    def wrap(step):
        # A new context per wrapped step function (the full-depth run wraps once per
        # length): one whose step ran out of memory keeps its tracker and pinned copies.
        ctx = OffloadActivations()

        def run():
            with ctx:
                return step()
        return run
    return Installed(wrap=wrap, remove=_checkpointing(w) if ckpt else None)


def _hf_only(w) -> None:
    if w.kind != "hf":
        raise Skip("a Hugging Face model's switch")


def _hf_offload(w, ctx) -> Installed:
    _hf_only(w)
    if not w.cuda:
        raise Skip("HF's offload pins host memory: it needs an accelerator")
    return Installed(remove=_hf_checkpointing(w.model, offload=True))


# ------------------------------------------------------------------ ours
def plan_math_changing(plan) -> bool:
    """True when the plan's head option changes the math (a chunked loss: not bitwise)."""
    return not plan.exact


def _applied(plan, **fields) -> Installed:
    handle = plan.apply()

    def moved():
        s = handle.stats()
        return int(s.get("offloaded_bytes", 0)), int(s.get("reloaded_bytes", 0))

    def stats():
        return {k: v for k, v in handle.stats().items() if isinstance(v, (int, float, str, bool))}
    return Installed(remove=handle.remove, moved=moved, stats=stats, reset=handle.reset_stats,
                     plan=plan, fields=fields)


def _figures(w):
    w.use_our_experts()           # a Hugging Face model: plans run on our experts when it can
    return w.figures()


def _plan(w, budget: Optional[int], **kw):
    return plan_memory(w.model, None, budget, figures=_figures(w), min_offload_bytes=w.min_offload_bytes,
                       emulate=not w.cuda, **kw)


def _fixed(choices: Callable[[int], list]) -> Callable:
    """A row that runs the given per-layer choices (``choices(L)``)."""
    def install(w, ctx) -> Installed:
        return _applied(make_plan(w.model, _figures(w), choices(len(w.layers)),
                                  min_offload_bytes=w.min_offload_bytes, emulate=not w.cuda))
    return install


def _but_last(L: int) -> list:
    if L < 2:
        raise Skip("needs >= 2 layers")
    return [Choice("none", 3)] * (L - 1) + [Choice("none", 0)]


def _first(k_of: Callable[[int], int], choice: Choice) -> Callable[[int], list]:
    return lambda L: [choice] * k_of(L) + [Choice("none", 0)] * (L - k_of(L))


def _hidden(w, ctx) -> Installed:
    """The least peak the planner predicts within :data:`HIDDEN_TIME_X` of no plan."""
    plan = _plan(w, None, max_time_x=HIDDEN_TIME_X)
    if all(c == Choice("none", 0) for c in plan.choices):
        raise Skip(f"the planner finds no saving within {HIDDEN_TIME_X}x of no plan")
    return _applied(plan)


def _budgeted(peer: str, fraction: float) -> Callable:
    """The fastest plan whose predicted step peak fits ``fraction`` of ``peer``'s measured one."""
    def install(w, ctx) -> Installed:
        if peer not in ctx.peak_of:
            raise Skip(f"{peer} has no measured step peak (its peak is the budget)")
        budget = int(ctx.peak_of[peer] * fraction)
        try:
            return _applied(_plan(w, budget))
        except ValueError as e:   # below the least peak any plan reaches: run that, say so
            if fraction < 1:
                try:
                    _plan(w, int(ctx.peak_of[peer]))
                except ValueError:
                    raise Skip(f"same plan as plan@{peer}: both budgets are below the least peak "
                               "any plan reaches") from None
            least = _plan(w, None, max_step_s=float("inf"))
            return _applied(least, requested_budget_bytes=budget,
                            note=f"below the least peak any plan reaches: {e}; ran that least peak, "
                                 f"{least.predicted_peak_bytes / 2**20:.1f} MiB")
    return install


def time_limit(none_step_s: Optional[float], ours_none_s: float) -> tuple:
    """``(max_step_s, why)`` of plan@time: :data:`TIME_TOL` x the ``none`` row's measured step
    x ``(1 - TIME_MARGIN)``; without a ``none`` row, the same factor on the planner's step
    without a plan."""
    base, name = (none_step_s, "none") if none_step_s else (ours_none_s, "no plan (planner's figures)")
    limit = TIME_TOL * base * (1 - TIME_MARGIN)
    return limit, (f"solved for <= {limit * 1e3:.2f} ms = {TIME_TOL} x {name} "
                   f"{base * 1e3:.2f} ms x (1 - {TIME_MARGIN} margin)")


def _in_time(w, ctx) -> Installed:
    limit, why = time_limit(ctx.step_of.get("none"), _figures(w)[1].step_none_s)
    return _applied(_plan(w, None, max_step_s=limit), note=why)


def _our_experts(ckpt: bool) -> Callable:
    def install(w, ctx) -> Installed:
        _hf_only(w)
        if not w.use_our_experts():
            raise Skip("no supported experts (or transformers integration missing)")
        return Installed(remove=_hf_checkpointing(w.model) if ckpt else None)
    return install


# ------------------------------------------------------------------ the full-depth loss
def hidden_state_loss(model, ids: torch.Tensor, linear_ce: Callable) -> torch.Tensor:
    """Hugging Face's causal-LM loss computed from the last hidden states by
    ``linear_ce(lm_head_weight, h_TH, target_T)`` (mean over the ``T - 1`` predicted tokens:
    labels are ``ids`` shifted by one, as Hugging Face's loss), plus ``router_aux_loss_coef``
    x the load-balancing loss of the router logits (Hugging Face's own function)."""
    import importlib
    out = model.model(input_ids=ids, output_router_logits=True)
    h_TH = out.last_hidden_state[0, :-1]
    loss = linear_ce(model.lm_head.weight, h_TH.contiguous(), ids[0, 1:].contiguous())
    coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    if coef and getattr(out, "router_logits", None) is not None:
        mod = importlib.import_module(type(model).__module__)
        aux = mod.load_balancing_loss_func(out.router_logits, model.config.num_experts,
                                           model.config.num_experts_per_tok, None)
        loss = loss + coef * aux.to(loss.device)
    return loss


def liger_causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """:func:`hidden_state_loss` with Liger Kernel's fused linear cross-entropy (the logits
    of all tokens never exist at once)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return hidden_state_loss(model, ids, LigerFusedLinearCrossEntropyLoss())


# ------------------------------------------------------------------ the registry
def _peer(name, description, install, kinds=("stack", "hf", "full"), **kw) -> Strategy:
    return Strategy(name, name if name != "none" else "none", "baseline" if name == "none" else "peer",
                    description, install, kinds=kinds, reference="self", **kw)


def _planned(peer: str, kinds: tuple) -> list:
    what = {"none": "the largest no-plan"}.get(peer, f"{peer}'s")
    rows = [] if peer == "none" else [Strategy(
        f"plan@{peer}", "planned", "ours", f"planner: fastest within {what} step peak",
        _budgeted(peer, 1.0), kinds=kinds, needs=(peer,), after_peers=True)]
    return rows + [Strategy(f"plan@half-{peer}", "planned", "ours",
                            f"planner: fastest within half {what} step peak",
                            _budgeted(peer, 0.5), kinds=kinds, needs=(peer,), after_peers=True)]


_EVERYTHING = Choice("none", 3)
STRATEGIES = (
    # peers (run order matters: the plans' budgets are their measured peaks)
    _peer("none", "no saving trick", lambda w, ctx: Installed()),
    _peer("checkpoint", "every layer checkpointed (HF's switch on an HF model; torch, non-reentrant)",
          lambda w, ctx: Installed(remove=_checkpointing(w))),
    _peer("save_on_cpu", "torch save_on_cpu around the step (pinned on CUDA)",
          lambda w, ctx: _save_on_cpu(w), kinds=("stack",)),
    _peer("sac", "torch selective checkpointing per layer (save mm/grouped_mm/SDPA outputs)",
          lambda w, ctx: Installed(remove=_per_layer(w.layers, selective=True)), kinds=("hf", "full")),
    _peer("save_on_cpu+ckpt", "torch save_on_cpu (pinned) + checkpointing",
          lambda w, ctx: _save_on_cpu(w, _checkpointing(w)), kinds=("hf", "full")),
    _peer("hf_offload", "HF checkpointing with offload=True (save_on_cpu per layer)", _hf_offload,
          kinds=("hf", "full"), requires=_need_cuda),
    _peer("torchtune", "torchtune OffloadActivations", lambda w, ctx: _torchtune(w, False),
          kinds=("hf",), requires=_need(torchtune_available, "torchtune", "torchtune.training")),
    _peer("torchtune+ckpt", "torchtune OffloadActivations + checkpointing",
          lambda w, ctx: _torchtune(w, True), kinds=("hf", "full"),
          requires=_need(torchtune_available, "torchtune", "torchtune.training")),
    _peer("liger+ckpt", "HF checkpointing + Liger fused linear cross-entropy",
          lambda w, ctx: Installed(remove=_checkpointing(w)), kinds=("full",), loss="liger",
          requires=_need(liger_available, "liger_kernel", "liger_kernel.transformers")),
    # ours on the synthetic stacks
    Strategy("fc1_recompute", "fc1_recompute", "ours", "GroupedMLP recompute='fc1'",
             lambda w, ctx: Installed(), kinds=("stack",), variant="fc1", reference="base",
             fused_only=True),
    Strategy("offload_but_last", "offload", "ours", "our engine, every layer but the last (L-1)",
             _fixed(_but_last), kinds=("stack",)),
    Strategy("offload_all", "offload", "ours", "our engine, all L layers",
             _fixed(_first(lambda L: L, _EVERYTHING)), kinds=("stack",)),
    Strategy("offload_partial", "offload", "ours", "our engine, first L/2 layers",
             _fixed(_first(lambda L: max(1, L // 2), _EVERYTHING)), kinds=("stack",)),
    Strategy("offload_hideable", "planned", "ours",
             f"least peak the planner predicts within {HIDDEN_TIME_X}x of none", _hidden, kinds=("stack",)),
    Strategy("offload_recompute_all", "offload_recompute", "ours",
             "every layer checkpointed, its inputs offloaded",
             _fixed(_first(lambda L: L, Choice("layer", 3))), kinds=("stack",)),
    Strategy("fc1_recompute+offload", "fc1_recompute", "ours",
             f"recompute='fc1' everywhere + the least-peak offload within {HIDDEN_TIME_X}x",
             _hidden, kinds=("stack",), variant="fc1", fused_only=True),
    Strategy("<recipe>", "quantized", "ours", "the low-precision recipe", lambda w, ctx: Installed(),
             kinds=("stack",), variant="recipe", reference=None, fused_only=True),
    Strategy("<recipe>+offload", "quantized", "ours",
             f"the recipe + the least-peak offload within {HIDDEN_TIME_X}x", _hidden,
             kinds=("stack",), variant="recipe", fused_only=True),
    *_planned("save_on_cpu", ("stack",)), *_planned("checkpoint", ("stack", "hf")),
    *_planned("none", ("stack",)),
    *[s for peer in ("sac", "save_on_cpu+ckpt", "hf_offload", "torchtune+ckpt")
      for s in _planned(peer, ("hf",))],
    Strategy("plan@time", "planned", "ours",
             f"planner: least peak predicted within {TIME_TOL}x of none's measured step less "
             f"a {TIME_MARGIN:.0%} margin", _in_time, kinds=("hf",), after_peers=True),
    # ours on a Hugging Face model
    Strategy("experts:ours", "experts", "ours", "our experts (fused grouped MLP), no plan",
             _our_experts(False), kinds=("hf",), after_peers=True),
    Strategy("experts:ours+ckpt", "experts", "ours", "our experts + HF checkpointing",
             _our_experts(True), kinds=("hf",), after_peers=True),
    # the full-depth run's own (moe_offload.fit per length: bench.full_ours)
    Strategy("ours", "fit", "ours", "moe_offload.fit: our experts + the plan that fits the device",
             None, kinds=("full",)),
)


def _named(s: Strategy, recipe: Optional[str]) -> Strategy:
    """``<recipe>`` in a name or description replaced by the run's recipe."""
    if "<recipe>" not in s.name:
        return s
    return dataclasses.replace(s, name=s.name.replace("<recipe>", recipe),
                               description=s.description.replace("the low-precision recipe", f"recipe {recipe!r}")
                               .replace("the recipe", f"recipe {recipe!r}"))


def strategies_for(kind: str, recipe: Optional[str] = None) -> list:
    """The strategies that run on workloads of ``kind`` (``"stack"``, ``"hf"``, ``"full"``),
    in registry order; the recipe rows only with a ``recipe``."""
    return [_named(s, recipe) for s in STRATEGIES
            if kind in s.kinds and (s.variant != "recipe" or recipe is not None)]


def strategy_names(recipe: Optional[str]) -> list:
    """Valid ``--strategies`` entries: every strategy name, family and owner (the recipe rows
    only with a ``recipe``)."""
    rows = [_named(s, recipe) for s in STRATEGIES if s.variant != "recipe" or recipe is not None]
    names = list(dict.fromkeys(s.name for s in rows))
    return names + sorted(({s.family for s in rows} | {s.owner for s in rows}) - set(names))
