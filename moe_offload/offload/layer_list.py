"""Finding a model's decoder layers: the one finder the planner, the benchmark and the
Hugging Face integration share.

A model's layers are a ``ModuleList`` (Hugging Face: ``model.model.layers``; most
PyTorch models) or a ``ModuleDict`` (torchtitan: ``model.layers``, keyed by layer index).
The finder prefers, in order:

1. the lists whose members are all Hugging Face ``GradientCheckpointingLayer`` s (every
   HF decoder layer is one; recognised by class name, so transformers is not imported);
2. the lists at the usual paths (``model.layers``, ``layers``, ``transformer.h``,
   ``model.decoder.layers``) or named ``layers`` / ``h`` / ``blocks``;
3. any list whose members share one class;

and among several candidates of the first kind that has any, the one with the most
parameters (a language model's layers, not a vision tower's).  A ``ModuleDict`` comes back
as a ``ModuleList`` of the same modules in its order (hooks go on the modules themselves).
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

__all__ = ["find_layers"]

_PATHS = ("model.layers", "layers", "transformer.h", "model.decoder.layers")
_NAMES = ("layers", "h", "blocks")


def _is_hf_layer(m: nn.Module) -> bool:
    return any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)


def _members(mod: nn.Module) -> Optional[List[nn.Module]]:
    if isinstance(mod, nn.ModuleList):
        return list(mod)
    if isinstance(mod, nn.ModuleDict):
        return list(mod.values())
    return None


def _params(mods: List[nn.Module]) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


def _as_list(mod: nn.Module, kids: List[nn.Module]) -> nn.ModuleList:
    return mod if isinstance(mod, nn.ModuleList) else nn.ModuleList(kids)


def find_layers(model: nn.Module, layers=None) -> nn.ModuleList:
    """The decoder-layer list of ``model`` (see the module docstring).

    ``layers`` given: used as is (a ``ModuleList``/``ModuleDict``/``Sequential``/list of
    modules).  ``model`` itself a ``ModuleList``: ``model``.  ``ValueError`` when no list
    is found (pass ``layers=``); ``TypeError`` for a ``layers`` that is not a list of
    modules."""
    if layers is not None:
        if isinstance(layers, nn.ModuleDict):
            layers = list(layers.values())
        if isinstance(layers, (nn.ModuleList, nn.Sequential, list, tuple)) and len(layers) > 0 \
                and all(isinstance(m, nn.Module) for m in layers):
            return layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(list(layers))
        raise TypeError("layers must be a non-empty ModuleList/ModuleDict/Sequential/list of "
                        f"modules, got {type(layers).__name__}")
    if isinstance(model, nn.ModuleList) and len(model) > 0:
        return model
    hf, named, alike = [], [], []
    at_path = {id(_resolve(model, p)) for p in _PATHS}
    for name, mod in model.named_modules():
        kids = _members(mod)
        if not kids:
            continue
        if all(_is_hf_layer(k) for k in kids):
            hf.append((mod, kids))
        elif id(mod) in at_path or name.rsplit(".", 1)[-1] in _NAMES:
            named.append((mod, kids))
        elif len({type(k) for k in kids}) == 1 and len(kids) > 1:
            alike.append((mod, kids))
    for found in (hf, named, alike):
        if found:
            mod, kids = max(found, key=lambda mk: _params(mk[1]))
            return _as_list(mod, kids)
    raise ValueError(f"found no decoder-layer list in {type(model).__name__}; pass layers=")


def _resolve(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj
