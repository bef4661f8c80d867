"""The emulated backend: quantize, dequantize to fp32, fp32 grouped GEMM.

Runs every recipe everywhere (MXFP8 and NVFP4 always; FP8 where the FP8 kernel is not
available: CPU, non-bf16 inputs, feature dims that are not multiples of 16).  The
numerics are those of the format exactly (up to fp32 accumulation): each GEMM input is
quantized with :func:`moe_offload.tensor.group_quantize` (activations per row group,
weights per expert), dequantized to fp32 and multiplied by
:func:`..grouped_gemm.grouped_mm`, which zeroes the tail rows itself.

What backward keeps of a GEMM input: its columnwise usage only (the wgrad operand);
weights are re-quantized in backward (columnwise: blocks along ``N``, the dgrad
operand) from the parameter, giving the same codes the forward would have made.
"""
from __future__ import annotations

import torch

from ...tensor.group_quantize import group_quantize
from ...tensor.quantizers import Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer
from ..grouped_gemm import grouped_mm, grouped_mm_wgrad
from .base import GemmBackend, Operand, Weight

__all__ = ["QuantizedBackend", "EmulatedBackend", "quantizer", "weight_offsets"]

_QUANTIZERS = {"fp8": Float8CurrentScalingQuantizer, "mxfp8": MXFP8Quantizer, "nvfp4": NVFP4Quantizer}


def quantizer(recipe: str, rowwise: bool, columnwise: bool):
    """The quantizer configuration of ``recipe`` for the usages asked for."""
    return _QUANTIZERS[recipe](rowwise=rowwise, columnwise=columnwise)


def weight_offsets(G: int, N: int, device) -> torch.Tensor:
    """Offsets that make each expert's ``N`` rows one group (one scale per expert)."""
    return torch.arange(N, (G + 1) * N, N, device=device, dtype=torch.int32)


class QuantizedBackend(GemmBackend):
    """What every quantized backend shares: the recipe, how the MLP stores ``h``
    (rowwise codes of the recipe's format), and keeping only the wgrad usage of ``x``."""

    quantized = True

    def __init__(self, recipe: str):
        self.recipe = recipe
        self.name = recipe

    def keep_for_wgrad(self, xa: Operand) -> Operand:
        xa.data.update_usage(rowwise=False)
        return Operand(xa.data, None, xa.k_scale_GK)

    def store(self, h_TX, offs_G):
        return group_quantize(h_TX, quantizer(self.recipe, True, False), offsets=offs_G)

    def load(self, stored, dtype):
        return stored.dequantize(dtype)


class EmulatedBackend(QuantizedBackend):
    """Quantize, dequantize, fp32 GEMM (see module docstring)."""

    def quantize_act(self, x_TK, offs_G, rowwise, columnwise, amax_bits=None):
        if not (rowwise or columnwise):
            return None
        return Operand(group_quantize(x_TK, quantizer(self.recipe, rowwise, columnwise), offsets=offs_G))

    def _weight(self, w_GNK, rowwise: bool) -> Weight:
        G, N, K = w_GNK.shape
        w = w_GNK.detach()
        q = group_quantize(w.reshape(G * N, K), quantizer(self.recipe, rowwise, not rowwise),
                           offsets=weight_offsets(G, N, w.device))
        return Weight(w_GNK, q=q)

    def quantize_weight(self, w_GNK, need_dgrad):
        return self._weight(w_GNK, rowwise=True)

    def weight_for_dgrad(self, w_GNK, meta_G):
        return self._weight(w_GNK, rowwise=False)

    def forward(self, xa, wq, rows, tail, out_dtype):
        G, N, K = wq.w_GNK.shape
        x = xa.data.dequantize(torch.float32, "rowwise")
        w = wq.q.dequantize(torch.float32, "rowwise").view(G, N, K)
        return grouped_mm(x, w.transpose(1, 2), rows.offs_G).to(out_dtype)

    def dgrad(self, dya, wq, rows, tail, out_dtype):
        G, N, K = wq.w_GNK.shape
        dy = dya.data.dequantize(torch.float32, "rowwise")
        w = wq.q.dequantize(torch.float32, "columnwise").view(G, N, K)
        return grouped_mm(dy, w, rows.offs_G).to(out_dtype)

    def wgrad(self, dya, xa, rows, out_dtype):
        dy = dya.data.dequantize(torch.float32, "columnwise")
        x = xa.data.dequantize(torch.float32, "columnwise")
        return grouped_mm_wgrad(dy, x, rows.offs_G).to(out_dtype)
