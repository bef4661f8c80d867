"""``GroupedLinear``: one linear layer per group over contiguous row groups.

Shape legend: ``T`` rows, ``K`` in features, ``N`` out features, ``G`` groups.
Row ``r`` of group ``g`` computes ``y[r] = x[r] @ weight[g].T + bias[g]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..offload.marks import mark_not_offload, start_offload
from ..tensor.row_groups import SplitSizes, group_ids, live_rows, offsets_from_splits
from ._grouped_gemm import group_row_sum, grouped_mm, grouped_mm_wgrad
from .checks import check_grouped_input, check_int

__all__ = ["GroupedLinear", "RECIPES", "check_recipe", "check_grouped_input"]

RECIPES = ("fp8", "mxfp8", "nvfp4")


BLOCK = {"fp8": 1, "mxfp8": 32, "nvfp4": 16}


def check_recipe(recipe: Optional[str], **features: int) -> Optional[str]:
    """Return ``recipe`` if it is ``None`` or one of :data:`RECIPES`, else raise.

    ``features``: name -> size of each dimension the recipe quantizes in blocks; each
    must be a multiple of the recipe's block (MXFP8 32, NVFP4 16), else ``ValueError``
    naming it (caught at construction, not mid-backward)."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected None or one of {RECIPES}")
    block = BLOCK.get(recipe, 1)
    for name, size in features.items():
        if size % block:
            raise ValueError(f"recipe {recipe!r} quantizes in blocks of {block}: {name} must be a "
                             f"multiple of {block}, got {size}")
    return recipe


def add_group_bias(y_TN: torch.Tensor, bias_GN: Optional[torch.Tensor], offs_G: torch.Tensor) -> torch.Tensor:
    """``y[r] += bias[group(r)]`` in place; rows past ``offs[-1]`` get no bias."""
    if bias_GN is None:
        return y_TN
    gid_T = group_ids(offs_G, y_TN.shape[0])            # G for rows past offs[-1]
    table_GN = torch.cat([bias_GN, bias_GN.new_zeros(1, bias_GN.shape[1])])
    return y_TN.add_(table_GN.index_select(0, gid_T))


class _GroupedLinearFn(torch.autograd.Function):
    """Saves ``x`` (the input, already final) and the small ``offs_G``; weights are read
    from the inputs, never copied."""

    @staticmethod
    def forward(ctx, x_TK, weight_GNK, bias_GN, offs_G, covered: bool):
        mark_not_offload(weight_GNK, bias_GN)
        start_offload(x_TK)
        y_TN = grouped_mm(x_TK, weight_GNK.transpose(1, 2), offs_G, zero_tail=False)
        y_TN = add_group_bias(y_TN, bias_GN, offs_G)
        if not covered:
            y_TN = torch.where(live_rows(offs_G[-1:], y_TN.shape[0]), y_TN, y_TN.new_zeros(()))
        ctx.save_for_backward(x_TK, weight_GNK, offs_G)
        ctx.has_bias = bias_GN is not None
        ctx.covered = covered
        return y_TN

    @staticmethod
    def backward(ctx, dy_TN):
        x_TK, weight_GNK, offs_G = ctx.saved_tensors
        dy_TN = dy_TN.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm(dy_TN, weight_GNK, offs_G, zero_tail=not ctx.covered)
        if ctx.needs_input_grad[1]:
            dw = grouped_mm_wgrad(dy_TN, x_TK, offs_G)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = group_row_sum(dy_TN, offs_G)
        return dx, dw, db, None, None


class GroupedLinear(nn.Module):
    """``G`` independent linear layers applied to contiguous row groups of one input.

    Args:
        num_groups: ``G`` (>= 1).
        in_features, out_features: ``K``, ``N``.
        bias: learn a ``(G, N)`` bias.
        recipe: ``None`` (compute in the parameter dtype: bf16/fp16/fp32) or one of
            ``"fp8"``, ``"mxfp8"``, ``"nvfp4"`` (quantized compute, see
            ``moe_offload.ops.quantized``).

    Parameters: ``weight`` ``(G, N, K)``, ``bias`` ``(G, N)`` or ``None``.  Initialised
    like ``nn.Linear`` per group.

    ``forward(x, split_sizes, *, validate=False)``: ``x`` is ``(T, K)`` with the rows of
    group ``g`` contiguous, ``split_sizes[g]`` of them.  ``split_sizes`` may be an int
    tensor on ``x``'s device (no host sync in forward or backward; checked only when
    ``validate=True``, which **syncs the host** once), or a list / CPU int tensor (always
    checked, for free).  Groups may be empty.  With unchecked device splits summing to
    less than ``T``, rows past the sum come out zero and get zero input grad.
    Saved for backward: ``x`` and the int32 offsets only.
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
        if self.recipe is not None:
            from .quantized import quantized_grouped_linear
            return quantized_grouped_linear(x, offs_G, self.weight, self.bias, self.recipe)
        return _GroupedLinearFn.apply(x, self.weight, self.bias, offs_G, host or validate)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, recipe={self.recipe}")
