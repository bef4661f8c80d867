"""``GroupedLinear``: one linear layer per group over contiguous row groups.

Shape legend: ``T`` rows, ``K`` in features, ``N`` out features, ``G`` groups.
Row ``r`` of group ``g`` computes ``y[r] = x[r] @ weight[g].T + bias[g]``.

One autograd function for every precision: the GEMMs and what their operands look
like come from a GEMM backend (:mod:`.gemm`), chosen by ``recipe``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..offload.marks import mark_not_offload, start_offload
from ..tensor.row_groups import SplitSizes, offsets_from_splits
from .checks import check_grouped_input, check_int
from .gemm import backend_for, check_recipe
from .gemm.base import GemmBackend, Operand, Rows, load_record, save_record
from .grouped_gemm import add_group_bias, group_row_sum

__all__ = ["GroupedLinear", "grouped_linear", "SavedLinear"]


@dataclass
class SavedLinear:
    """What the backward of :class:`GroupedLinear` keeps.

    ``x``: the wgrad input as the backend holds it (bf16: ``x`` itself; quantized: its
    columnwise codes), ``None`` when the weight needs no gradient.  ``weight``: the
    parameter by reference (the dgrad operand is rebuilt from it) and ``weight_meta``
    the backend's per-expert metadata, ``None`` when ``x`` needs no gradient.
    ``offs_G``: the int32 end offsets."""
    x: Optional[Operand]
    weight: Optional[torch.Tensor]
    weight_meta: Optional[torch.Tensor]
    offs_G: torch.Tensor


class _GroupedLinearFn(torch.autograd.Function):
    """Forward/backward of the grouped linear on one GEMM backend.

    ``covered``: the offsets are known to cover all ``T`` rows (host or validated
    splits); otherwise tail rows come out zero in ``y`` and ``dx``."""

    @staticmethod
    def forward(ctx, x_TK, weight_GNK, bias_GN, offs_G, covered: bool, backend: GemmBackend):
        need_dx, need_dw = ctx.needs_input_grad[:2]
        rows = Rows(offs_G, x_TK.shape[0], covered)
        mark_not_offload(weight_GNK, bias_GN)
        xa = backend.quantize_act(x_TK, offs_G, True, need_dw)
        start_offload(xa.data)
        wq = backend.quantize_weight(weight_GNK, need_dx)
        y_TN = add_group_bias(backend.forward(xa, wq, rows, "zero", x_TK.dtype), bias_GN, offs_G)
        save_record(ctx, SavedLinear(backend.keep_for_wgrad(xa) if need_dw else None,
                                     weight_GNK if need_dx else None,
                                     wq.meta_G if need_dx else None, offs_G))
        ctx.has_bias, ctx.covered, ctx.backend = bias_GN is not None, covered, backend
        ctx.x_dtype, ctx.w_dtype = x_TK.dtype, weight_GNK.dtype
        return y_TN

    @staticmethod
    def backward(ctx, dy_TN):
        s: SavedLinear = load_record(ctx)
        B = ctx.backend
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        rows = Rows(s.offs_G, dy_TN.shape[0], ctx.covered)
        dy_TN = dy_TN.contiguous()
        dya = B.quantize_act(dy_TN, s.offs_G, need_dx, need_dw)
        dx = dw = db = None
        if need_dx:
            dx = B.dgrad(dya, B.weight_for_dgrad(s.weight, s.weight_meta), rows, "zero", ctx.x_dtype)
        if need_dw:
            dw = B.wgrad(dya, s.x, rows, ctx.w_dtype)
        if ctx.has_bias and need_db:
            db = group_row_sum(dy_TN, s.offs_G)
        return dx, dw, db, None, None, None


def grouped_linear(x_TK: torch.Tensor, offs_G: torch.Tensor, weight_GNK: torch.Tensor,
                   bias_GN: Optional[torch.Tensor] = None, recipe: Optional[str] = None,
                   covered: bool = True) -> torch.Tensor:
    """Functional :class:`GroupedLinear` on ready int32 end offsets (inputs not checked).

    ``covered=True`` promises ``offs[-1] == T`` (skips the tail masking)."""
    G, N, K = weight_GNK.shape
    backend = backend_for(recipe, x_TK, K, N)
    return _GroupedLinearFn.apply(x_TK, weight_GNK, bias_GN, offs_G, covered, backend)


class GroupedLinear(nn.Module):
    """``G`` independent linear layers applied to contiguous row groups of one input.

    Args:
        num_groups: ``G`` (>= 1).
        in_features, out_features: ``K``, ``N``.
        bias: learn a ``(G, N)`` bias.
        recipe: ``None`` (compute in the parameter dtype: bf16/fp16/fp32) or one of
            ``"fp8"``, ``"mxfp8"``, ``"nvfp4"`` (quantized compute, see
            :mod:`moe_offload.ops.gemm`).  MXFP8/NVFP4 need ``in_features`` and
            ``out_features`` to be multiples of 32/16 (checked here).

    Parameters: ``weight`` ``(G, N, K)``, ``bias`` ``(G, N)`` or ``None``.  Initialised
    like ``nn.Linear`` per group.

    ``forward(x, split_sizes, *, validate=False)``: ``x`` is ``(T, K)`` with the rows of
    group ``g`` contiguous, ``split_sizes[g]`` of them.  ``split_sizes`` may be an int
    tensor on ``x``'s device (no host sync in forward or backward; checked only when
    ``validate=True``, which **syncs the host** once), or a list / CPU int tensor (always
    checked, for free).  Groups may be empty.  With unchecked device splits summing to
    less than ``T``, rows past the sum come out zero and get zero input grad.
    Saved for backward (:class:`SavedLinear`): ``x`` (quantized recipes: its columnwise
    codes) and the int32 offsets; the weight by reference, never a copy.
    """

    def __init__(self, num_groups: int, in_features: int, out_features: int, bias: bool = True,
                 *, recipe: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        check_int("num_groups", num_groups)
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        self.num_groups, self.in_features, self.out_features = num_groups, in_features, out_features
        self.recipe = check_recipe(recipe, in_features=in_features, out_features=out_features)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_groups, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_groups, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear`` initialisation, group by group."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for g in range(self.num_groups):
                nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, split_sizes: SplitSizes, *, validate: bool = False) -> torch.Tensor:
        """Grouped ``x @ weight[g].T + bias[g]`` -> ``(T, out_features)``."""
        check_grouped_input(x, self.weight, self.in_features)
        host = not (isinstance(split_sizes, torch.Tensor) and split_sizes.device.type != "cpu")
        offs_G = offsets_from_splits(split_sizes, x.shape[0], x.device, num_groups=self.num_groups,
                                     validate=validate)
        return grouped_linear(x, offs_G, self.weight, self.bias, self.recipe, host or validate)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, recipe={self.recipe}")
