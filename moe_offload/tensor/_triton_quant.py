"""Triton kernel for FP8 current-scaling codes (CUDA only; imported lazily).

One program handles ``BLOCK_K`` columns of one row: it loads the row's group id, gathers
that group's fp32 scale (0 for rows of no group), computes ``fp32(x) * scale``, clamps
to +-fp8_max (``where`` keeps NaN, unlike ``minimum``), and casts with
round-to-nearest-even.  This is exactly :func:`group_quantize.fp8_rows_torch`, in one
launch instead of five.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .formats import fp8_max

__all__ = ["fp8_rows_triton"]


@triton.jit
def _fp8_rows_kernel(x_ptr, gid_ptr, scale_ptr, out_ptr, K, G,
                     FP8_MAX: tl.constexpr, E5M2: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    g = tl.load(gid_ptr + row)
    valid = g < G
    s = tl.load(scale_ptr + tl.where(valid, g, 0))
    s = tl.where(valid, s, 0.0)
    x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(valid, x, 0.0)
    y = x * s
    y = tl.where(y > FP8_MAX, FP8_MAX, y)
    y = tl.where(y < -FP8_MAX, -FP8_MAX, y)
    if E5M2:
        q = y.to(tl.float8e5, fp_downcast_rounding="rtne")
    else:
        q = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    tl.store(out_ptr + row * K + cols, q, mask=mask)


def fp8_rows_triton(x_TK: torch.Tensor, gid_T: torch.Tensor, scale_G: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """FP8 codes ``(T, K)`` of a contiguous ``x``; see module docstring."""
    T, K = x_TK.shape
    out = torch.empty(T, K, dtype=dtype, device=x_TK.device)
    BLOCK_K = min(1024, triton.next_power_of_2(K))
    grid = (T, triton.cdiv(K, BLOCK_K))
    _fp8_rows_kernel[grid](x_TK, gid_T, scale_G.float().contiguous(), out, K, scale_G.shape[0],
                           FP8_MAX=fp8_max(dtype), E5M2=dtype == torch.float8_e5m2, BLOCK_K=BLOCK_K)
    return out


@triton.jit
def _fp8_cols_kernel(x_ptr, src_ptr, cscale_ptr, out_ptr, K, Tc, x_bstride, s_bstride, out_bstride,
                     FP8_MAX: tl.constexpr, E5M2: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    # Tile of BLOCK_C padded columns x BLOCK_K features: gather the source rows (coalesced
    # along K), quantize, transpose in registers, store coalesced along the columns.
    # program_id(2) is a batch index (weights: one batch per expert; activations: 1).
    b = tl.program_id(2).to(tl.int64)
    x_ptr += b * x_bstride
    cscale_ptr += b * s_bstride
    out_ptr += b * out_bstride
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cm = c < Tc
    km = k < K
    src = tl.load(src_ptr + c, mask=cm, other=-1)
    s = tl.load(cscale_ptr + c, mask=cm, other=0.0)
    valid = src >= 0
    row = tl.where(valid, src, 0).to(tl.int64)
    x = tl.load(x_ptr + row[:, None] * K + k[None, :], mask=valid[:, None] & km[None, :],
                other=0.0).to(tl.float32)
    y = x * s[:, None]
    y = tl.where(y > FP8_MAX, FP8_MAX, y)
    y = tl.where(y < -FP8_MAX, -FP8_MAX, y)
    yt = tl.trans(y)
    if E5M2:
        q = yt.to(tl.float8e5, fp_downcast_rounding="rtne")
    else:
        q = yt.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    tl.store(out_ptr + k[:, None].to(tl.int64) * Tc + c[None, :], q, mask=km[:, None] & cm[None, :])


def fp8_cols_triton(x_TK: torch.Tensor, src_Tc: torch.Tensor, cscale_Tc: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """FP8 codes in the padded transposed layout ``(K, Tc)``: column ``c`` holds
    ``saturate(x[src[c]] * cscale[c])`` (``src[c] < 0``: a zero padding column)."""
    T, K = x_TK.shape
    Tc = src_Tc.shape[0]
    out = torch.empty(K, Tc, dtype=dtype, device=x_TK.device)
    BLOCK_C, BLOCK_K = 64, 64
    grid = (triton.cdiv(Tc, BLOCK_C), triton.cdiv(K, BLOCK_K), 1)
    _fp8_cols_kernel[grid](x_TK, src_Tc, cscale_Tc.float().contiguous(), out, K, Tc, 0, 0, 0,
                           FP8_MAX=fp8_max(dtype), E5M2=dtype == torch.float8_e5m2,
                           BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    return out


def fp8_weight_t_triton(w_GNK: torch.Tensor, scale_G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(G, K, N)`` codes ``saturate(w[g].T * scale[g])`` of a contiguous ``(G, N, K)``."""
    G, N, K = w_GNK.shape
    out = torch.empty(G, K, N, dtype=dtype, device=w_GNK.device)
    src = torch.arange(N, device=w_GNK.device)
    cscale = scale_G.float().unsqueeze(1).expand(G, N).contiguous()
    BLOCK_C, BLOCK_K = 64, 64
    grid = (triton.cdiv(N, BLOCK_C), triton.cdiv(K, BLOCK_K), G)
    _fp8_cols_kernel[grid](w_GNK, src, cscale, out, K, N, N * K, N, K * N,
                           FP8_MAX=fp8_max(dtype), E5M2=dtype == torch.float8_e5m2,
                           BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    return out
