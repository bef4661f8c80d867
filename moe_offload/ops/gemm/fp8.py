"""The FP8 backend: ``torch._scaled_grouped_mm`` with E4M3 operands on CUDA sm90+.

Activations and gradients use per-group current scaling (the group's ``scale_inv``
gathered to its rows on the device); weights one scale per expert.  All six GEMMs of a
linear's forward+backward run in FP8, the weight gradient included (2D x 2D form: the
columnwise layout = per-group transposed codes of ``dy`` and ``x``, groups padded with
zero columns to 16, static width ``T + 15G``, no sync).  Why FP8 wgrad: with bf16 at 756
and FP8 at 1037 TFLOP/s (ANCHORS.md), doing 4 of 6 GEMMs in FP8 costs
``4/1037 + 2/756 = 0.00650`` vs ``6/756 = 0.00794`` per unit -> at most 1.22x; all six
allow 1.37x.  Kernel facts probed on torch 2.11/H100 (``scripts/bench_fp8.py --probe``):
the 2D x 3D form accepts any group sizes (including 0); the 2D x 2D form needs every
group's token count to be a multiple of 16, which the columnwise layout provides.
Gradients are E4M3 as well: the kernel takes E4M3 only.  The kernel leaves rows past
``offs[-1]`` uninitialized, so every GEMM runs on offsets covering all rows: the tail
rows of a quantized operand are zero codes, so their outputs are exactly zero
(``Rows.cover_G``; with unchecked splits this is correct whatever ``tail`` asks).

Quantization is fused (:mod:`moe_offload.tensor.fp8_kernels`): per activation one amax
kernel and one cast kernel writing the rowwise and columnwise codes plus the GEMM's
scale vectors; per weight one amax and one cast.  In the MLP, one kernel writes ``h``'s
saved codes, ``act(h) * p`` and its amax, and the backward activation kernel reads
``h``'s codes directly and reduces the amaxes of ``out`` and ``d_h`` on the fly
(:func:`activation_forward` / :func:`activation_backward`).  All codes and scales are
bit-identical to the torch reference (``tests/tensor/test_fp8_kernels.py``).

**Weights are not kept by the graph.**  The forward writes the rowwise codes only; the
dgrad operand (the same codes transposed per expert) is re-quantized in backward from
the parameter with the per-expert ``amax`` the forward found (``G`` floats kept): the
forward's own weight kernel with its amax pass skipped, one read of the bf16 weight and
one write of the codes, the same bits the forward used to keep.  Keeping the transposed codes
instead cost ``G*N*K`` bytes per weight per layer of activation memory (about 200 MB per
layer of the bench's medium preset, 1.32x bf16's activation memory in all).

Measured before that change (``scripts/bench_fp8.py --profile``, H100 80GB HBM3, torch
2.11, T=16384, H=4096, F=2048, E=8, SwiGLU): fwd+bwd FP8 3.99 / 4.17 ms vs bf16 3.80 /
3.93 ms on two leases.  Why >= 1.3x is out of reach here: the six FP8 GEMMs alone take
2.65 ms, the two weights' quantization ~0.4 ms and the unavoidable activation passes
~0.68 ms; reaching 1.3x needs quantization fused into the GEMM epilogues, which
``torch._scaled_grouped_mm`` does not offer.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ...offload.marks import mark_not_offload
from ...tensor.formats import amax_to_scale
from ...tensor.group_quantize import fp8_weight_transposed, group_quantize
from ...tensor.grouped_storage import MAX_FUSED_GROUPS, GroupedTensorStorage
from ...tensor.quantizers import Float8CurrentScalingQuantizer
from ...tensor.row_groups import group_ids
from ..activations import is_gated
from ..grouped_gemm import zero_empty_groups
from .base import Operand, Weight
from .emulated import QuantizedBackend, weight_offsets

__all__ = ["Fp8Backend", "available", "applies"]

_ALIGN = 16


def available(device: torch.device) -> bool:
    """True where ``torch._scaled_grouped_mm`` runs FP8 (CUDA sm90+)."""
    return device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm") and _sm90(device.index)


@functools.lru_cache(maxsize=None)
def _sm90(index: Optional[int]) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def applies(x: torch.Tensor, K: int, N: int) -> bool:
    """The FP8 kernel runs this GEMM: bf16 input on sm90+, ``K`` and ``N`` multiples of 16."""
    return (x.dtype == torch.bfloat16 and available(x.device)
            and all(d % _ALIGN == 0 and d > 0 for d in (K, N)))


def _fused(t: torch.Tensor, num_groups: int) -> bool:
    return t.is_cuda and t.dtype == torch.bfloat16 and num_groups <= MAX_FUSED_GROUPS


class Fp8Backend(QuantizedBackend):
    """FP8 on ``torch._scaled_grouped_mm`` (see module docstring)."""

    def __init__(self):
        super().__init__("fp8")

    # ------------------------------------------------------------------ operands
    def quantize_act(self, x_TK, offs_G, rowwise, columnwise, amax_bits=None):
        """Fused kernels on CUDA (3 launches, also writing the GEMM scale vectors);
        elsewhere ``group_quantize`` and torch gathers (same values).  ``amax_bits``:
        group amaxes already reduced by a fused producer."""
        if not (rowwise or columnwise):
            return None
        G = offs_G.shape[0]
        if _fused(x_TK, G):
            from ...tensor.fp8_kernels import fp8_group_quantize_fused
            T, K = x_TK.shape
            x_TK = x_TK.contiguous()
            parts = fp8_group_quantize_fused(x_TK, offs_G, torch.float8_e4m3fn, False, rowwise,
                                             columnwise, row_scale=rowwise, k_scale=columnwise,
                                             amax_bits=amax_bits)
            rs, ks = parts.pop("row_scale_T", None), parts.pop("k_scale_GK", None)
            q = GroupedTensorStorage("fp8", (T, K), x_TK.dtype, G, 16, offsets=offs_G, **parts)
            return Operand(q, rs, ks)
        q = group_quantize(x_TK, Float8CurrentScalingQuantizer(rowwise=rowwise, columnwise=columnwise),
                           offsets=offs_G)
        rs = ks = None
        if rowwise:
            gid_T = group_ids(offs_G, x_TK.shape[0])
            rs = torch.cat([q.rowwise_scale_inv, q.rowwise_scale_inv.new_ones(1)])[gid_T].contiguous()
        if columnwise:
            ks = q.columnwise_scale_inv.repeat_interleave(x_TK.shape[1])
        return Operand(q, rs, ks)

    def keep_for_wgrad(self, xa: Operand) -> Operand:
        mark_not_offload(xa.k_scale_GK)      # a (G*K,) scale vector: metadata
        return super().keep_for_wgrad(xa)

    def quantize_weight(self, w_GNK, need_dgrad):
        """Rowwise codes and the per-output-row ``scale_inv``; ``meta_G``: the per-expert
        amax, from which :meth:`weight_for_dgrad` rebuilds the transposed codes."""
        G, N, K = w_GNK.shape
        w = w_GNK.detach()
        if _fused(w, G):
            from ...tensor.fp8_kernels import fp8_weight_quantize_fused
            o = fp8_weight_quantize_fused(w.contiguous(), torch.float8_e4m3fn, False, False)
            wq = Weight(w_GNK, codes_GNK=o["rowwise_data"].view(G, N, K),
                        scale_GN=o["n_scale_GN"].view(G, N), meta_G=o["amax"])
        else:
            q = group_quantize(w.reshape(G * N, K), Float8CurrentScalingQuantizer(),
                               offsets=weight_offsets(G, N, w.device))
            wq = Weight(w_GNK, codes_GNK=q.rowwise_data.view(G, N, K),
                        scale_GN=q.rowwise_scale_inv.unsqueeze(1).expand(G, N).contiguous(),
                        meta_G=q.amax)
        mark_not_offload(wq.codes_GNK, wq.scale_GN, wq.meta_G)
        return wq

    def weight_for_dgrad(self, w_GNK, meta_G):
        """The per-expert transposed codes ``(G, K, N)`` (the column-major dgrad operand)
        with the forward's scale: the same bits the fused forward kernel wrote."""
        G, N, K = w_GNK.shape
        w = w_GNK.detach()
        if _fused(w, G):    # the forward's kernel, its amax pass skipped: one read of w
            from ...tensor.fp8_kernels import fp8_weight_quantize_fused
            o = fp8_weight_quantize_fused(w.contiguous(), torch.float8_e4m3fn, False, True,
                                          rowwise=False, amax=meta_G)
            return Weight(w_GNK, codes_t_GKN=o["w_t_GKN"], scale_GK=o["k_scale_GK"].view(G, K),
                          meta_G=meta_G)
        scale_G = amax_to_scale(meta_G)
        codes_t = fp8_weight_transposed(w, scale_G)
        scale_GK = scale_G.reciprocal().unsqueeze(1).expand(G, K).contiguous()
        return Weight(w_GNK, codes_t_GKN=codes_t, scale_GK=scale_GK, meta_G=meta_G)

    # ------------------------------------------------------------------ GEMMs
    def forward(self, xa, wq, rows, tail, out_dtype):
        x_TK, _ = xa.data.rowwise_2d()
        y = torch._scaled_grouped_mm(x_TK, wq.codes_GNK.transpose(1, 2), xa.row_scale_T, wq.scale_GN,
                                     offs=rows.cover_G, out_dtype=torch.bfloat16)
        return y.to(out_dtype)

    def dgrad(self, dya, wq, rows, tail, out_dtype):
        G, K, _ = wq.codes_t_GKN.shape
        dy_TN, _ = dya.data.rowwise_2d()
        dx = torch._scaled_grouped_mm(dy_TN, wq.codes_t_GKN.transpose(1, 2), dya.row_scale_T,
                                      wq.scale_GK.view(G, K), offs=rows.cover_G, out_dtype=torch.bfloat16)
        return dx.to(out_dtype)

    def wgrad(self, dya, xa, rows, out_dtype):
        dy_NTc, _ = dya.data.columnwise_2d()
        x_KTc, _ = xa.data.columnwise_2d()
        dw = torch._scaled_grouped_mm(dy_NTc, x_KTc.t(), dya.k_scale_GK, xa.k_scale_GK,
                                      offs=dya.data.columnwise_offsets, out_dtype=torch.bfloat16)
        return zero_empty_groups(dw, rows.offs_G).to(out_dtype)

    # ------------------------------------------------------------------ MLP activation
    def activation_forward(self, h_TX, probs_T, activation, rows, keep_h, fc1):
        """One kernel: ``h``'s saved FP8 codes, ``act(h) * p`` and its group amax, when
        fc1 runs in FP8 too; else the generic path."""
        G = rows.offs_G.shape[0]
        if not (isinstance(fc1, Fp8Backend) and _fused(h_TX, G)):
            return super().activation_forward(h_TX, probs_T, activation, rows, keep_h, fc1)
        from .._triton_act_fp8 import act_forward_fp8
        T, X = h_TX.shape
        h_TX = h_TX.contiguous()
        a_TF, amax_a, h_parts = act_forward_fp8(h_TX, rows.offs_G, probs_T, activation,
                                                is_gated(activation), keep_h)
        stored = GroupedTensorStorage("fp8", (T, X), h_TX.dtype, G, 16, offsets=rows.offs_G,
                                      **h_parts) if keep_h else None
        return self.quantize_act(a_TF, rows.offs_G, True, False, amax_bits=amax_a), stored

    def activation_backward(self, stored_h, probs_T, d_a_TF, activation, rows, fc1, dtype):
        """From ``h``'s FP8 codes (no dequantized copy), amaxes of ``out`` and ``d_h`` on
        the fly, when the forward took the fused path."""
        G = rows.offs_G.shape[0]
        if not (isinstance(fc1, Fp8Backend) and _fused(d_a_TF, G)):
            return super().activation_backward(stored_h, probs_T, d_a_TF, activation, rows, fc1, dtype)
        from .._triton_act_fp8 import act_backward_fp8
        return act_backward_fp8(stored_h.rowwise_data, stored_h.rowwise_scale_inv, rows.offs_G,
                                stored_h.shape, dtype, probs_T, d_a_TF, activation, is_gated(activation))
