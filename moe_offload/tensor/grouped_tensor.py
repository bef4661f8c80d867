"""``GroupedTensor``: a ``torch.Tensor`` wrapper subclass over a GroupedTensorStorage.

For external use (e.g. handing FP8 tokens to a dispatch/all-to-all); layers keep the
plain :class:`GroupedTensorStorage` internally.  The wrapper reports the logical
``(T, K)`` shape and the fake (high-precision) dtype; the data lives in the inner
component tensors.

Op policy (``__torch_dispatch__``):

- ``aten.detach``, ``aten.alias``: return a new wrapper over the *same* components
  (no copy), as autograd and views expect.
- ``aten.clone``: a new wrapper over cloned components.
- ``aten._to_copy`` to another device with the dtype unchanged: components copied to
  that device (stays quantized).  With a different ``dtype``: dequantizes and returns a
  plain tensor of that dtype (``x.to(torch.float32)`` is therefore "dequantize").
- Everything else raises ``NotImplementedError`` naming the op.  In particular
  ``empty_like``/``copy_``/arithmetic do **not** silently dequantize (that is how a
  generic engine would break uneven groups; call :meth:`dequantize` explicitly).

Offload and ``torch`` machinery see the components through ``__tensor_flatten__``
(inner tensor names = the components present) and ``__tensor_unflatten__``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .grouped_storage import COMPONENTS, GroupedTensorStorage

__all__ = ["GroupedTensor"]

aten = torch.ops.aten


class GroupedTensor(torch.Tensor):
    """Quantized grouped ``(T, K)`` matrix as a tensor subclass (see module docstring)."""

    @staticmethod
    def __new__(cls, storage: GroupedTensorStorage, requires_grad: bool = False):
        if not isinstance(storage, GroupedTensorStorage):
            raise TypeError(f"GroupedTensor wraps a GroupedTensorStorage, got {type(storage).__name__}")
        device = storage.offsets.device
        self = torch.Tensor._make_wrapper_subclass(cls, storage.shape, dtype=storage.fake_dtype,
                                                   device=device, requires_grad=requires_grad)
        self._storage = storage
        self._sync_component_attrs()
        return self

    def __init__(self, storage: GroupedTensorStorage, requires_grad: bool = False):
        pass

    def _sync_component_attrs(self) -> None:
        """Expose each component as an instance attribute (what ``__tensor_flatten__``
        names refer to).  Instance attributes shadow ``Tensor`` methods of the same name
        (``amax``), so ``getattr(t, "amax")`` is the component tensor."""
        for name in COMPONENTS:
            self.__dict__[name] = getattr(self._storage, name)

    @classmethod
    def from_storage(cls, storage: GroupedTensorStorage) -> "GroupedTensor":
        """Wrap ``storage`` (shares its components)."""
        return cls(storage)

    def storage(self) -> GroupedTensorStorage:  # type: ignore[override]
        """The underlying :class:`GroupedTensorStorage` (shared, not copied)."""
        return self._storage

    def dequantize(self, dtype: Optional[torch.dtype] = None, usage: Optional[str] = None) -> torch.Tensor:
        """Plain tensor of the represented values (see GroupedTensorStorage.dequantize)."""
        return self._storage.dequantize(dtype, usage)

    def __repr__(self) -> str:
        return f"GroupedTensor({self._storage!r})"

    def share_memory_(self):  # type: ignore[override]
        """Not supported (a wrapper has no storage of its own to move; torch's
        implementation would crash the interpreter): raises ``RuntimeError``.  Share the
        component tensors instead (``t.storage().component_tensors()``)."""
        raise RuntimeError("GroupedTensor.share_memory_() is not supported: the data lives in "
                           "the component tensors; call share_memory_() on "
                           "t.storage().component_tensors() instead")

    # ------------------------------------------------------------------ flatten
    def __tensor_flatten__(self):
        s = self._storage
        self._sync_component_attrs()  # the storage's usages may have changed
        names = [n for n in COMPONENTS if getattr(s, n) is not None]
        ctx = (s.fmt, s.shape, s.fake_dtype, s.num_groups, s.col_align, s.fp8_dtype)
        return names, ctx

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        fmt, shape, fake_dtype, num_groups, col_align, fp8_dtype = ctx
        storage = GroupedTensorStorage(fmt, shape, fake_dtype, num_groups, col_align, fp8_dtype,
                                       **dict(inner_tensors))
        return GroupedTensor(storage)

    def _map_components(self, fn) -> "GroupedTensor":
        s = self._storage
        parts = {n: (None if getattr(s, n) is None else fn(getattr(s, n))) for n in COMPONENTS}
        return GroupedTensor(GroupedTensorStorage(s.fmt, s.shape, s.fake_dtype, s.num_groups,
                                                  s.col_align, s.fp8_dtype, **parts))

    # ------------------------------------------------------------------ dispatch
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._map_components(func)
        if func is aten.clone.default:
            return args[0]._map_components(lambda t: t.clone())
        if func is aten._to_copy.default:
            self = args[0]
            dtype = kwargs.get("dtype")
            device = kwargs.get("device")
            if dtype is None or dtype == self.dtype:
                return self._map_components(lambda t: t.to(device=device) if device is not None else t.clone())
            out = self.dequantize(dtype)
            return out.to(device) if device is not None else out
        raise NotImplementedError(
            f"GroupedTensor does not support {func}; supported: detach, alias, clone, _to_copy "
            "(.to(device) stays quantized, .to(dtype) dequantizes). Call .dequantize() first.")

    __torch_function__ = torch._C._disabled_torch_function_impl
