"""Find a model's decoder layers, name the kind of each sub-module, and install the
module-level recompute wrappers a plan uses.

Kinds (:data:`KINDS`): ``attention``, ``norm``, ``router``, ``experts``, ``mlp`` (a dense
MLP or the MoE block around router and experts) and ``other`` (what a layer saves
outside any of those).  A saved tensor belongs to the *innermost* classified module
running when it is saved.

Recompute options (:data:`RECOMPUTE_OPTIONS`), per layer:

- ``none``: nothing recomputed;
- ``norms``: every norm module saves its input instead of its fp32 intermediates and is
  recomputed in backward (:class:`_RecomputeNorm`: one autograd node per norm, cheaper on the
  host than ``torch.utils.checkpoint``, to which it falls back for calls it cannot take);
- ``norms+fc1``: and every :class:`~moe_offload.ops.GroupedMLP` of the layer runs with
  ``recompute="fc1"`` (saves only its input);
- ``norms+experts``: and the experts module (not ours) is checkpointed;
- ``norms+mlp``: and the whole MLP / MoE block (router included) is checkpointed;
- ``layer``: the whole layer is checkpointed (only its inputs are saved).

Wrappers replace ``module.forward`` by an instance attribute and :func:`remove` puts the
previous one back, so the model is unchanged after a plan is removed.  Non-reentrant
checkpoint runs the forward with grad, so values published from inside (HF's recorded
router logits, ``MoE.aux_loss``) keep their graph: the router aux loss still trains.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..offload import find_layers

__all__ = ["KINDS", "RECOMPUTE_OPTIONS", "find_layers", "classify", "layer_modules",
           "options_for", "install_recompute", "Wrappers", "has_loss_function",
           "install_loss_checkpoint", "install_head", "has_hf_head", "heads_for", "register_head",
           "register_recompute_switch", "RECOMPUTE_SWITCHES", "HEAD_INSTALLERS"]

KINDS = ("attention", "norm", "router", "experts", "mlp", "other")
RECOMPUTE_OPTIONS = ("none", "norms", "norms+fc1", "norms+experts", "norms+mlp", "layer")


#: Recognisers of a recompute switch on a module other than ours: ``fn(module) -> the
#: attribute name of its switch ("activation"/"fc1"), or None``.  ``GroupedMLP.recompute`` is
#: built in; the transformers integration registers HF experts modules that run our
#: implementation (at its import: the planner itself never imports an integration).
RECOMPUTE_SWITCHES: List[Callable[[nn.Module], Optional[str]]] = []


def register_recompute_switch(fn: Callable[[nn.Module], Optional[str]]) -> None:
    """Let the planner drive another module's recompute switch (see
    :data:`RECOMPUTE_SWITCHES`)."""
    if fn not in RECOMPUTE_SWITCHES:
        RECOMPUTE_SWITCHES.append(fn)


def _recompute_attr(m: nn.Module) -> Optional[str]:
    """The attribute holding ``m``'s recompute switch (``"activation"``/``"fc1"``): ours
    (``GroupedMLP.recompute``) or one a registered recogniser names."""
    from ..ops.grouped_mlp import GroupedMLP
    if isinstance(m, GroupedMLP):
        return "recompute"
    for fn in RECOMPUTE_SWITCHES:
        attr = fn(m)
        if attr is not None:
            return attr
    return None


def _has_recompute_switch(m: nn.Module) -> bool:
    return _recompute_attr(m) is not None


def classify(name: str, module: nn.Module) -> Optional[str]:
    """The kind of ``module`` (attribute ``name`` in its parent), or None."""
    from ..ops.grouped_mlp import GroupedMLP
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    if isinstance(module, GroupedMLP):
        return "experts"
    if "norm" in cls and not isinstance(module, nn.ModuleList):
        return "norm"
    if "attention" in cls or leaf in ("self_attn", "attn", "attention", "cross_attn"):
        return "attention"
    if "router" in cls or "topk" in cls or leaf in ("gate", "router"):
        return "router"
    if "experts" in cls or leaf == "experts":
        return "experts"
    if "moe" in cls or "sparse" in cls or "mlp" in cls or leaf in (
            "mlp", "moe", "block_sparse_moe", "feed_forward", "ffn"):
        return "mlp"
    return None


def layer_modules(layer: nn.Module) -> Dict[str, tuple]:
    """``{qualified name: (module, kind)}`` of the classified sub-modules of ``layer``
    (the inside of a norm or of an experts module is not searched)."""
    out = {}

    def walk(prefix: str, mod: nn.Module):
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            kind = classify(full, child)
            if kind is not None:
                out[full] = (child, kind)
            if kind not in ("norm", "experts"):
                walk(full, child)
    walk("", layer)
    return out


def options_for(layer: nn.Module) -> List[str]:
    """The recompute options that apply to ``layer`` (``none`` and ``layer`` always)."""
    kinds = {k: [] for k in KINDS}
    for _, (m, kind) in layer_modules(layer).items():
        kinds[kind].append(m)
    opts = ["none"]
    if kinds["norm"]:
        opts.append("norms")
        if any(_has_recompute_switch(m) for m in kinds["experts"]):
            opts.append("norms+fc1")
        if any(not _has_recompute_switch(m) for m in kinds["experts"]):
            opts.append("norms+experts")
        if kinds["mlp"]:
            opts.append("norms+mlp")
    elif any(_has_recompute_switch(m) for m in kinds["experts"]):
        opts.append("norms+fc1")       # no norms: fc1 recompute alone
    opts.append("layer")
    return opts


#: Keyword arguments by which Hugging Face passes a layer its KV cache (5.x: ``cache``).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _ckpt_forward(inner: Callable, *args, **kwargs):
    """``inner`` under non-reentrant checkpoint (with grad).  A KV cache handed to the
    layer is dropped first, as Hugging Face does under its own checkpointing
    (``use_cache=False`` in training): the recompute would append the same keys to it a
    second time (DeepSeek-V2's MLA layer then recomputes 64 keys where the forward saw 32:
    torch's ``CheckpointError``).  Training does not read the cache; the returned cache just
    lacks this layer's entries."""
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


class _RecomputeNorm(torch.autograd.Function):
    """A norm's forward without a graph, saving only its input; backward re-runs it.

    For a norm, ``torch.utils.checkpoint(use_reentrant=False)`` costs more host time than
    the kernels it saves (a frame, saved-tensor hooks and RNG state per call: 32 calls per
    step on an 8-layer Qwen3-MoE, whose q/k norms are per head).  Norms draw no random
    numbers and publish nothing, so one node does: the forward runs ``fn(x)`` under
    ``no_grad`` (the same kernels as with grad) and saves ``x`` (through whatever
    saved-tensor hooks are active: the offload engine may move it); the backward runs
    ``fn`` again on ``x`` with grad and differentiates that graph with
    ``torch.autograd.grad``.  The ops and their order are those of the plain forward, so
    the gradients are bitwise the plain ones.  The parameters are passed in only so that
    autograd routes their gradients through this node.
    """

    @staticmethod
    def forward(ctx, fn, x, *params):
        ctx.fn = fn
        ctx.save_for_backward(x)
        ctx.params = params
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[2:]) if need]
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(need_x)
            y = ctx.fn(x_)
        wrt = ([x_] if need_x else []) + params
        grads = iter(torch.autograd.grad(y, wrt, dy) if wrt else ())
        dx = next(grads) if need_x else None
        dparams = [next(grads) if need else None for need in ctx.needs_input_grad[2:]]
        return (None, dx, *dparams)


