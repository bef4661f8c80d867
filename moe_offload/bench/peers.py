"""The peers of the real-model benchmark, each installed on a Hugging Face model and removed
after its row.

A :class:`Installed` wraps the step function (``wrap(step_fn) -> step_fn``), reports the
bytes it moved and undoes what it changed (``remove()``).

- ``none``: nothing;
- ``checkpoint``: Hugging Face gradient checkpointing (torch, non-reentrant), every layer;
- ``sac``: torch selective activation checkpointing per layer
  (``create_selective_checkpoint_contexts``): the outputs of matmuls, grouped matmuls and
  SDPA are saved, the rest recomputed;
- ``save_on_cpu+ckpt``: ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` around the
  step on top of ``checkpoint``;
- ``hf_offload``: Hugging Face checkpointing with its ``offload`` switch (each checkpointed
  layer under ``save_on_cpu``; transformers >= 5.17);
- ``torchtune`` / ``torchtune+ckpt``: torchtune's ``OffloadActivations`` (only when
  torchtune is importable).

:func:`liger_causal_lm_loss` is the loss of the ``liger+ckpt`` row of the full-model run:
Liger Kernel's fused linear cross-entropy on the last hidden states (the logits of all
tokens never exist at once) plus the model's router aux loss, as Hugging Face adds it.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["Installed", "PEERS", "install_peer", "torchtune_available", "sac_policy_ops", "use_our_experts",
           "liger_available", "liger_causal_lm_loss", "hidden_state_loss"]


class Installed:
    """A strategy installed on a model (see the module docstring)."""

    def __init__(self, wrap: Optional[Callable] = None, remove: Optional[Callable] = None,
                 moved: Optional[Callable] = None, stats: Optional[Callable] = None) -> None:
        self._wrap, self._remove, self._moved, self._stats = wrap, remove, moved, stats

    def wrap(self, step_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The step function to run under this strategy."""
        return self._wrap(step_fn) if self._wrap else step_fn

    def moved_bytes(self) -> tuple:
        """``(d2h, h2d)`` bytes of the last step (0 when unknown)."""
        return self._moved() if self._moved else (0, 0)

    def stats(self) -> dict:
        """Extra JSON-able figures (engine stats for our plans)."""
        return self._stats() if self._stats else {}

    def remove(self) -> None:
        """Undo the installation."""
        if self._remove:
            self._remove()


TORCHTUNE_PATH_ENV = "MOE_OFFLOAD_TORCHTUNE_PATH"


def torchtune_available() -> bool:
    """True when ``torchtune.training.OffloadActivations`` imports.

    When it does not and ``$MOE_OFFLOAD_TORCHTUNE_PATH`` names a folder, that folder is added
    to ``sys.path`` and the import tried again.  The GPU check keeps torchtune there because
    torchtune 0.6.1 needs a torchao older than 0.16, which recent peft refuses to run LoRA
    beside (``is_torchao_available`` raises): the folder joins the path only when a
    torchtune row runs, after the adapters are in place."""
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


def liger_causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of a Hugging Face MoE ``model`` on ``ids`` ``(1, T)`` with Liger's
    fused linear cross-entropy (:func:`hidden_state_loss` with Liger's loss)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return hidden_state_loss(model, ids, LigerFusedLinearCrossEntropyLoss())


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


def _sac_forward(inner, *args, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=_sac_context, **kwargs)


def _undo_with_input_grads(model, disable: Callable[[], None]) -> Callable[[], None]:
    """``disable`` plus the input-embedding hook that enabling registered (Hugging Face's
    disable leaves it unless peft's config is loaded): the model is as before."""
    had = hasattr(model, "_require_grads_hook")

    def undo():
        disable()
        if not had and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
    return undo


def _hf_checkpointing(model) -> Callable[[], None]:
    """Hugging Face's own per-layer checkpointing (torch, non-reentrant); returns the undo."""
    had = _undo_with_input_grads(model, lambda: None)     # records the hook's state first
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:      # transformers >= 5.x name; the old one warns
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    return lambda: (disable(), had())


def _hf_offload_checkpointing(model) -> Callable[[], None]:
    """Hugging Face checkpointing with its ``offload`` switch; returns the undo.  Newer
    transformers take ``offload=True`` as an argument, 5.17 in the checkpointing kwargs."""
    had = _undo_with_input_grads(model, lambda: None)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "offload" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=True)
        disable = model.activation_checkpointing_disable
        return lambda: (disable(), had())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "offload": True})
    for m in model.modules():   # a transformers without the switch hands it on to torch: refuse
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if isinstance(fn, functools.partial) and "offload" in (fn.keywords or {}):
            model.gradient_checkpointing_disable()
            had()
            raise NotImplementedError("this transformers has no checkpointing offload switch "
                                      "(it would pass offload=True on to torch.utils.checkpoint)")
    disable = model.gradient_checkpointing_disable
    return lambda: (disable(), had())


def _save_on_cpu(step_fn, pin: bool):
    def run():
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return step_fn()
    return run


def _torchtune(step_fn):
    from torchtune.training import OffloadActivations
    ctx = OffloadActivations()

    def run():
        with ctx:
            return step_fn()
    return run


def install_peer(name: str, model, layers, cuda: bool) -> Installed:
    """Install peer ``name`` (one of :data:`PEERS`) on ``model``."""
    if name == "none":
        return Installed()
    if name == "checkpoint":
        return Installed(remove=_hf_checkpointing(model))
    if name == "sac":
        saved = []
        for layer in layers:
            saved.append((layer, "forward" in layer.__dict__, layer.__dict__.get("forward")))
            layer.forward = functools.partial(_sac_forward, layer.forward)

        def remove():
            for layer, had, prev in saved:
                if had:
                    layer.forward = prev
                else:
                    del layer.forward
        return Installed(remove=remove)
    if name == "hf_offload":
        return Installed(remove=_hf_offload_checkpointing(model))
    if name == "save_on_cpu+ckpt":
        off = _hf_checkpointing(model)
        return Installed(wrap=lambda f: _save_on_cpu(f, cuda), remove=off)
    if name in ("torchtune", "torchtune+ckpt"):
        if not torchtune_available():
            raise ImportError("torchtune is not installed")
        off = _hf_checkpointing(model) if name == "torchtune+ckpt" else None
        return Installed(wrap=_torchtune, remove=off)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")


PEERS = ("none", "checkpoint", "sac", "save_on_cpu+ckpt", "hf_offload", "torchtune", "torchtune+ckpt")


def use_our_experts(model) -> bool:
    """Run an HF ``model``'s experts on our fused grouped MLP
    (:func:`moe_offload.integrations.transformers.use_moe_offload_experts`); True when it
    switched, False when transformers is missing or the model has no supported experts."""
    try:
        from ..integrations.transformers import use_moe_offload_experts
    except ImportError:
        return False
    try:
        use_moe_offload_experts(model)
    except ValueError:
        return False
    return True
