"""Fused Triton kernels of the FP8 ``GroupedMLP`` activation (CUDA only; imported lazily).

They restate :mod:`._triton_act` row for row and add the FP8 work around it; the FP8
helpers (group lookup, scale, cast) come from :mod:`moe_offload.tensor.fp8_kernels`, so
the codes are the format's exactly.  Used by :mod:`.gemm.fp8`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..tensor.fp8_kernels import amax_out, block_g, group_amax_bits, group_table, scale_of, to_fp8
from ._triton_act import _ACT_ID, _BLOCK, _f_and_df

__all__ = ["act_forward_fp8", "act_backward_fp8"]


# --------------------------------------------------------------------------- activation
# The fused MLP kernels below restate :mod:`moe_offload.ops._triton_act` row for row
# (same ``_f_and_df``, same expression order, same block and warp counts, so the same
# bits) and add the FP8 work around it:
# - forward: from the bf16 fc1 output ``h`` and its group amax, write ``h``'s FP8 codes
#   (saved for backward), ``out = act(h) * p`` and the group amax of ``out`` (atomics),
#   so ``h`` is read twice (amax, this) instead of three times and ``out`` once less;
# - backward: read ``h``'s FP8 codes directly (dequantized in registers exactly like
#   ``GroupedTensorStorage.dequantize``: ``bf16(fp32(code) * scale_inv)``) instead of a
#   dequantized copy, and reduce the group amaxes of ``out`` and ``d_h`` on the fly.


@triton.jit
def _row_group(row, offs_ptr, G, BLOCK_G: tl.constexpr):
    g, gm, start, end, size, padded, cend = group_table(offs_ptr, G, BLOCK_G, 1)
    gid = tl.sum((gm & (end <= row)).to(tl.int32), axis=0)
    return g, gm, gid


@triton.jit
def _act_fwd_fp8_kernel(h_ptr, offs_ptr, amax_h_ptr, hq_ptr, p_ptr, out_ptr, amax_o_ptr,
                        amax_h_out_ptr, sinv_h_ptr, F, G,
                        ACT: tl.constexpr, GATED: tl.constexpr, HAS_P: tl.constexpr,
                        SAVE_H: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g, gm, gid = _row_group(row, offs_ptr, G, BLOCK_G)
    X = 2 * F if GATED else F
    p = 1.0
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
    h_row = h_ptr + row * X
    o_row = out_ptr + row * F
    if SAVE_H:
        hbits = tl.load(amax_h_ptr + g, mask=gm, other=0)
        hscale = scale_of(hbits, 448.0, False)
        sh = tl.sum(tl.where(g == gid, hscale, 0.0), axis=0)  # 0 for rows of no group
        q_row = hq_ptr + row * X
        if row == 0:
            tl.store(amax_h_out_ptr + g, amax_out(hbits), mask=gm)
            tl.store(sinv_h_ptr + g, tl.math.div_rn(tl.full([BLOCK_G], 1.0, tl.float32), hscale), mask=gm)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < F
        a = tl.load(h_row + cols, mask=m, other=0.0).to(tl.float32)
        if SAVE_H:
            tl.store(q_row + cols, to_fp8(tl.where(gid < G, a, 0.0) * sh, 448.0, False), mask=m)
        z, _ = _f_and_df(a, ACT)
        if GATED:
            b = tl.load(h_row + F + cols, mask=m, other=0.0).to(tl.float32)
            if SAVE_H:
                tl.store(q_row + F + cols, to_fp8(tl.where(gid < G, b, 0.0) * sh, 448.0, False), mask=m)
            z = z * b
        o = (z * p).to(out_ptr.dtype.element_ty)
        tl.store(o_row + cols, o, mask=m)
        acc = tl.maximum(acc, tl.where(m, tl.abs(o.to(tl.float32)).to(tl.int32, bitcast=True), 0))
    tl.atomic_max(amax_o_ptr + gid, tl.max(acc, axis=0), mask=gid < G)


def act_forward_fp8(h_TX: torch.Tensor, offs_G: torch.Tensor, probs_T: Optional[torch.Tensor],
                    activation: str, gated: bool, save_h: bool):
    """``(out_TF, amax_bits_out_G, h_parts)``: ``out = act(h) * p`` (bf16, the bits of
    ``activations.act_forward``), the int32 bits of its group amaxes, and (``save_h``)
    the FP8 rowwise components of ``h`` (``amax``, ``rowwise_data``,
    ``rowwise_scale_inv``; E4M3, no power-of-2 rounding).  ``h`` contiguous, on CUDA."""
    T, X = h_TX.shape
    F = X // 2 if gated else X
    G = offs_G.shape[0]
    dev = h_TX.device
    out = torch.empty(T, F, device=dev, dtype=h_TX.dtype)
    amax_o = torch.zeros(G, dtype=torch.int32, device=dev)
    parts = None
    if save_h:
        amax_h = group_amax_bits(h_TX, offs_G)
        parts = {"amax": torch.empty(G, dtype=torch.float32, device=dev),
                 "rowwise_data": torch.empty(T * X, dtype=torch.float8_e4m3fn, device=dev),
                 "rowwise_scale_inv": torch.empty(G, dtype=torch.float32, device=dev)}
    if T == 0 or F == 0:
        return out, amax_o, parts
    dummy = amax_o
    _act_fwd_fp8_kernel[(T,)](
        h_TX, offs_G, amax_h if save_h else dummy, parts["rowwise_data"] if save_h else dummy,
        probs_T.contiguous() if probs_T is not None else h_TX, out, amax_o,
        parts["amax"] if save_h else dummy, parts["rowwise_scale_inv"] if save_h else dummy, F, G,
        ACT=_ACT_ID[activation], GATED=gated, HAS_P=probs_T is not None, SAVE_H=save_h,
        BLOCK=min(_BLOCK, triton.next_power_of_2(F)), BLOCK_G=block_g(G), num_warps=4)
    return out, amax_o, parts


@triton.jit
def _act_bwd_fp8_kernel(hq_ptr, offs_ptr, sinv_ptr, p_ptr, do_ptr, dh_ptr, out_ptr, dp_ptr,
                        amax_o_ptr, amax_dh_ptr, F, G, stride_do,
                        ACT: tl.constexpr, GATED: tl.constexpr, HAS_P: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g, gm, gid = _row_group(row, offs_ptr, G, BLOCK_G)
    sv = tl.load(sinv_ptr + g, mask=gm, other=0.0)
    s = tl.where(gid < G, tl.sum(tl.where(g == gid, sv, 0.0), axis=0), 1.0)
    X = 2 * F if GATED else F
    p = 1.0
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
    h_row = hq_ptr + row * X
    do_row = do_ptr + row * stride_do
    dh_row = dh_ptr + row * X
    o_row = out_ptr + row * F
    hdt = dh_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    mo = tl.zeros([BLOCK], dtype=tl.int32)
    mdh = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < F
        a = (tl.load(h_row + cols, mask=m, other=0.0).to(tl.float32) * s).to(hdt).to(tl.float32)
        do = tl.load(do_row + cols, mask=m, other=0.0).to(tl.float32)
        f, df = _f_and_df(a, ACT)
        dz = do * p
        if GATED:
            b = (tl.load(h_row + F + cols, mask=m, other=0.0).to(tl.float32) * s).to(hdt).to(tl.float32)
            z = f * b
            d1 = (dz * b * df).to(hdt)
            d2 = (dz * f).to(hdt)
            tl.store(dh_row + cols, d1, mask=m)
            tl.store(dh_row + F + cols, d2, mask=m)
            mdh = tl.maximum(mdh, tl.where(m, tl.abs(d1.to(tl.float32)).to(tl.int32, bitcast=True), 0))
            mdh = tl.maximum(mdh, tl.where(m, tl.abs(d2.to(tl.float32)).to(tl.int32, bitcast=True), 0))
        else:
            z = f
            d1 = (dz * df).to(hdt)
            tl.store(dh_row + cols, d1, mask=m)
            mdh = tl.maximum(mdh, tl.where(m, tl.abs(d1.to(tl.float32)).to(tl.int32, bitcast=True), 0))
        acc += tl.where(m, do * z, 0.0)
        o = (z * p).to(out_ptr.dtype.element_ty)
        tl.store(o_row + cols, o, mask=m)
        mo = tl.maximum(mo, tl.where(m, tl.abs(o.to(tl.float32)).to(tl.int32, bitcast=True), 0))
    if HAS_P:
        tl.store(dp_ptr + row, tl.sum(acc, axis=0).to(dp_ptr.dtype.element_ty))
    tl.atomic_max(amax_o_ptr + gid, tl.max(mo, axis=0), mask=gid < G)
    tl.atomic_max(amax_dh_ptr + gid, tl.max(mdh, axis=0), mask=gid < G)


def act_backward_fp8(hq_data: torch.Tensor, h_sinv_G: torch.Tensor, offs_G: torch.Tensor,
                     shape, h_dtype: torch.dtype, probs_T: Optional[torch.Tensor],
                     d_out_TF: torch.Tensor, activation: str, gated: bool):
    """``activations.act_backward(h, probs, d_out)`` with ``h`` given by its FP8 rowwise
    codes and per-group ``scale_inv`` (same bits as on the dequantized copy), plus the
    int32 amax bits of ``out`` and ``d_h``: ``(d_h, d_probs, out, amax_out, amax_dh)``."""
    T, X = shape
    F = X // 2 if gated else X
    G = offs_G.shape[0]
    dev = d_out_TF.device
    d_out_TF = d_out_TF if d_out_TF.stride(-1) == 1 else d_out_TF.contiguous()
    d_h = torch.empty(T, X, device=dev, dtype=h_dtype)
    out = torch.empty(T, F, device=dev, dtype=h_dtype)
    d_p = torch.empty(T, device=dev, dtype=probs_T.dtype) if probs_T is not None else None
    amax = torch.zeros(2 * G, dtype=torch.int32, device=dev)
    if T == 0 or F == 0:
        if d_p is not None:
            d_p.zero_()
        d_h.zero_()
        return d_h, d_p, out, amax[:G], amax[G:]
    _act_bwd_fp8_kernel[(T,)](
        hq_data, offs_G, h_sinv_G, probs_T.contiguous() if probs_T is not None else d_h, d_out_TF,
        d_h, out, d_p if d_p is not None else d_h, amax[:G], amax[G:], F, G, d_out_TF.stride(0),
        ACT=_ACT_ID[activation], GATED=gated, HAS_P=probs_T is not None,
        BLOCK=min(_BLOCK, triton.next_power_of_2(F)), BLOCK_G=block_g(G), num_warps=4)
    return d_h, d_p, out, amax[:G], amax[G:]