def _uses_of_input(y: torch.Tensor, x: torch.Tensor) -> int:
    """How many edges of ``y``'s graph (above ``x``) consume ``x``."""
    target = torch.autograd.graph.get_gradient_edge(x)
    seen, stack, uses = set(), [y.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen or node is target.node:
            continue
        seen.add(node)
        for nxt, nr in node.next_functions:
            if nxt is target.node and nr == target.output_nr:
                uses += 1
            elif nxt is not None:
                stack.append(nxt)
    return uses


def _recompute_norm_forward(module: nn.Module, inner: Callable, *args, **kwargs):
    if (len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor)
            or not torch.is_grad_enabled() or torch.is_autocast_enabled()):
        return _ckpt_forward(inner, *args, **kwargs)
    x = args[0]
    params = tuple(p for p in module.parameters() if p.requires_grad)
    if not x.requires_grad and not params:
        return inner(x)
    # One node stands in for the norm's graph; that is bitwise the plain backward only if
    # the norm consumes its input once (e.g. HF's RMSNorm upcasting a bf16 input):
    # otherwise the norm's own contributions to x's gradient would be summed before, not
    # interleaved with, the other consumers' (another rounding order).  The first call
    # per module and input dtype also runs it plain (with grad; the result is dropped)
    # to count; a norm that uses its input more than once (an fp32 input that
    # ``.to(float32)`` returns as is) keeps torch's checkpoint, which replays the plain
    # graph.  The answer is kept on the module, so later plans reuse it.
    single_use = module.__dict__.setdefault("_moe_offload_norm_single_use", {})
    single = single_use.get(x.dtype)
    if single is None:
        y = inner(x)
        single = (not x.requires_grad or not isinstance(y, torch.Tensor)
                  or y.grad_fn is None or _uses_of_input(y, x) == 1)
        single_use[x.dtype] = single
        del y
    if not single:
        return _ckpt_forward(inner, x)
    return _RecomputeNorm.apply(inner, x, *params)


