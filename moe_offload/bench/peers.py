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
- ``torchtune`` / ``torchtune+ckpt``: torchtune's ``OffloadActivations`` (only when
  torchtune is importable).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["Installed", "PEERS", "install_peer", "torchtune_available", "sac_policy_ops"]


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


def torchtune_available() -> bool:
    """True when ``torchtune.training.OffloadActivations`` imports."""
    try:
        from torchtune.training import OffloadActivations  # noqa: F401
    except Exception:
        return False
    return True


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


def _hf_checkpointing(model) -> Callable[[], None]:
    """Hugging Face's own per-layer checkpointing (torch, non-reentrant); returns the undo."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:      # transformers >= 5.x name; the old one warns
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model.activation_checkpointing_disable
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.gradient_checkpointing_disable


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
    if name == "save_on_cpu+ckpt":
        off = _hf_checkpointing(model)
        return Installed(wrap=lambda f: _save_on_cpu(f, cuda), remove=off)
    if name in ("torchtune", "torchtune+ckpt"):
        if not torchtune_available():
            raise ImportError("torchtune is not installed")
        off = _hf_checkpointing(model) if name == "torchtune+ckpt" else None
        return Installed(wrap=_torchtune, remove=off)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")


PEERS = ("none", "checkpoint", "sac", "save_on_cpu+ckpt", "torchtune", "torchtune+ckpt")
