"""Plan activation memory at the first training batch: a ``Trainer`` callback and a plain-loop
helper.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[MoEOffloadCallback()])
    trainer = SFTTrainer(model, args=cfg, train_dataset=ds, callbacks=[MoEOffloadCallback()])
    with plan_on_first_batch(model, optimizer):          # a plain PyTorch loop
        for batch in loader: ...

What happens: when training begins, the experts of the model are switched to ours
(:func:`~moe_offload.integrations.transformers.use_moe_offload_experts`; a model without
supported experts keeps its own and is still planned).  At the first training forward the
planner runs on that batch -- :func:`moe_offload.fit` (the whole step fits device memory,
with the trainer's optimizer) or, when ``budget_bytes`` is given,
:func:`moe_offload.plan_memory` (the activation peak fits ``budget_bytes``) -- and the plan is
applied before that forward goes on.  ``callback.plan`` is the applied
:class:`~moe_offload.MemoryPlan` (``None`` before the first batch).  At the end of training the
plan is removed, Hugging Face checkpointing is restored and the experts go back to the
implementation they had: the model is as before, apart from its trained weights.

Where the plan is made, and why there
=====================================
A Trainer callback never sees a batch (``on_step_begin`` gets no inputs) and the first
batch's shapes are what the plan is for.  So the planner hooks the model itself: a forward
pre-hook (``with_kwargs``) on the model the trainer calls sees exactly what
``compute_loss`` passes -- the collated batch, ``num_items_in_batch``, TRL's
``fused_lm_head=True``, whatever a subclass adds -- and runs on the model's own forward, so a
forward that TRL or accelerate replaced (``model.forward = ...``, autocast) is measured as it
trains.  The hook plans only in training (``model.training`` and grad enabled): evaluation
and prediction under ``no_grad`` never plan and the applied plan has no effect there (its
recompute wrappers run plain without grad, the offload engine is passive).

The planner's ``step_fn`` is ``loss_fn(model(*args, **kwargs))`` on that batch (default: the
output's ``loss``); the planner runs forwards and backwards on it.  Around planning we keep
what training must not see change: parameter ``.grad`` s (moved to the host while measuring,
then put back: a re-plan in the middle of gradient accumulation keeps what was accumulated),
the CPU and CUDA random number generators (restored by the planner's own measurement, so the
data order of the next epoch and any dropout draw the same numbers); the measuring forwards
pass through the hook without planning.
Weights are untouched (no optimizer step).  So training losses and gradients are bitwise those
without the callback on the same experts: the plan itself is transport (offload) and exact
recompute.  ``exact=False`` (the planner's default) lets it also pick options that change
the math (the chunked LM-head loss); pass ``exact=True`` for bitwise equality.

Hugging Face gradient checkpointing
===================================
The plan decides recompute per layer itself (``layer`` recompute *is* checkpointing a decoder
layer; cheaper options recompute less), and it has to measure the layers as they run without
checkpointing.  So while a plan is applied HF's checkpointing is off: the ``gradient_checkpointing``
flags that ``TrainingArguments(gradient_checkpointing=True)`` (or
``model.gradient_checkpointing_enable()``) set are cleared at the first batch and restored at
the end of training.  Gradients are unchanged by this (non-reentrant checkpointing replays the
same kernels), only what is recomputed changes.  (HF's ``enable_input_require_grads`` hook,
set with checkpointing, stays: it only makes the embedding output require grad.)

Changing shapes
===============
The plan is made for a batch shape ``(B, S)`` (from ``input_ids`` or ``inputs_embeds``): the
first batch's, with ``S`` raised to ``max_seq_len`` when given (the batch is tiled along the
sequence to that length for measuring; a batch with tensors that cannot be tiled -- 4D
masks, flash-attention ``cu_seq_lens`` -- is measured as it is).  A later batch no larger in
either dimension runs on the plan (fewer tokens: less memory than planned).  A batch larger
in ``B`` or ``S`` re-plans once, before its forward, for ``(max(B, B_plan), max(S,
ceil(growth * S_plan)))`` (default ``growth=1.25``): with lengths that creep up, the number
of re-plans is logarithmic in the length range, never one per step.  Set ``max_seq_len`` to
the longest length you train on (e.g. the collator's ``max_length``) to plan once.

Logging and checkpoints
=======================
Each plan's ``describe()`` goes once to the trainer's logger (``transformers.trainer``, level
info); every ``logging_steps`` the offload counters of the interval (:data:`LOG_KEYS` of
``stats()``: bytes offloaded and reloaded, forced waits, reloads that were not prefetched, the
pinned pool) and the number of plans made join the trainer's logs as ``moe_offload/<counter>``
(then the counters are reset): the printed logs and ``trainer.state.log_history``.  The
``report_to`` integrations (TensorBoard, W&B, ...) are callbacks that ``Trainer`` places
*before* the user's, so they see the counters only when this callback runs first::

    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(MoEOffloadCallback))

The plan adds no module and no parameter: recompute wrappers are instance attributes and
hooks, so ``state_dict``, ``save_model``,
``save_pretrained`` and resuming from a checkpoint see the same keys and values as without
it, and the saved config does not name our experts.

When planning fails (``ValueError``: nothing fits; the message says what is missing) the
error goes on to the caller and the model is left as before (hook, experts, checkpointing).

Limits: one process, one device (the planner measures one device; with DDP/FSDP/DeepSpeed
the measuring backwards would run the wrapper's gradient hooks), and no ``torch.compile``
of the model.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
from torch import nn

from transformers import TrainerCallback

from ...plan import plan_memory
from .experts import use_moe_offload_experts

__all__ = ["MoEOffloadCallback", "FirstBatchPlanner", "plan_on_first_batch"]

_log = logging.getLogger(__name__)
LOG_PREFIX = "moe_offload/"
# The engine counters that join the trainer's logs (those of the interval since the last log).
LOG_KEYS = ("offloaded_bytes", "reloaded_bytes", "forced_waits", "inline_reloads",
            "pinned_pool_bytes")


def _output_loss(outputs) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise ValueError("FirstBatchPlanner: the model returned no loss for the training batch "
                         "(the planner runs forward and backward on it); put labels in the "
                         "batch or pass loss_fn=(outputs -> loss)")
    return loss


def _batch_shape(args, kwargs) -> Optional[tuple]:
    """``(B, S)`` of the batch: ``input_ids`` or ``inputs_embeds``, else the first tensor."""
    t = kwargs.get("input_ids")
    if not isinstance(t, torch.Tensor):
        t = kwargs.get("inputs_embeds")
    if not isinstance(t, torch.Tensor):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if t is None or t.dim() == 0:
        return None
    return (1, t.shape[0]) if t.dim() == 1 else (t.shape[0], t.shape[1])


def _tile(args, kwargs, shape: tuple, target: tuple):
    """The batch repeated to ``target = (B, S)``, or None when one of its tensors is not
    ``(B, S, ...)`` (or a scalar) and so cannot follow."""
    B, S = shape

    def one(v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        if v.dim() < 2 or tuple(v.shape[:2]) != (B, S):
            raise LookupError
        reps = (math.ceil(target[0] / B), math.ceil(target[1] / S)) + (1,) * (v.dim() - 2)
        return v.repeat(reps)[:target[0], :target[1]]
    try:
        return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}
    except LookupError:
        return None


def _unwrap_optimizer(opt):
    # accelerate's AcceleratedOptimizer proxies the real one (state, param_groups)
    return getattr(opt, "optimizer", opt) if type(opt).__name__ == "AcceleratedOptimizer" else opt


class FirstBatchPlanner:
    """Plans ``model``'s activation memory at its first training forward and keeps it planned.

    Attach it (:meth:`attach`, or :func:`plan_on_first_batch`), train as usual, then
    :meth:`remove` (or leave the ``with`` block).  The module docstring explains where and
    when it plans, what it keeps unchanged, and the shape policy.

    Args:
        budget_bytes: plan with :func:`moe_offload.plan_memory` for this activation budget
            (bytes); ``None``: :func:`moe_offload.fit` (the whole step fits device memory).
        device_memory_bytes, host_memory_bytes, reserve_bytes: passed to ``fit`` (on the CPU
            ``fit`` needs ``device_memory_bytes``).
        exact: the planner leaves out options that change the math (the chunked LM-head
            loss): training is then bitwise that without the plan.
        max_seq_len: plan for sequences of this length from the first batch on.
        growth: a batch longer than planned re-plans for at least ``growth`` x the planned
            length (>= 1).
        experts: switch the experts to ours (``use_moe_offload_experts``) at :meth:`attach`.
        recipe: the experts' compute recipe (``None``, ``"fp8"``, ...).
        loss_fn: ``loss_fn(outputs) -> loss`` for measuring (default: ``outputs.loss``).
        plan_kwargs: more keyword arguments of the planner (``min_offload_bytes``,
            ``iters``, ``warmup``, ``emulate``, ``options``, ``layers``, ...).
        log: ``log(text)`` for each plan's ``describe()`` (default: this module's logger).
    """

    def __init__(self, budget_bytes: Optional[int] = None, *,
                 device_memory_bytes: Optional[int] = None, host_memory_bytes: Optional[int] = None,
                 reserve_bytes: Optional[int] = None, exact: bool = False,
                 max_seq_len: Optional[int] = None, growth: float = 1.25, experts: bool = True,
                 recipe: Optional[str] = None, loss_fn: Optional[Callable] = None,
                 plan_kwargs: Optional[dict] = None, log: Optional[Callable[[str], None]] = None):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if not growth >= 1.0:
            raise ValueError(f"growth must be >= 1, got {growth!r}")
        self.budget_bytes = budget_bytes
        self.fit_kwargs = dict(device_memory_bytes=device_memory_bytes,
                               host_memory_bytes=host_memory_bytes, reserve_bytes=reserve_bytes)
        self.exact = exact
        self.max_seq_len = max_seq_len
        self.growth = float(growth)
        self.experts = experts
        self.recipe = recipe
        self.loss_fn = loss_fn or _output_loss
        self.plan_kwargs = dict(plan_kwargs or {})
        self.log = log or _log.info
        self.model: Optional[nn.Module] = None
        self.optimizer = None
        self.plan = None            # the applied MemoryPlan
        self.handle = None          # its PlanHandle (a FitHandle under fit)
        self.planned_shape: Optional[tuple] = None
        self.plans_made = 0
        self._hook = None
        self._busy = False
        self._hf_checkpointing = []     # modules whose gradient_checkpointing we cleared
        self._experts_before = None

    # -- attach / remove -------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer=None) -> "FirstBatchPlanner":
        """Switch the experts (``experts=True``) and hook ``model``'s forward; the plan is
        made at its first training forward.  ``optimizer``: for ``fit``'s arithmetic."""
        if self.model is not None:
            raise RuntimeError("FirstBatchPlanner: already attached; call remove() first")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("FirstBatchPlanner plans one process on one device; "
                                      "distributed training is not supported")
        self.model, self.optimizer = model, _unwrap_optimizer(optimizer)
        if self.experts:
            cfg = getattr(model, "config", None)
            before = getattr(cfg, "_experts_implementation", None)
            try:
                use_moe_offload_experts(model, recipe=self.recipe)
                self._experts_before = before
            except ValueError as e:
                self.log(f"moe_offload: keeping the model's experts ({e})")
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def remove(self) -> None:
        """Remove the plan and the hook, restore HF checkpointing and the experts."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
        self.plan = None
        self._restore_hf_checkpointing()
        if self._experts_before is not None and self.model is not None:
            self.model.set_experts_implementation(self._experts_before)
            self._experts_before = None
        self.model = self.optimizer = None

    def __enter__(self) -> "FirstBatchPlanner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- statistics --------------------------------------------------------------------------
    def stats(self) -> dict:
        """The applied plan's counters (:meth:`PlanHandle.stats`), ``{}`` before the plan."""
        return self.handle.stats() if self.handle is not None else {}

    def reset_stats(self) -> None:
        """Zero the offload engine's counters."""
        if self.handle is not None:
            self.handle.reset_stats()

    # -- planning ----------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        if self._busy or not module.training or not torch.is_grad_enabled():
            return None
        shape = _batch_shape(args, kwargs)
        if self.handle is None:
            self._plan(args, kwargs, shape)
        elif shape is not None and self.planned_shape is not None and (
                shape[0] > self.planned_shape[0] or shape[1] > self.planned_shape[1]):
            self._plan(args, kwargs, shape)
        return None

    def _target(self, shape: tuple) -> tuple:
        B, S = shape
        if self.planned_shape is None:
            return B, max(S, self.max_seq_len or 0)
        pB, pS = self.planned_shape
        return max(B, pB), max(S, math.ceil(self.growth * pS))

    def _plan(self, args, kwargs, shape: Optional[tuple]) -> None:
        model = self.model
        ex_args, ex_kwargs, planned = args, kwargs, shape
        if shape is not None:
            target = self._target(shape)
            tiled = _tile(args, kwargs, shape, target) if target != shape else None
            if tiled is not None:
                (ex_args, ex_kwargs), planned = tiled, target
        replan = self.handle is not None
        self._busy = True
        grads = self._stash_grads()
        failed = True
        try:
            if self.handle is not None:
                self.handle.remove()
                self.handle = self.plan = None
            self._clear_hf_checkpointing()

            def step_fn():
                return self.loss_fn(model(*ex_args, **ex_kwargs))
            self.handle, self.plan = self._run_planner(step_fn)
            failed = False
        finally:
            self._restore_grads(grads)
            self._busy = False
            if failed:              # the error goes on; the model is left as before
                self.remove()
        self.planned_shape = planned
        self.plans_made += 1
        what = "re-planned" if replan else "planned"
        shape_txt = "unknown shape" if planned is None else f"batch {planned[0]} x {planned[1]}"
        text = self.handle.describe() if hasattr(self.handle, "describe") else self.plan.describe()
        self.log(f"moe_offload: {what} for {shape_txt}\n{text}")

    def _run_planner(self, step_fn) -> tuple:
        if self.budget_bytes is not None:
            plan = plan_memory(self.model, step_fn, self.budget_bytes, exact=self.exact,
                               **self.plan_kwargs)
            return plan.apply(), plan
        try:
            from ...plan import fit
        except ImportError as e:     # the planner's fit is newer than plan_memory
            raise ImportError("FirstBatchPlanner: moe_offload.fit is missing; pass "
                              "budget_bytes= to plan with plan_memory") from e
        handle = fit(self.model, step_fn, self.optimizer, exact=self.exact, **self.fit_kwargs,
                     **self.plan_kwargs)
        return handle, handle.plan

    def _clear_hf_checkpointing(self) -> None:
        for m in self.model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.gradient_checkpointing = False
                self._hf_checkpointing.append(m)
        if self._hf_checkpointing and self.plans_made == 0:
            self.log("moe_offload: Hugging Face gradient checkpointing is off while the plan is "
                     "applied (the plan chooses recompute per layer); restored at the end")

    def _restore_hf_checkpointing(self) -> None:
        for m in self._hf_checkpointing:
            m.gradient_checkpointing = True
        self._hf_checkpointing.clear()

    def _stash_grads(self) -> list:
        """Move existing ``.grad`` s to the host (the measuring backwards must not add to
        them, and should not share the device with them)."""
        out = []
        for p in self.model.parameters():
            if p.grad is not None:
                out.append((p, p.grad.to("cpu", copy=True) if p.grad.is_cuda else p.grad))
            p.grad = None
        return out

    def _restore_grads(self, stashed: list) -> None:
        for p in self.model.parameters():
            p.grad = None
        for p, g in stashed:
            p.grad = g.to(p.device) if g.device != p.device else g