_MISSING = object()


class Wrappers:
    """What :func:`install_recompute` changed; :meth:`remove` undoes it."""

    def __init__(self) -> None:
        self._forwards = []          # (module, had instance forward, previous value)
        self._attrs = []             # (module, attribute, previous value)
        self._undo = []              # callables run first at remove()

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Run ``undo()`` at :meth:`remove` (before the other changes are undone)."""
        self._undo.append(undo)

    def checkpoint_module(self, module: nn.Module) -> None:
        """Run ``module``'s forward under non-reentrant ``torch.utils.checkpoint``."""
        had = "forward" in module.__dict__
        prev = module.__dict__.get("forward")
        module.forward = functools.partial(_ckpt_forward, module.forward)
        self._forwards.append((module, had, prev))

    def recompute_norm(self, module: nn.Module) -> None:
        """Recompute a norm module in backward, saving only its input (:class:`_RecomputeNorm`)."""
        had = "forward" in module.__dict__
        prev = module.__dict__.get("forward")
        module.forward = functools.partial(_recompute_norm_forward, module, module.forward)
        self._forwards.append((module, had, prev))

    def set_attr(self, module: nn.Module, name: str, value) -> None:
        """Set ``module.name = value`` until :meth:`remove`."""
        self._attrs.append((module, name, getattr(module, name, _MISSING)))
        setattr(module, name, value)

    def checkpoint_loss(self, model: nn.Module) -> None:
        """Run a Hugging Face model's ``loss_function`` under non-reentrant checkpoint."""
        had = "_loss_function" in model.__dict__
        prev = model.__dict__.get("_loss_function")
        model.loss_function = functools.partial(_ckpt_forward, model.loss_function)
        self._loss = (model, had, prev)

    def replace_loss(self, model: nn.Module, fn, undo: Callable[[], None]) -> None:
        """Use ``fn`` as a Hugging Face model's ``loss_function``; ``undo()`` runs at
        :meth:`remove`."""
        had = "_loss_function" in model.__dict__
        prev = model.__dict__.get("_loss_function")
        model.loss_function = fn
        self._loss = (model, had, prev)
        self._loss_undo = undo

    def remove(self) -> None:
        """Restore every forward and attribute (last change first)."""
        while self._undo:
            self._undo.pop()()
        loss = getattr(self, "_loss", None)
        undo = getattr(self, "_loss_undo", None)
        if undo is not None:
            undo()
            self._loss_undo = None
        if loss is not None:
            model, had, prev = loss
            if had:
                model._loss_function = prev
            else:
                del model._loss_function
            self._loss = None
        for module, name, prev in reversed(self._attrs):
            if prev is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, prev)
        for module, had, prev in reversed(self._forwards):
            if had:
                module.forward = prev
            else:
                del module.forward
        self._attrs.clear()
        self._forwards.clear()


def install_recompute(layer: nn.Module, option: str, wrappers: Wrappers) -> None:
    """Install recompute ``option`` on ``layer`` (see the module docstring)."""
    if option not in RECOMPUTE_OPTIONS:
        raise ValueError(f"unknown recompute option {option!r}; expected one of {RECOMPUTE_OPTIONS}")
    if option == "none":
        return
    if option == "layer":
        wrappers.checkpoint_module(layer)
        return
    mods = layer_modules(layer)
    for _, (m, kind) in mods.items():
        if kind == "norm":
            wrappers.recompute_norm(m)
    for _, (m, kind) in mods.items():
        if option == "norms+fc1" and kind == "experts" and _has_recompute_switch(m):
            wrappers.set_attr(m, _recompute_attr(m), "fc1")
        elif option == "norms+experts" and kind == "experts" and not _has_recompute_switch(m):
            wrappers.checkpoint_module(m)
    if option == "norms+mlp":
        tops = [m for name, (m, kind) in mods.items() if kind == "mlp"
                and not any(name.startswith(o + ".") for o, (_, k) in mods.items() if k == "mlp")]
        for m in tops:
            wrappers.checkpoint_module(m)


def has_loss_function(model: nn.Module) -> bool:
    """True for a Hugging Face model whose loss is ``model.loss_function`` (settable)."""
    cls_attr = getattr(type(model), "loss_function", None)
    return isinstance(cls_attr, property) and cls_attr.fset is not None


