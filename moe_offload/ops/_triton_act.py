"""Triton kernels for the fused activation * probs (CUDA only; imported lazily).

One program per row; it walks the ``F`` columns in blocks.  Math in fp32, one rounding
to the input dtype on store.  See :mod:`.activations` for the definitions.

- forward: reads ``h`` (``X`` = 2F or F columns) and ``p``; writes ``out = act(h) * p``.
- backward: reads ``h``, ``p``, ``d_out``; writes ``d_h``, ``out`` (recomputed) and
  ``d_p`` (row sum of ``d_out * act(h)``, accumulated in fp32 in registers).
- optional ``end``: a device int scalar; rows at or past it read nothing and write
  zeros (no host sync: each program compares its row with the loaded value).
- ``triton_zero_empty_groups_``: zeroes the groups of a ``(G, K, N)`` wgrad output
  that have no rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_ACT_ID = {"swiglu": 0, "silu": 0, "geglu": 1, "gelu": 1, "relu": 2}
_BLOCK = 1024


@triton.jit
def _f_and_df(a, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(a)
        f = a * s
        df = s * (1.0 + a * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        f = a * cdf
        df = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        f = tl.maximum(a, 0.0)
        df = tl.where(a > 0, 1.0, 0.0)
    return f, df


@triton.jit
def _act_fwd_kernel(h_ptr, p_ptr, end_ptr, out_ptr, F, stride_h, stride_out,
                    ACT: tl.constexpr, GATED: tl.constexpr, HAS_P: tl.constexpr,
                    HAS_END: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = 1.0
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
    if HAS_END:  # rows past the end: write zeros (p = 0 and h masked off below)
        live = row < tl.load(end_ptr).to(tl.int64)
        p = tl.where(live, p, 0.0)
    else:
        live = row >= 0
    h_row = h_ptr + row * stride_h
    o_row = out_ptr + row * stride_out
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < F
        ml = m & live
        a = tl.load(h_row + cols, mask=ml, other=0.0).to(tl.float32)
        z, _ = _f_and_df(a, ACT)
        if GATED:
            b = tl.load(h_row + F + cols, mask=ml, other=0.0).to(tl.float32)
            z = z * b
        tl.store(o_row + cols, (z * p).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _act_bwd_kernel(h_ptr, p_ptr, end_ptr, do_ptr, dh_ptr, out_ptr, dp_ptr, F,
                    stride_h, stride_do, stride_dh, stride_out,
                    ACT: tl.constexpr, GATED: tl.constexpr, HAS_P: tl.constexpr,
                    HAS_END: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = 1.0
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
    if HAS_END:  # rows past the end: h and d_out read as 0, so every output is 0
        live = row < tl.load(end_ptr).to(tl.int64)
        p = tl.where(live, p, 0.0)
    else:
        live = row >= 0
    h_row = h_ptr + row * stride_h
    do_row = do_ptr + row * stride_do
    dh_row = dh_ptr + row * stride_dh
    o_row = out_ptr + row * stride_out
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < F
        ml = m & live
        a = tl.load(h_row + cols, mask=ml, other=0.0).to(tl.float32)
        do = tl.load(do_row + cols, mask=ml, other=0.0).to(tl.float32)
        f, df = _f_and_df(a, ACT)
        dz = do * p
        if GATED:
            b = tl.load(h_row + F + cols, mask=ml, other=0.0).to(tl.float32)
            z = f * b
            tl.store(dh_row + cols, (dz * b * df).to(dh_ptr.dtype.element_ty), mask=m)
            tl.store(dh_row + F + cols, (dz * f).to(dh_ptr.dtype.element_ty), mask=m)
        else:
            z = f
            tl.store(dh_row + cols, (dz * df).to(dh_ptr.dtype.element_ty), mask=m)
        acc += tl.where(m, do * z, 0.0)
        tl.store(o_row + cols, (z * p).to(out_ptr.dtype.element_ty), mask=m)
    if HAS_P:
        tl.store(dp_ptr + row, tl.sum(acc, axis=0).to(dp_ptr.dtype.element_ty))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_act_forward(h_TX: torch.Tensor, probs_T: Optional[torch.Tensor], activation: str,
                       gated: bool, rows_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    h_TX = _row_major(h_TX)
    T, X = h_TX.shape
    F = X // 2 if gated else X
    out = torch.empty(T, F, device=h_TX.device, dtype=h_TX.dtype)
    if T == 0 or F == 0:
        return out
    p = probs_T.contiguous() if probs_T is not None else h_TX
    end = rows_end if rows_end is not None else h_TX
    _act_fwd_kernel[(T,)](h_TX, p, end, out, F, h_TX.stride(0), out.stride(0),
                          ACT=_ACT_ID[activation], GATED=gated, HAS_P=probs_T is not None,
                          HAS_END=rows_end is not None, BLOCK=min(_BLOCK, triton.next_power_of_2(F)), num_warps=4)
    return out


def triton_act_backward(h_TX, probs_T, d_out_TF, activation: str, gated: bool,
                        rows_end: Optional[torch.Tensor] = None):
    h_TX, d_out_TF = _row_major(h_TX), _row_major(d_out_TF)
    T, X = h_TX.shape
    F = X // 2 if gated else X
    d_h = torch.empty_like(h_TX)
    out = torch.empty(T, F, device=h_TX.device, dtype=h_TX.dtype)
    d_p = torch.empty(T, device=h_TX.device, dtype=probs_T.dtype) if probs_T is not None else None
    if T == 0 or F == 0:
        if d_p is not None:
            d_p.zero_()
        d_h.zero_()
        return d_h, d_p, out
    p = probs_T.contiguous() if probs_T is not None else h_TX
    end = rows_end if rows_end is not None else h_TX
    _act_bwd_kernel[(T,)](h_TX, p, end, d_out_TF, d_h, out, d_p if d_p is not None else h_TX, F,
                          h_TX.stride(0), d_out_TF.stride(0), d_h.stride(0), out.stride(0),
                          ACT=_ACT_ID[activation], GATED=gated, HAS_P=probs_T is not None,
                          HAS_END=rows_end is not None, BLOCK=min(_BLOCK, triton.next_power_of_2(F)), num_warps=4)
    return d_h, d_p, out


@triton.jit
def _zero_empty_groups_kernel(out_ptr, offs_ptr, numel_per_group, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    end = tl.load(offs_ptr + g)
    start = tl.load(offs_ptr + tl.maximum(g - 1, 0))
    start = tl.where(g > 0, start, 0)
    if end == start:
        idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        zeros = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + g.to(tl.int64) * numel_per_group + idx, zeros, mask=idx < numel_per_group)


def triton_zero_empty_groups_(out_GKN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """Zero ``out[g]`` in place for every ``g`` with no rows; programs of non-empty
    groups only read two offsets.  ``out`` must be contiguous."""
    G = out_GKN.shape[0]
    per_group = out_GKN[0].numel() if G else 0
    if G == 0 or per_group == 0:
        return out_GKN
    block = 4096
    _zero_empty_groups_kernel[(G, triton.cdiv(per_group, block))](
        out_GKN, offs_G, per_group, BLOCK=block, num_warps=4)
    return out_GKN
