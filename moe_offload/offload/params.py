"""Which device storages belong to parameters (those never move).

A parameter is easy to recognise when autograd saves it as itself, or as a view of it
(``w.t()``: ``_base`` is the parameter).  A *detached* alias (``w.detach()``, as custom
autograd functions often save) is a plain tensor with no ``_base``, yet it shares the
parameter's storage: offloading it would copy weights every step and free nothing.

The rule: a storage is a parameter storage once the engine has seen a parameter on it.
The engine learns parameters (1) from every parameter or parameter view it is asked to
save, (2) from the direct parameters of every module called while an offload context is
entered during its first step (a global forward pre-hook installed only for the
duration of an entry, and only until the first backward: a global hook takes module
calls off torch's fast path), and
(3) from every module handed to ``offload_module_list``.  The pack hook then does one
dict lookup per saved tensor (keyed by storage data_ptr and device); no scan over the
parameters happens on the hot path.  Entries hold the storage weakly, and a lookup
whose storage died (its address may be reused by an activation) is dropped.
"""
from __future__ import annotations

import weakref
from typing import Dict, Tuple

import torch

__all__ = ["ParamStorages", "PARAM_STORAGES"]



class ParamStorages:
    """A weak registry of parameter storages, keyed by ``(data_ptr, device)``."""

    def __init__(self) -> None:
        self._refs: Dict[Tuple[int, torch.device], weakref.ref] = {}
        # Addresses :meth:`see` registered already (a shortcut only: :meth:`contains`
        # decides, and forgets the shortcuts when it finds a dead storage).
        self._seen_ptrs = set()
        self._modules_seen = weakref.WeakSet()

    def add(self, p: torch.Tensor) -> None:
        """Register the storage of ``p`` (a parameter or a view of one)."""
        try:
            storage = p.untyped_storage()
            key = (storage.data_ptr(), p.device)
        except (RuntimeError, NotImplementedError):   # no storage (e.g. FSDP2's DTensor shards)
            return
        ref = self._refs.get(key)
        if ref is None or ref() is not storage:
            self._refs[key] = weakref.ref(storage)

    def see(self, t: torch.Tensor) -> None:
        """Pack-hook fast path: register a saved parameter (or a view of one); a set
        lookup when its address was registered already."""
        ptr = t.data_ptr()
        if ptr in self._seen_ptrs:
            return
        self.add(t if t._base is None else t._base)
        self._seen_ptrs.add(ptr)

    def add_module(self, module: torch.nn.Module, recurse: bool = True) -> None:
        """Register every parameter of ``module``."""
        for p in module.parameters(recurse=recurse):
            self.add(p)

    def contains(self, ptr: int, device: torch.device) -> bool:
        """Is the storage at ``ptr`` on ``device`` a live parameter storage?"""
        key = (ptr, device)
        ref = self._refs.get(key)
        if ref is None:
            return False
        storage = ref()
        if storage is None or storage.data_ptr() != ptr:
            del self._refs[key]
            self._seen_ptrs.clear()
            return False
        return True

    def module_pre_hook(self, module: torch.nn.Module, args) -> None:
        """Global forward pre-hook body: register the module's direct parameters, once
        per module (a parameter assigned to the module later is learned when it is
        saved as itself, or by ``offload_module_list``)."""
        if module in self._modules_seen:
            return
        self._modules_seen.add(module)
        for p in module.parameters(recurse=False):
            self.add(p)


# One registry for the process: a parameter's storage never moves, whichever context
# sees it.
PARAM_STORAGES = ParamStorages()