def plan_on_first_batch(model: nn.Module, optimizer=None, **options) -> FirstBatchPlanner:
    """A :class:`FirstBatchPlanner` (``options``: its arguments) attached to ``model``: use it
    as ``with plan_on_first_batch(model, optimizer): <training loop>`` (removed at the end of
    the block) or call ``.remove()`` yourself."""
    return FirstBatchPlanner(**options).attach(model, optimizer)


class MoEOffloadCallback(TrainerCallback):
    """``Trainer`` / TRL ``SFTTrainer`` callback: plan at the first training batch, log, remove
    at the end (module docstring: the policies).  ``options`` are :class:`FirstBatchPlanner`'s
    (``budget_bytes``, ``device_memory_bytes``, ``max_seq_len``, ``exact``, ``plan_kwargs``,
    ...).  ``callback.plan`` is the applied plan (``None`` before the first batch and after
    training); ``callback.planner`` the :class:`FirstBatchPlanner`; ``log_stats=False`` keeps the
    offload counters out of the trainer's logs."""

    def __init__(self, budget_bytes: Optional[int] = None, *, log_stats: bool = True, **options):
        from transformers.utils import logging as hf_logging
        self.logger = hf_logging.get_logger("transformers.trainer")
        options.setdefault("log", lambda text: self.logger.info(text))
        self.planner = FirstBatchPlanner(budget_bytes, **options)
        self.log_stats = log_stats

    @property
    def plan(self):
        """The applied :class:`~moe_offload.MemoryPlan`, or ``None``."""
        return self.planner.plan

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Switch the experts and hook the model (the plan comes with the first batch)."""
        if model is None:
            raise ValueError("MoEOffloadCallback: the trainer passed no model")
        if self.planner.model is not None:      # a previous train() that did not end
            self.planner.remove()
        self.planner.attach(model, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        """Remove the plan; the model is as before (HF checkpointing and experts too)."""
        self.planner.remove()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the offload counters of the logging interval (:data:`LOG_KEYS`) and the number
        of plans made so far to a training log (one with a ``loss``), then reset them."""
        if not self.log_stats or logs is None or "loss" not in logs or self.planner.handle is None:
            return
        st = self.planner.stats()
        added = {LOG_PREFIX + k: st[k] for k in LOG_KEYS if k in st}
        added[LOG_PREFIX + "plans"] = self.planner.plans_made
        logs.update(added)
        # Trainer.log appended a copy of ``logs`` to the history before the callbacks ran
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
            last.update(added)
        self.planner.reset_stats()
