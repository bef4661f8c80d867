"""``use_chunked_loss(model)``: an HF causal LM's training loss without full logits.

HF's causal LMs (Qwen3-MoE, Mixtral, Llama, ...) end their ``forward`` with::

    logits = self.lm_head(hidden_states)
    if labels is not None:
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
    ...   # the router aux loss is added to ``loss`` afterwards

so a hook after ``lm_head`` is too late: the ``(B, S, V)`` logits already exist.  Three
seams, all removed by :meth:`ChunkedLossHandle.remove`:

1. a forward pre-hook on the model *arms* the patch for this call when ``labels`` is
   given and grad is enabled (training); otherwise nothing below changes anything, and
   the model returns its real logits (generation, eval, ``no_grad`` eval with labels);
2. an instance ``forward`` on ``lm_head``: when armed, it keeps the hidden states and
   returns a *stand-in*, a zero-stride expanded zero of the logits' shape (no memory);
3. ``model.loss_function`` (HF's settable property): given the stand-in, it returns
   :func:`moe_offload.ops.linear_cross_entropy.causal_lm_loss` of the kept hidden
   states and ``lm_head.weight`` (HF's ``ForCausalLMLoss`` semantics: shift,
   ``ignore_index``, ``num_items_in_batch``, ``shift_labels``); any other logits go to
   the model's previous loss function.

A forward hook on the model then drops the stand-in from the output: ``outputs.logits``
is ``None`` when the loss was computed chunked (as Liger does); with
``return_dict=False`` the tuple has no logits entry.  It also checks that the stand-in
reached ``loss_function`` untouched: a model that transforms the logits before its loss
(soft-capping, a logit scale) or computes the loss without ``loss_function`` raises a
``RuntimeError`` instead of returning a wrong loss.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ...ops.linear_cross_entropy import causal_lm_loss

__all__ = ["ChunkedLossHandle", "use_chunked_loss"]


class ChunkedLossHandle:
    """Returned by :func:`use_chunked_loss`; ``remove()`` restores the model.

    ``chunk_tokens`` (settable) is passed to :func:`causal_lm_loss` (None: its default).
    """

    def __init__(self, model: nn.Module, chunk_tokens: Optional[int], labels_index: int) -> None:
        self.model = model
        self.lm_head = model.lm_head
        self.chunk_tokens = chunk_tokens
        self._labels_index = labels_index
        self._had_loss_function = "_loss_function" in model.__dict__
        self._previous_loss = model.loss_function
        self._armed = False
        self._hidden = None           # lm_head's input of the armed call
        self._standin = None          # what lm_head returned in its place
        self._consumed = False        # the loss function saw the stand-in
        self._hooks = []

    # -- the three seams ------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is None and len(args) > self._labels_index:
            labels = args[self._labels_index]
        self._reset()
        self._armed = labels is not None and torch.is_grad_enabled()

    def _lm_head_forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        if not self._armed:
            return type(head).forward(head, x)
        self._armed = False          # a second lm_head call in the same forward gets real logits
        self._hidden = x
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        self._standin = x.new_zeros((), dtype=dtype).expand(*x.shape[:-1], head.out_features)
        return self._standin

    def _loss_function(self, logits, labels, vocab_size, **kwargs):
        if self._standin is None:
            return self._previous_loss(logits, labels, vocab_size, **kwargs)
        if logits is not self._standin:
            raise RuntimeError("use_chunked_loss: the model changed lm_head's output before its loss "
                               "(e.g. logit soft-capping or scaling); the chunked loss does not support it")
        hidden, self._hidden, self._consumed = self._hidden, None, True
        return causal_lm_loss(hidden, self.lm_head.weight, labels, bias_V=self.lm_head.bias,
                              ignore_index=kwargs.get("ignore_index", -100),
                              num_items_in_batch=kwargs.get("num_items_in_batch"),
                              shift_labels=kwargs.get("shift_labels"), chunk_tokens=self.chunk_tokens)

    def _post_hook(self, module, args, kwargs, output):
        standin, consumed = self._standin, self._consumed
        self._reset()
        if standin is None or output is None:
            return None
        if not consumed:
            raise RuntimeError("use_chunked_loss: the model did not pass lm_head's output to "
                               "model.loss_function; the chunked loss cannot be used with this model")
        if isinstance(output, tuple):
            return tuple(o for o in output if o is not standin)
        if hasattr(output, "items") and output.get("logits") is standin:
            return type(output)(**{k: v for k, v in output.items() if k != "logits"})
        return None

    def _reset(self) -> None:
        self._armed, self._hidden, self._standin, self._consumed = False, None, None, False

    # -- install / remove -------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        self._hooks.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
        self.lm_head.forward = self._lm_head_forward
        model.loss_function = self._loss_function

    def remove(self) -> None:
        """Undo :func:`use_chunked_loss`: hooks removed, ``lm_head.forward`` and
        ``model.loss_function`` as before.  Idempotent."""
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.lm_head.__dict__.get("forward") == self._lm_head_forward:
            del self.lm_head.forward
        if self._had_loss_function:
            self.model.loss_function = self._previous_loss
        else:
            self.model.__dict__.pop("_loss_function", None)
        self._reset()


def chunked_loss_problem(model: nn.Module) -> Optional[str]:
    """Why :func:`use_chunked_loss` cannot act on ``model`` (``None``: it can)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return ("use_chunked_loss needs model.lm_head to be an nn.Linear with nn.Linear's forward "
                f"(a quantized or otherwise custom head is not supported), got {type(head).__name__}")
    if isinstance(getattr(head.__dict__.get("forward"), "__self__", None), ChunkedLossHandle):
        return "use_chunked_loss is already active on this model; remove() its handle first"
    if "forward" in head.__dict__:
        return "model.lm_head.forward is already overridden on the instance; refusing to wrap it"
    prop = getattr(type(model), "loss_function", None)
    if not isinstance(prop, property) or prop.fset is None:
        return (f"{type(model).__name__} has no settable loss_function property (a transformers "
                "PreTrainedModel is needed)")
    if "labels" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward has no 'labels' argument"
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None:
        return ("the model soft-caps its logits (config.final_logit_softcapping); "
                "the chunked loss does not support it")
    return None


def use_chunked_loss(model: nn.Module, chunk_tokens: Optional[int] = None) -> ChunkedLossHandle:
    """Compute an HF causal LM's training loss with the chunked LM head + cross-entropy.

    In a forward with ``labels`` and grad enabled, the loss is
    :func:`~moe_offload.ops.linear_cross_entropy.causal_lm_loss` of the final hidden
    states and ``model.lm_head`` (same value and gradients as HF's loss up to float
    rounding; the router aux loss is still added by the model), the ``(B, S, V)``
    logits are never formed, and ``outputs.logits`` is ``None``.  Any other forward
    (no labels, or under ``no_grad``/``inference_mode``) is unchanged and returns real
    logits.  See the module docstring for the mechanism.

    Args:
        model: a transformers causal LM with a plain ``nn.Linear`` ``lm_head``, a settable
            ``loss_function`` and a ``labels`` argument to ``forward``.
        chunk_tokens: tokens per chunk (None: ~256 MiB of fp32 logits per chunk).

    Returns:
        A :class:`ChunkedLossHandle`; ``handle.remove()`` restores the model.
    """
    problem = chunked_loss_problem(model)
    if problem is not None:
        raise ValueError(problem)
    params = list(inspect.signature(model.forward).parameters)
    handle = ChunkedLossHandle(model, chunk_tokens, params.index("labels"))
    handle._install()
    return handle