def _head_modules(model: nn.Module):
    """``(final norm, lm_head)`` of a Hugging Face causal LM, or None."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if isinstance(norm, nn.Module) and isinstance(head, nn.Linear):
        return norm, head
    return None


def _to_host(t):
    """Pack hook of the head checkpoint: a CUDA tensor is copied into pinned host memory
    on the current stream (non-blocking).  No wait is needed: the allocator reuses the
    device block only for later work on this stream, which runs after the copy; the
    caching host allocator keeps the pinned block until the copies that use it finished."""
    if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.is_cuda:
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        return (t.device, host)
    return t.detach() if isinstance(t, torch.Tensor) else t


def _from_host(packed):
    """Unpack hook: the copy back, on the current stream (ordered before its use)."""
    if isinstance(packed, tuple):
        device, host = packed
        return host.to(device, non_blocking=True)
    return packed


class _HeadCheckpoint:
    """The loss under checkpoint from the *final norm's input*: final norm, LM head and
    loss are recomputed in backward, so the forward keeps only that input (moved to
    pinned host memory on the GPU), not the fp32 log-softmax, the logits or the norm's
    fp32 intermediates.  Hugging Face still runs its own norm and LM head for the returned
    logits; that branch does not reach the loss, so its graph dies with the output.  The
    recomputation runs the same kernels on the same inputs: the loss and every gradient
    are bitwise those without the plan."""

    def __init__(self, model: nn.Module, norm: nn.Module, head: nn.Linear, loss_fn) -> None:
        self.norm, self.head, self.loss_fn = norm, head, loss_fn
        self.x = None
        self.inside = False       # our own norm call (forward or recompute): not captured
        self.hook = norm.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if not self.inside and torch.is_grad_enabled() and args and \
                isinstance(args[0], torch.Tensor):
            self.x = args[0]

    def __call__(self, logits, labels, vocab_size, **kwargs):
        x, self.x = self.x, None
        if not torch.is_grad_enabled() or x is None or tuple(x.shape[:-1]) != tuple(logits.shape[:-1]):
            return _ckpt_forward(self.loss_fn, logits, labels, vocab_size, **kwargs)

        def run(x):
            self.inside = True
            try:
                return self.loss_fn(self.head(self.norm(x)), labels, vocab_size, **kwargs)
            finally:
                self.inside = False
        if not x.is_cuda:
            return checkpoint(run, x, use_reentrant=False)
        with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
            return checkpoint(run, x, use_reentrant=False)

    def remove(self) -> None:
        self.hook.remove()


def install_loss_checkpoint(model: nn.Module, wrappers: Wrappers) -> None:
    """Checkpoint the loss.  With a final norm and a linear LM head (Hugging Face causal
    LMs): from the final norm's input, moved to pinned host memory on the GPU
    (:class:`_HeadCheckpoint`: the forward keeps nothing of the head on the device).
    Otherwise ``loss_function`` alone: it saves the bf16 logits instead of the fp32
    log-softmax output."""
    if not has_loss_function(model):
        raise ValueError(f"{type(model).__name__} has no settable loss_function")
    mods = _head_modules(model)
    if mods is None:
        wrappers.checkpoint_loss(model)
        return
    head = _HeadCheckpoint(model, mods[0], mods[1], model.loss_function)
    wrappers.replace_loss(model, head, head.remove)


#: Head options beyond ``"none"`` and ``"checkpoint"``: ``name -> (applies(model) -> bool,
#: install(model) -> undo callable)``.  The transformers integration registers ``"chunked"``
#: (the loss in token chunks from the final hidden states) at its import.
HEAD_INSTALLERS: Dict[str, tuple] = {}


def register_head(name: str, applies: Callable[[nn.Module], bool],
                  install: Callable[[nn.Module], Callable[[], None]]) -> None:
    """Offer head option ``name`` to the planner (see :data:`HEAD_INSTALLERS`)."""
    if name in ("none", "checkpoint"):
        raise ValueError(f"head option {name!r} is built in")
    HEAD_INSTALLERS[name] = (applies, install)


def heads_for(model: nn.Module) -> List[str]:
    """The head options beyond ``"none"`` that apply to ``model``."""
    out = ["checkpoint"] if has_loss_function(model) else []
    return out + [name for name, (applies, _) in HEAD_INSTALLERS.items() if applies(model)]


def install_head(model: nn.Module, head: str, wrappers: Wrappers) -> None:
    """Install head option ``head``: ``"checkpoint"`` is :func:`install_loss_checkpoint`;
    the others come from :data:`HEAD_INSTALLERS`."""
    if head == "none":
        return
    if head == "checkpoint":
        install_loss_checkpoint(model, wrappers)
        return
    if head not in HEAD_INSTALLERS:
        raise ValueError(f"unknown head option {head!r} (registered: {sorted(HEAD_INSTALLERS)})")
    wrappers.on_remove(HEAD_INSTALLERS[head][1](model))


def has_hf_head(model: nn.Module) -> bool:
    """True for a Hugging Face causal LM with a settable ``loss_function``, a final norm and
    a linear LM head (what the head options act on)."""
    return has_loss_function(model) and _head_modules(model) is not None
