"""The identity backend: GEMMs in the parameters' dtype (bf16/fp16/fp32/fp64).

Operands are the tensors themselves; the GEMMs are :func:`..grouped_gemm.grouped_mm`
(``torch._grouped_mm`` where it has a sync-free kernel, our fallbacks elsewhere) and
:func:`..grouped_gemm.grouped_mm_wgrad`.  What backward keeps: ``x`` and ``h``
themselves, and the weights by reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..grouped_gemm import grouped_mm, grouped_mm_wgrad
from .base import GemmBackend, Operand, Rows, Weight

__all__ = ["Bf16Backend", "BF16"]


class Bf16Backend(GemmBackend):
    """No quantization (see module docstring)."""

    name = "bf16"
    quantized = False

    def quantize_act(self, x_TK, offs_G, rowwise, columnwise, amax_bits=None) -> Optional[Operand]:
        return Operand(x_TK) if (rowwise or columnwise) else None

    def quantize_weight(self, w_GNK, need_dgrad) -> Weight:
        return Weight(w_GNK)

    def weight_for_dgrad(self, w_GNK, meta_G) -> Weight:
        return Weight(w_GNK)

    @staticmethod
    def _mm(a_TK, b_GKN, rows: Rows, tail: str) -> torch.Tensor:
        if tail == "zero_input":     # 0 @ W = 0 on the covering offsets: no masking pass
            return grouped_mm(a_TK, b_GKN, rows.cover_G, zero_tail=False)
        return grouped_mm(a_TK, b_GKN, rows.offs_G, zero_tail=tail == "zero" and not rows.covered)

    def forward(self, xa, wq, rows, tail, out_dtype):
        return self._mm(xa.data, wq.w_GNK.transpose(1, 2), rows, tail)

    def dgrad(self, dya, wq, rows, tail, out_dtype):
        return self._mm(dya.data, wq.w_GNK, rows, tail)

    def wgrad(self, dya, xa, rows, out_dtype):
        return grouped_mm_wgrad(dya.data, xa.data, rows.offs_G)

    def store(self, h_TX, offs_G):
        return h_TX

    def load(self, stored, dtype):
        return stored


BF16 = Bf16Backend()
