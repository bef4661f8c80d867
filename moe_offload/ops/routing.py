"""Token routing helpers for MoE layers: sort token copies by expert, combine them back.

Shape legend: ``T`` tokens, ``H`` hidden, ``E`` experts, ``k`` top-k, ``S = T*k`` token
copies ("slots"; slot ``s`` is copy ``s % k`` of token ``s // k``).

Everything stays on the device (no ``.item()``/``.tolist()``: no host sync), and both
directions are deterministic: gathers and scatters use unique indices only (no
``index_add_``/``scatter_add_`` float atomics), and the ``k`` copies of a token are
summed with one ``sum`` over a ``(T, k, H)`` view, in forward and in backward.

Typical use with a grouped expert MLP::

    order_S, offs_E = sort_by_expert(top_k_index_Tk, num_experts)
    xs_SH = permute(x_TH, order_S, top_k)                   # copies sorted by expert
    ps_S = permute_probs(top_k_weights_Tk, order_S)         # their router weights
    ys_SH = grouped_mlp(xs_SH, offs_E, ..., ps_S, ...)       # experts (probs applied)
    y_TH = unpermute(ys_SH, order_S, top_k)                  # sum of the k copies

or, with experts that do not apply the router weights themselves,
``unpermute(ys_SH, order_S, top_k, probs_Tk=top_k_weights_Tk)`` (weighted combine).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["sort_by_expert", "offsets_to_split_sizes", "permute", "permute_probs",
           "unpermute"]


def sort_by_expert(expert_ids_Tk: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Order of the ``S = T*k`` token copies sorted by expert, and the group end offsets.

    Args:
        expert_ids_Tk: integer expert index of each copy, any shape (flattened in
            row-major order, so ``(T, k)`` gives slot ``t*k + j``).
        num_experts: ``E``.

    Returns ``(order_S, offs_E)``: ``order_S`` (int64) is the *stable* argsort of the
    flattened ids (copies of one expert keep their token order, so the result is
    deterministic), and ``offs_E`` (int32, on the device) holds the cumulative *end*
    offset of each expert's rows in the sorted order (``searchsorted(..., right=True)``;
    the format the grouped layers take).  Ids ``>= E`` sort last and fall past
    ``offs_E[-1]``; negative ids are not allowed.  No host sync.
    """
    if not isinstance(expert_ids_Tk, torch.Tensor) or expert_ids_Tk.dtype.is_floating_point \
            or expert_ids_Tk.dtype.is_complex or expert_ids_Tk.dtype == torch.bool:
        raise TypeError("sort_by_expert: expert_ids_Tk must be an integer tensor, got "
                        f"{getattr(expert_ids_Tk, 'dtype', type(expert_ids_Tk).__name__)}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"sort_by_expert: num_experts must be an int >= 1, got {num_experts!r}")
    e_S = expert_ids_Tk.reshape(-1)
    order_S = torch.argsort(e_S, stable=True)
    sorted_e_S = e_S.index_select(0, order_S)
    offs_E = torch.searchsorted(sorted_e_S, torch.arange(num_experts, device=e_S.device,
                                                         dtype=e_S.dtype), right=True)
    return order_S, offs_E.to(torch.int32)


def offsets_to_split_sizes(offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert row counts from end offsets, on the same device (no host sync)."""
    if not isinstance(offs_E, torch.Tensor) or offs_E.dim() != 1:
        raise ValueError("offsets_to_split_sizes: offs_E must be a 1-D tensor")
    return torch.diff(offs_E, prepend=offs_E.new_zeros(1))


def _check_order(name: str, rows: torch.Tensor, order_S: torch.Tensor, top_k: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"{name}: top_k must be an int >= 1, got {top_k!r}")
    if not isinstance(order_S, torch.Tensor) or order_S.dim() != 1 \
            or order_S.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: order_S must be a 1-D int64/int32 tensor from sort_by_expert")
    if order_S.device != rows.device:
        raise TypeError(f"{name}: order_S is on {order_S.device}, the rows on {rows.device}")


def _slots_to_tokens(y_SH: torch.Tensor, order_S: torch.Tensor, k: int) -> torch.Tensor:
    """Put sorted rows back in slot order and sum the ``k`` copies of each token."""
    S, H = y_SH.shape
    slots_SH = torch.empty_like(y_SH).index_copy_(0, order_S, y_SH)
    return slots_SH.view(S // k, k, H).sum(1)


class _Permute(torch.autograd.Function):
    """``x_TH[order // k]``; backward sums the ``k`` copies deterministically."""

    @staticmethod
    def forward(ctx, x_TH, order_S, k: int):
        ctx.save_for_backward(order_S)
        ctx.k = k
        return x_TH.index_select(0, order_S // k)

    @staticmethod
    def backward(ctx, d_xs_SH):
        (order_S,) = ctx.saved_tensors
        return _slots_to_tokens(d_xs_SH.contiguous(), order_S, ctx.k), None, None


class _Unpermute(torch.autograd.Function):
    """Sum of the ``k`` sorted copies of each token -> ``(T, H)``."""

    @staticmethod
    def forward(ctx, y_SH, order_S, k: int):
        ctx.save_for_backward(order_S)
        ctx.k = k
        return _slots_to_tokens(y_SH.contiguous(), order_S, k)

    @staticmethod
    def backward(ctx, d_out_TH):
        (order_S,) = ctx.saved_tensors
        return d_out_TH.index_select(0, order_S // ctx.k), None, None


class _ToSlots(torch.autograd.Function):
    """Sorted rows back in slot order ``(S, H)`` (a pure reorder); backward gathers."""

    @staticmethod
    def forward(ctx, y_SH, order_S):
        ctx.save_for_backward(order_S)
        return torch.empty_like(y_SH).index_copy_(0, order_S, y_SH)

    @staticmethod
    def backward(ctx, d_slots_SH):
        (order_S,) = ctx.saved_tensors
        return d_slots_SH.index_select(0, order_S), None


def permute(x_TH: torch.Tensor, order_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``S`` token copies of ``x_TH`` ``(T, H)`` in expert order -> ``(S, H)``.

    Row ``i`` is token ``order_S[i] // top_k``.  Differentiable w.r.t. ``x_TH``; the
    backward puts each copy's gradient back in slot order (unique-index
    ``index_copy_``) and sums the ``top_k`` copies of a token, deterministically.
    """
    _check_order("permute", x_TH, order_S, top_k)
    if x_TH.dim() != 2 or x_TH.shape[0] * top_k != order_S.shape[0]:
        raise ValueError(f"permute: x_TH must be (T, H) with T*top_k == len(order_S) = "
                         f"{order_S.shape[0]}, got {tuple(x_TH.shape)} and top_k={top_k}")
    return _Permute.apply(x_TH, order_S, top_k)


def permute_probs(probs_Tk: torch.Tensor, order_S: torch.Tensor) -> torch.Tensor:
    """Router weights ``(T, k)`` of the copies in expert order -> ``(S,)`` (differentiable)."""
    if not isinstance(probs_Tk, torch.Tensor) or probs_Tk.numel() != order_S.numel():
        raise ValueError("permute_probs: probs_Tk must have one weight per token copy "
                         f"({order_S.numel()}), got {getattr(probs_Tk, 'shape', None)}")
    return probs_Tk.reshape(-1).index_select(0, order_S)


def unpermute(y_SH: torch.Tensor, order_S: torch.Tensor, top_k: int,
              probs_Tk: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Combine the expert outputs of each token: ``(S, H)`` in expert order -> ``(T, H)``.

    Without ``probs_Tk``: ``out[t] = sum_j y[slot t*k + j]`` (the experts already applied
    the router weights).  With ``probs_Tk`` ``(T, k)``: the weighted combine
    ``out[t] = sum_j probs[t, j] * y[slot t*k + j]``, computed in ``y``'s dtype like
    ``(y_TkH * probs[..., None]).sum(1)``; differentiable w.r.t. ``probs_Tk`` too.

    Deterministic in forward and backward (unique-index ``index_copy_`` and gathers,
    one ``sum`` over ``k``); no host sync.
    """
    _check_order("unpermute", y_SH, order_S, top_k)
    if y_SH.dim() != 2 or y_SH.shape[0] != order_S.shape[0] or order_S.shape[0] % top_k:
        raise ValueError(f"unpermute: y_SH must be (S, H) with S == len(order_S) = "
                         f"{order_S.shape[0]} (a multiple of top_k={top_k}), got {tuple(y_SH.shape)}")
    if probs_Tk is None:
        return _Unpermute.apply(y_SH, order_S, top_k)
    S, H = y_SH.shape
    if probs_Tk.numel() != S:
        raise ValueError(f"unpermute: probs_Tk must hold {S} weights (T, top_k), got "
                         f"shape {tuple(probs_Tk.shape)}")
    slots_TkH = _ToSlots.apply(y_SH.contiguous(), order_S).view(S // top_k, top_k, H)
    return (slots_TkH * probs_Tk.reshape(S // top_k, top_k, 1).to(y_SH.dtype)).sum(1)
