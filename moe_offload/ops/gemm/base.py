"""The GEMM-backend protocol: precision is an operand of the grouped layers, not a layer.

Shape legend: ``T`` rows, ``K`` in, ``N`` out features, ``G`` groups; ``offs_G`` int32
end offsets of the row groups (see :mod:`moe_offload.tensor.row_groups`).

A grouped linear layer runs three GEMMs per group ``g`` (rows ``r`` of ``g``):

- forward ``y[r] = x[r] @ W[g].T`` -> :meth:`GemmBackend.forward`;
- dgrad ``dx[r] = dy[r] @ W[g]`` -> :meth:`GemmBackend.dgrad`;
- wgrad ``dW[g] = dy[rows of g].T @ x[rows of g]`` -> :meth:`GemmBackend.wgrad`.

A backend decides how the operands are held (:meth:`quantize_act`,
:meth:`quantize_weight`) and runs the three GEMMs on them.  The layers
(:mod:`..grouped_linear`, :mod:`..grouped_mlp`) are written once against this protocol:
one autograd function per layer, whatever the recipe.

Tail rows (rows at or past ``offs[-1]``, possible with unchecked device splits): each
GEMM producing ``(T, N)`` rows takes ``tail``:

- ``"any"``: the caller ignores or masks the tail rows of the output;
- ``"zero"``: the output's tail rows must be zeros;
- ``"zero_input"``: the input's tail rows are zeros, and so must the output's be (a
  backend may then run on :func:`~moe_offload.tensor.row_groups.cover_all_rows`
  offsets: ``0 @ W = 0`` without a masking pass).

What backward keeps is named (:class:`Operand` fields, and the layers' own ``Saved*``
dataclasses), never a positional tuple.  Weights are never copied into the graph: the
layers keep the parameter itself (by reference, as autograd does for any op) plus a
backend's few bytes of per-expert metadata (:attr:`Weight.meta_G`), and
:meth:`GemmBackend.weight_for_dgrad` rebuilds the dgrad operand in backward.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Optional

import torch

from ...offload.saving import prepare_for_saving, restore_from_saved
from ...tensor.row_groups import cover_all_rows, live_rows
from ..activations import act_backward, act_forward

__all__ = ["GemmBackend", "Operand", "Weight", "TAILS", "save_record", "load_record", "Rows"]

TAILS = ("any", "zero", "zero_input")


@dataclass
class Rows:
    """The row grouping of one layer call: ``offs_G`` and, precomputed once, the
    offsets that cover every row (``cover_G``; ``offs_G`` itself when ``covered``) and
    the live-row bound (``rows_end``: ``offs_G[-1:]``, or ``None`` when ``covered``)."""
    offs_G: torch.Tensor
    num_rows: int
    covered: bool

    @property
    def cover_G(self) -> torch.Tensor:
        return self.offs_G if self.covered else cover_all_rows(self.offs_G, self.num_rows)

    @property
    def rows_end(self) -> Optional[torch.Tensor]:
        return None if self.covered else self.offs_G[-1:]

    def mask_tail(self, y_TN: torch.Tensor) -> torch.Tensor:
        """``y`` with tail rows set to zero (identity when covered)."""
        if self.covered:
            return y_TN
        return torch.where(live_rows(self.offs_G[-1:], y_TN.shape[0]), y_TN, y_TN.new_zeros(()))


@dataclass
class Operand:
    """An activation-like GEMM operand (``x``, ``dy``, ``act(h)``) as a backend holds it.

    ``data``: the plain tensor (bf16 backend) or a ``GroupedTensorStorage`` (quantized;
    only the usages asked for).  ``row_scale_T`` / ``k_scale_GK``: the FP8 kernel's
    scale vectors (``scale_inv`` per row; per (group, feature), flat), else ``None``.

    Saved through ``prepare_for_saving`` like a storage object: each component passes
    the offload hooks on its own."""
    data: Any
    row_scale_T: Optional[torch.Tensor] = None
    k_scale_GK: Optional[torch.Tensor] = None

    def prepare_for_saving(self):
        tensors, state = prepare_for_saving(self.data, self.row_scale_T, self.k_scale_GK)
        shell = Operand(None)
        shell._state = state
        return tensors, shell

    def restore_from_saved(self, tensors: List) -> List:
        n = sum(count for _, _, count in self._state)
        self.data, self.row_scale_T, self.k_scale_GK = restore_from_saved(self._state, tensors[:n])
        return list(tensors[n:])


@dataclass
class Weight:
    """A ``(G, N, K)`` weight as a backend's GEMMs want it.

    ``w_GNK``: the parameter (the bf16 backend computes on it directly); ``q``: the
    emulated backend's quantized storage; ``codes_GNK``/``scale_GN`` (forward) and
    ``codes_t_GKN``/``scale_GK`` (dgrad): the FP8 kernel's operands; ``meta_G``: the
    per-expert metadata backward needs to re-quantize the weight the same way (FP8:
    ``scale_inv``), kept instead of the codes.  Everything but ``w_GNK`` and
    ``meta_G`` is a workspace: it dies with the forward (or the backward) that made it."""
    w_GNK: torch.Tensor
    q: Any = None
    codes_GNK: Optional[torch.Tensor] = None
    scale_GN: Optional[torch.Tensor] = None
    codes_t_GKN: Optional[torch.Tensor] = None
    scale_GK: Optional[torch.Tensor] = None
    meta_G: Optional[torch.Tensor] = None


class GemmBackend:
    """Protocol of one grouped GEMM's precision (see the module docstring).

    Subclasses: :class:`~.bf16.Bf16Backend` (identity), :class:`~.fp8.Fp8Backend`
    (``torch._scaled_grouped_mm``), :class:`~.emulated.EmulatedBackend`.
    """

    name: str = "?"
    #: True when operands are quantized (``x`` is saved quantized, columnwise only).
    quantized: bool = False

    def quantize_act(self, x_TK: torch.Tensor, offs_G: torch.Tensor, rowwise: bool,
                     columnwise: bool, amax_bits: Optional[torch.Tensor] = None) -> Optional[Operand]:
        """Hold ``x`` for the usages asked for: ``rowwise`` (forward / dgrad input),
        ``columnwise`` (wgrad input).  ``None`` when neither is asked."""
        raise NotImplementedError

    def quantize_weight(self, w_GNK: torch.Tensor, need_dgrad: bool) -> Weight:
        """The forward operand of a ``(G, N, K)`` weight (one scale per expert)."""
        raise NotImplementedError

    def weight_for_dgrad(self, w_GNK: torch.Tensor, meta_G: Optional[torch.Tensor]) -> Weight:
        """Rebuild the dgrad operand in backward from the parameter and ``meta_G``
        (bit-identical to what the forward would have made)."""
        raise NotImplementedError

    def forward(self, xa: Operand, wq: Weight, rows: Rows, tail: str, out_dtype) -> torch.Tensor:
        """``y[rows of g] = x @ W[g].T`` -> ``(T, N)``."""
        raise NotImplementedError

    def dgrad(self, dya: Operand, wq: Weight, rows: Rows, tail: str, out_dtype) -> torch.Tensor:
        """``dx[rows of g] = dy @ W[g]`` -> ``(T, K)``."""
        raise NotImplementedError

    def wgrad(self, dya: Operand, xa: Operand, rows: Rows, out_dtype) -> torch.Tensor:
        """``dW[g] = dy[rows of g].T @ x[rows of g]`` -> ``(G, N, K)``; empty groups zero."""
        raise NotImplementedError

    def keep_for_wgrad(self, xa: Operand) -> Operand:
        """What backward keeps of the forward input for the wgrad (drops other usages)."""
        return xa

    def store(self, h_TX: torch.Tensor, offs_G: torch.Tensor) -> Any:
        """How the MLP keeps its fc1 output ``h`` for backward (a tensor or a storage)."""
        raise NotImplementedError

    def load(self, stored: Any, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`store`: ``h`` in ``dtype``."""
        raise NotImplementedError

    # The MLP's activation sits between fc1 and fc2; the backend of fc2 (which consumes
    # ``act(h) * p``) runs it, so a backend may fuse it with its quantization.
    def activation_forward(self, h_TX, probs_T, activation: str, rows: Rows, keep_h: bool,
                           fc1: "GemmBackend"):
        """``(fc2 input operand, h as fc1's backend stores it or None)``."""
        stored = fc1.store(h_TX, rows.offs_G) if keep_h else None
        a_TF = act_forward(h_TX, probs_T, activation, rows.rows_end)
        return self.quantize_act(a_TF, rows.offs_G, True, False), stored

    def activation_backward(self, stored_h, probs_T, d_a_TF, activation: str, rows: Rows,
                            fc1: "GemmBackend", dtype):
        """``(d_h, d_probs, act(h) * p, amax bits of that or None, of d_h or None)``."""
        h_TX = fc1.load(stored_h, dtype)
        d_h, d_probs, a_TF = act_backward(h_TX, probs_T, d_a_TF, activation, rows.rows_end)
        return d_h, d_probs, a_TF, None, None


def save_record(ctx, record) -> None:
    """Save a dataclass of tensors / storage objects / ``None`` on ``ctx`` (each tensor
    through ``save_for_backward``, so the saved-tensor hooks see every component)."""
    objs = [getattr(record, f.name) for f in fields(record)]
    tensors, ctx.saved_state = prepare_for_saving(*objs)
    ctx.saved_type = type(record)
    ctx.save_for_backward(*tensors)


def load_record(ctx):
    """Inverse of :func:`save_record`: a fresh dataclass that dies with this backward."""
    return ctx.saved_type(*restore_from_saved(ctx.saved_state, ctx.saved_tensors))
