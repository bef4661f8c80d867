"""Shared test utilities for the offload engine (CPU, ``emulate=True`` by default)."""
from __future__ import annotations

import weakref

import gc

import torch
from torch import nn
from torch.utils._pytree import tree_map

from moe_offload.offload import get_cpu_offload_context

SMALL = 1024   # min_offload_bytes used by the CPU tests


class Block(nn.Module):
    """``relu(x @ w1) @ w2``; remembers a weakref to the storage of its hidden ``a``.

    Saved per call: ``x`` (mm input), ``a`` (relu result and mm input: one storage,
    saved twice) and the parameters ``w1``, ``w2``.
    """

    def __init__(self, H: int = 32, F: int = 64, device=None):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(H, F, device=device) / H ** 0.5)
        self.w2 = nn.Parameter(torch.randn(F, H, device=device) / F ** 0.5)
        self.hidden_storage = None

    def forward(self, x):
        a = torch.relu(x @ self.w1)
        self.hidden_storage = weakref.ref(a.untyped_storage())
        return a @ self.w2


def forward_stack(layers, x, ctx=None, sync=None, call=None):
    """``x`` through ``layers``; each layer inside ``ctx`` followed by ``sync`` if given."""
    call = call or (lambda layer, h: layer(h))
    h = x
    for layer in layers:
        if ctx is None:
            h = call(layer, h)
        else:
            with ctx:
                h = call(layer, h)
            h = sync(h)
    return h


def run_stack(layers, x, ctx_kwargs=None, call=None, loss=None, retain_graph=False):
    """Forward + backward through ``layers``; offloaded when ``ctx_kwargs`` is a dict.

    Returns ``(out, grads, ctx)`` with grads = [x.grad, every param grad...].
    """
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    ctx = sync = None
    if ctx_kwargs is not None:
        ctx, sync = get_cpu_offload_context(**ctx_kwargs)
    h = forward_stack(layers, x, ctx, sync, call)
    value = loss(h) if loss is not None else (h.float() ** 2).sum()
    value.backward(retain_graph=retain_graph)
    grads = [x.grad] + [p.grad.clone() for layer in layers for p in layer.parameters()
                        if p.grad is not None]
    return h.detach(), grads, ctx


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every live plain tensor (after ``gc.collect()``)."""
    gc.collect()
    seen, n = set(), 0
    for o in gc.get_objects():
        if type(o) is torch.Tensor and o.untyped_storage().data_ptr() not in seen:
            seen.add(o.untyped_storage().data_ptr())
            n += o.untyped_storage().nbytes()
    return n


def assert_bitwise(ref, got):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"grad {i} differs: max {(a.float() - b.float()).abs().max()}"


# -- a test-only composite tensor subclass ----------------------------------------------
class SplitScaledTensor(torch.Tensor):
    """Test-only wrapper subclass: value = cat([top, bottom]) * scale.

    Uneven components (``top`` and ``bottom`` have different row counts) and a tiny
    ``scale``.  Implements ``__tensor_flatten__``/``__tensor_unflatten__``; detach/alias
    keep the subclass, every other op runs on the dequantized plain tensor.
    """

    @staticmethod
    def __new__(cls, top, bottom, scale):
        shape = (top.shape[0] + bottom.shape[0],) + tuple(top.shape[1:])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=top.dtype,
                                                   device=top.device, requires_grad=False)

    def __init__(self, top, bottom, scale):
        self.top, self.bottom, self.scale = top, bottom, scale

    def __tensor_flatten__(self):
        return ["top", "bottom", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return SplitScaledTensor(inner["top"], inner["bottom"], inner["scale"])

    def dequantize(self):
        return torch.cat([self.top, self.bottom]) * self.scale

    def __repr__(self):
        return f"SplitScaledTensor({tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            t = args[0]
            return SplitScaledTensor(func(t.top), func(t.bottom), func(t.scale))
        unwrap = lambda a: a.dequantize() if isinstance(a, SplitScaledTensor) else a
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def split_scaled(x, rows_top):
    """Quantize-like split of ``x`` into a SplitScaledTensor (exact: scale is 2.0)."""
    scale = torch.full((1,), 2.0, dtype=x.dtype, device=x.device)
    return SplitScaledTensor((x[:rows_top] / 2).contiguous(), (x[rows_top:] / 2).contiguous(),
                             scale)


class CompositeMatmul(torch.autograd.Function):
    """``y = x @ w`` saving ``x`` as a SplitScaledTensor (a composite subclass)."""

    @staticmethod
    def forward(ctx, x, w, rows_top):
        ctx.save_for_backward(split_scaled(x.detach(), rows_top), w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        q, w = ctx.saved_tensors
        assert isinstance(q, SplitScaledTensor)
        return g @ w.t(), q.dequantize().t() @ g, None


# -- a test-only storage object (not a tensor) ------------------------------------------
class PairStorage:
    """Test-only storage object: ``data`` (big) and ``scale`` (tiny)."""

    def __init__(self, data, scale):
        self.data, self.scale = data, scale

    def component_tensors(self):
        return [self.data, self.scale]

    def prepare_for_saving(self):
        tensors = [self.data, self.scale]
        self.data = self.scale = None
        return tensors, self

    def restore_from_saved(self, tensors):
        self.data, self.scale = tensors[0], tensors[1]
        return tensors[2:]

    def dequantize(self):
        return self.data * self.scale


class StorageMatmul(torch.autograd.Function):
    """``y = x @ w`` saving ``x`` as a PairStorage through saving.py's helpers."""

    @staticmethod
    def forward(ctx, x, w):
        from moe_offload.offload.saving import prepare_for_saving
        scale = torch.full((1,), 0.5, dtype=x.dtype, device=x.device)
        storage = PairStorage((x.detach() * 2).contiguous(), scale)
        tensors, state = prepare_for_saving(storage, w, None)
        ctx.save_for_backward(*tensors)
        ctx.state = state
        return x @ w

    @staticmethod
    def backward(ctx, g):
        from moe_offload.offload.saving import restore_from_saved
        storage, w, none = restore_from_saved(ctx.state, ctx.saved_tensors)
        assert none is None and isinstance(storage, PairStorage)
        return g @ w.t(), storage.dequantize().t() @ g


def no_saved_tensor_hooks() -> bool:
    """True when no saved-tensor hooks are installed (the hooks stack is empty)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None
