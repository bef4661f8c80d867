"""Fused Triton kernels for FP8 current scaling (CUDA only; imported lazily).

A public kernel module: besides the two quantizers, its ``@triton.jit`` helpers
(:func:`group_table`, :func:`scale_of`, :func:`amax_out`, :func:`to_fp8`) and
:func:`block_g` are shared with the FP8 activation kernels of ``moe_offload.ops``, so
every FP8 code in the library comes from the same few lines.

Two launches quantize a grouped ``(T, K)`` activation (plus one ``zeros`` for the amax
scratch), instead of ~50 small torch ops:

1. ``_group_amax_kernel``: one read of ``x``.  Each program reduces ``BLOCK_R`` rows
   (all of K) to a max per row, then to a max per group it touches, and issues one
   ``atomic_max`` per such group (usually one).  The max is taken on the int32 bits of
   ``|x|`` in fp32: for non-negative floats the integer order is the float order, and
   every NaN pattern sorts above ``inf``, so a group holding a NaN ends with a NaN amax
   (the reference's rule) without a separate flag.  ``abs`` of bf16/fp16/fp32 is exact.
2. ``_fp8_cast_kernel``: one more read of ``x``.  With the columnwise output, a program
   owns ``BLOCK_C`` columns of
   the padded columnwise layout (see :mod:`.grouped_storage`) times ``BLOCK_K``
   features.  It derives the group of each column, its source row and the group's
   scale from the ``G`` offsets and amaxes it loads (no ``gid_T``/``src_Tc`` buffers),
   and writes the rowwise codes of the source rows and, transposed in registers, the
   columnwise codes.  Rows past ``offsets[-1]`` map to the columns past the last group
   (there are always enough: ``Tc >= T + 15G``), so every row is written exactly once
   and every padding column gets zero codes.  Program ``(0, 0)`` also writes the
   per-group outputs (amax, ``scale_inv``, padded column offsets).  Optional outputs
   for ``torch._scaled_grouped_mm``: ``scale_inv`` per row (1 for rows of no group) and
   per ``(group, feature)``.  Rowwise only, a program owns ``BLOCK_C`` rows instead.

Inputs are bf16 (what the fast path quantizes; tested).  fp32 inputs are not routed
here: on the H100 (Triton 3.6) the columnwise codes came out wrong for an fp32 tile
(the register transpose of its layout), while the interpreter gave the right ones.

Weights ``(G, N, K)`` get the same two steps with the expert as the group
(``_weight_amax_kernel``, ``_fp8_weight_kernel``); the cast writes the rowwise codes and/or
the per-expert transposed ``(G, K, N)`` codes the dgrad needs from one read.  The FP8
layers call it twice per step: rowwise in forward, transposed in backward with the
forward's amax (no second amax pass), so no weight codes outlive a pass.

Numerics are the reference's (:func:`..formats.amax_to_scale`): ``scale = 448 / amax``
(``div_rn``: correctly rounded, like torch's tensor/tensor division; Triton's ``/`` is
approximate), 1 where amax is 0 or not finite, clamped to the largest fp32, optionally
rounded down to a power of two by masking the mantissa (the scale is always a normal
number: ``448 / fp32_max`` is); codes ``rtne(clamp(fp32(x) * scale))``;
``scale_inv = div_rn(1, scale)`` (torch's ``reciprocal`` is IEEE division).
Bit-identity with the torch reference is tested on the GPU
(``tests/tensor/test_fp8_kernels.py``).

Concurrency: the amax scratch is zeroed on the launching stream before the atomics,
and the cast kernel runs after the amax kernel on the same stream, so it sees the
final maxima.  Atomics make the amax order-independent (max is exact), hence
deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .formats import fp8_max
from .grouped_storage import MAX_FUSED_GROUPS, columnwise_width

__all__ = ["fp8_group_quantize_fused", "fp8_weight_quantize_fused", "group_amax_bits",
           "MAX_FUSED_GROUPS", "group_table", "scale_of", "amax_out", "to_fp8", "block_g"]


@triton.jit
def group_table(offs_ptr, G, BLOCK_G: tl.constexpr, COL_ALIGN: tl.constexpr):
    """Per-group vectors from the int32 end offsets: index, mask, row start, row end,
    size, padded column count and padded column end."""
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    end = tl.load(offs_ptr + g, mask=gm, other=0)
    start = tl.load(offs_ptr + g - 1, mask=gm & (g > 0), other=0)
    size = tl.where(gm, end - start, 0)
    padded = (size + (COL_ALIGN - 1)) // COL_ALIGN * COL_ALIGN
    cend = tl.cumsum(padded, 0)
    return g, gm, start, end, size, padded, cend


@triton.jit
def scale_of(bits, FP8_MAX: tl.constexpr, POW2: tl.constexpr):
    """fp32 scale from the int32 bits of a non-negative amax (see module docstring)."""
    amax = bits.to(tl.float32, bitcast=True)
    ok = (bits > 0) & (bits < 0x7F800000)  # > 0 and finite (NaN bits sort above inf)
    one = tl.full(bits.shape, 1.0, tl.float32)
    s = tl.math.div_rn(one * FP8_MAX, tl.where(ok, amax, one))
    s = tl.where(ok, s, one)
    # 448/tiny overflows to inf: keep the largest finite fp32 (on the bits: a float
    # literal could promote the math to fp64)
    sb = s.to(tl.int32, bitcast=True)
    s = tl.where(sb >= 0x7F800000, 0x7F7FFFFF, sb).to(tl.float32, bitcast=True)
    if POW2:
        s = (s.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def amax_out(bits):
    """fp32 amax from its bits, NaN canonicalized to the reference's NaN."""
    return tl.where(bits > 0x7F800000, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit
def to_fp8(y, FP8_MAX: tl.constexpr, E5M2: tl.constexpr):
    y = tl.where(y > FP8_MAX, FP8_MAX, y)  # where keeps NaN (minimum would not)
    y = tl.where(y < -FP8_MAX, -FP8_MAX, y)
    if E5M2:
        q = y.to(tl.float8e5, fp_downcast_rounding="rtne")
    else:
        q = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return q


@triton.jit
def _group_amax_kernel(x_ptr, offs_ptr, amax_ptr, T, K, G,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < T
    row = x_ptr + r[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(row + k[None, :], mask=rm[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True))
    rmax = tl.max(acc, axis=1)
    g, gm, start, end, size, padded, cend = group_table(offs_ptr, G, BLOCK_G, 1)
    gid = tl.sum((gm[None, :] & (end[None, :] <= r[:, None])).to(tl.int32), axis=1)
    hit = (gid[:, None] == g[None, :]) & rm[:, None]
    gmax = tl.max(tl.where(hit, rmax[:, None], -1), axis=0)
    tl.atomic_max(amax_ptr + g, gmax, mask=gm & (gmax >= 0))


@triton.jit
def _fp8_cast_kernel(x_ptr, offs_ptr, amax_ptr, row_ptr, col_ptr, rscale_ptr, kscale_ptr,
                     amax_out_ptr, sinv_ptr, csinv_ptr, coffs_ptr, T, K, Tc, G,
                     FP8_MAX: tl.constexpr, E5M2: tl.constexpr, POW2: tl.constexpr,
                     ROWS: tl.constexpr, COLS: tl.constexpr, ROW_SCALE: tl.constexpr,
                     K_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_G: tl.constexpr):
    pc = tl.program_id(0)
    pk = tl.program_id(1)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    g, gm, start, end, size, padded, cend = group_table(offs_ptr, G, BLOCK_G, 16)
    bits = tl.load(amax_ptr + g, mask=gm, other=0)
    scale = scale_of(bits, FP8_MAX, POW2)
    sinv = tl.math.div_rn(tl.full([BLOCK_G], 1.0, tl.float32), scale)
    if COLS:
        # c: padded column; columns past the last group serve the tail rows
        cg = tl.sum((gm[None, :] & (cend[None, :] <= c[:, None])).to(tl.int32), axis=1)
        sel = cg[:, None] == g[None, :]
        tail = cg >= G
        ctot = tl.sum(padded, axis=0)
        rtot = tl.sum(size, axis=0)
        cstart = tl.where(tail, ctot, tl.sum(tl.where(sel, cend - padded, 0), axis=1))
        rstart = tl.where(tail, rtot, tl.sum(tl.where(sel, start, 0), axis=1))
        n = tl.where(tail, T - rtot, tl.sum(tl.where(sel, size, 0), axis=1))
        pos = c - cstart
        has_src = (pos < n) & (c < Tc)
        src = tl.where(has_src, rstart + pos, 0).to(tl.int64)
    else:
        # rows only: c is the row itself (grid over T, no column mapping)
        cg = tl.sum((gm[None, :] & (end[None, :] <= c[:, None])).to(tl.int32), axis=1)
        sel = cg[:, None] == g[None, :]
        tail = cg >= G
        has_src = c < T
        src = c.to(tl.int64)
    s = tl.sum(tl.where(sel, scale[None, :], 0.0), axis=1)  # one non-zero term: exact
    live = has_src & (cg < G)  # tail rows read nothing and encode as zeros
    x = tl.load(x_ptr + src[:, None] * K + k[None, :], mask=live[:, None] & km[None, :],
                other=0.0).to(tl.float32)
    y = x * s[:, None]
    if ROWS:
        tl.store(row_ptr + src[:, None] * K + k[None, :], to_fp8(y, FP8_MAX, E5M2),
                 mask=has_src[:, None] & km[None, :])
    if COLS:
        tl.store(col_ptr + k[:, None].to(tl.int64) * Tc + c[None, :],
                 to_fp8(tl.trans(y), FP8_MAX, E5M2), mask=km[:, None] & (c < Tc)[None, :])
    if ROW_SCALE:
        if pk == 0:
            rs = tl.where(tail, 1.0, tl.sum(tl.where(sel, sinv[None, :], 0.0), axis=1))
            tl.store(rscale_ptr + src, rs, mask=has_src)
    if K_SCALE:
        if pc == 0:
            ks = tl.zeros([BLOCK_G, BLOCK_K], dtype=tl.float32) + sinv[:, None]
            tl.store(kscale_ptr + g[:, None] * K + k[None, :], ks, mask=gm[:, None] & km[None, :])
    if pc == 0:
        if pk == 0:
            tl.store(amax_out_ptr + g, amax_out(bits), mask=gm)
            tl.store(sinv_ptr + g, sinv, mask=gm)
            if COLS:
                tl.store(csinv_ptr + g, sinv, mask=gm)
                tl.store(coffs_ptr + g, cend, mask=gm)


# (BLOCK_C, BLOCK_K, num_warps) of the cast kernel with / without the columnwise output;
# the fastest of the sweep in scripts/bench_fp8.py --profile (H100, T=16384, K=4096)
CAST_CONFIG = {"cols": (16, 512, 4), "rows": (1, 4096, 4)}


def block_g(G: int) -> int:
    return max(2, triton.next_power_of_2(G))


def group_amax_bits(x_TK: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """int32 bits of the per-group ``max|x|`` (fp32) of a contiguous CUDA ``(T, K)``
    (zeros + one kernel)."""
    T, K = x_TK.shape
    G = offs_G.shape[0]
    amax_bits = torch.zeros(G, dtype=torch.int32, device=x_TK.device)
    if T > 0:
        BLOCK_R, BLOCK_K = 16, min(512, triton.next_power_of_2(K))
        _group_amax_kernel[(triton.cdiv(T, BLOCK_R),)](
            x_TK, offs_G, amax_bits, T, K, G, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
            BLOCK_G=block_g(G), num_warps=4)
    return amax_bits


def fp8_group_quantize_fused(x_TK: torch.Tensor, offs_G: torch.Tensor, dtype: torch.dtype,
                             power_2_scale: bool, rowwise: bool, columnwise: bool,
                             row_scale: bool = False, k_scale: bool = False,
                             amax_bits: Optional[torch.Tensor] = None) -> dict:
    """FP8 current-scaling components of a contiguous CUDA ``(T, K)`` in 3 launches.

    Returns a dict with the :class:`GroupedTensorStorage` components (``amax``,
    ``rowwise_*`` / ``columnwise_*`` as requested, ``columnwise_offsets``) and, when
    asked, ``row_scale_T`` (``scale_inv`` of each row's group, 1 for rows of no group)
    and ``k_scale_GK`` (``scale_inv[g]`` repeated ``K`` times per group, flat).
    ``amax_bits``: the int32 bits of the per-group amaxes when a producer kernel already
    reduced them (then only the cast runs).
    """
    T, K = x_TK.shape
    G = offs_G.shape[0]
    dev = x_TK.device
    Tc = columnwise_width(T, G, 16)
    if amax_bits is None:
        amax_bits = group_amax_bits(x_TK, offs_G)
    f32 = dict(dtype=torch.float32, device=dev)
    out = {"amax": torch.empty(G, **f32)}
    scale_inv = torch.empty(G, **f32)
    row = torch.empty(T * K, dtype=dtype, device=dev) if rowwise else None
    col = torch.empty(K * Tc, dtype=dtype, device=dev) if columnwise else None
    csinv = torch.empty(G, **f32) if columnwise else None
    coffs = torch.empty(G, dtype=torch.int32, device=dev) if columnwise else None
    rscale = torch.empty(T, **f32) if row_scale else None
    kscale = torch.empty(G * K, **f32) if k_scale else None
    dummy = out["amax"]
    BLOCK_C, BLOCK_K, warps = CAST_CONFIG["cols" if columnwise else "rows"]
    BLOCK_K = min(BLOCK_K, max(16, triton.next_power_of_2(K)))
    grid = (triton.cdiv(Tc if columnwise else T, BLOCK_C), triton.cdiv(K, BLOCK_K))
    if grid[0] == 0:
        grid = (1, grid[1])  # program (0, 0) writes the per-group outputs
    _fp8_cast_kernel[grid](
        x_TK, offs_G, amax_bits,
        row if row is not None else dummy, col if col is not None else dummy,
        rscale if rscale is not None else dummy, kscale if kscale is not None else dummy,
        out["amax"], scale_inv, csinv if csinv is not None else dummy,
        coffs if coffs is not None else dummy, T, K, Tc, G,
        FP8_MAX=fp8_max(dtype), E5M2=dtype == torch.float8_e5m2, POW2=power_2_scale,
        ROWS=rowwise, COLS=columnwise, ROW_SCALE=row_scale, K_SCALE=k_scale,
        BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, BLOCK_G=block_g(G), num_warps=warps)
    if rowwise:
        out["rowwise_data"], out["rowwise_scale_inv"] = row, scale_inv
    if columnwise:
        out["columnwise_data"], out["columnwise_scale_inv"] = col, csinv
        out["columnwise_offsets"] = coffs
    if row_scale:
        out["row_scale_T"] = rscale
    if k_scale:
        out["k_scale_GK"] = kscale
    return out


# --------------------------------------------------------------------------- weights
@triton.jit
def _weight_amax_kernel(w_ptr, amax_ptr, N, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < N
    row = w_ptr + b * N * K + r[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(row + k[None, :], mask=rm[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.maximum(acc, tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True))
    tl.atomic_max(amax_ptr + b, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _fp8_weight_kernel(w_ptr, amax_ptr, row_ptr, t_ptr, nscale_ptr, kscale_ptr, amax_out_ptr,
                       sinv_ptr, N, K, FP8_MAX: tl.constexpr, E5M2: tl.constexpr,
                       POW2: tl.constexpr, ROWS: tl.constexpr, TRANS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    nm = n < N
    km = k < K
    one = tl.arange(0, 2)  # a 2-vector holding this expert's amax bits in lane 0
    bits = tl.load(amax_ptr + b + one, mask=one < 1, other=0)
    scale_v = scale_of(bits, FP8_MAX, POW2)
    sinv_v = tl.math.div_rn(tl.full([2], 1.0, tl.float32), scale_v)
    scale = tl.sum(tl.where(one < 1, scale_v, 0.0), axis=0)
    sinv = tl.sum(tl.where(one < 1, sinv_v, 0.0), axis=0)
    m = nm[:, None] & km[None, :]
    x = tl.load(w_ptr + b * N * K + n[:, None].to(tl.int64) * K + k[None, :], mask=m,
                other=0.0).to(tl.float32)
    y = x * scale
    if ROWS:
        tl.store(row_ptr + b * N * K + n[:, None].to(tl.int64) * K + k[None, :],
                 to_fp8(y, FP8_MAX, E5M2), mask=m)
    if TRANS:
        tl.store(t_ptr + b * K * N + k[:, None].to(tl.int64) * N + n[None, :],
                 to_fp8(tl.trans(y), FP8_MAX, E5M2), mask=km[:, None] & nm[None, :])
        if pn == 0:
            tl.store(kscale_ptr + b * K + k, tl.zeros([BLOCK_K], dtype=tl.float32) + sinv, mask=km)
    if pk == 0:
        if ROWS:
            tl.store(nscale_ptr + b * N + n, tl.zeros([BLOCK_N], dtype=tl.float32) + sinv, mask=nm)
        if pn == 0:
            tl.store(amax_out_ptr + b + one, amax_out(bits), mask=one < 1)
            tl.store(sinv_ptr + b + one, sinv_v, mask=one < 1)


def fp8_weight_quantize_fused(w_GNK: torch.Tensor, dtype: torch.dtype, power_2_scale: bool,
                              transposed: bool, rowwise: bool = True,
                              amax: Optional[torch.Tensor] = None) -> dict:
    """Per-expert FP8 codes of a contiguous CUDA ``(G, N, K)`` weight in 3 launches.

    Returns ``amax`` / ``scale_inv`` ``(G,)``, with ``rowwise`` the ``rowwise_data``
    ``(G*N*K,)`` and ``n_scale_GN`` (``scale_inv`` per output row, flat), and with
    ``transposed`` ``w_t_GKN`` (the same codes transposed per expert) and ``k_scale_GK``.
    ``amax``: the per-expert amax an earlier call returned (fp32 ``(G,)``); the amax pass
    is then skipped (one read of the weight instead of two) and the codes are the bits
    that call would have written: its bits are the kernel's own (NaN canonicalized,
    which the scale treats as any NaN).
    """
    G, N, K = w_GNK.shape
    dev = w_GNK.device
    if amax is not None:
        amax_bits = amax.float().contiguous().view(torch.int32)
    else:
        amax_bits = torch.zeros(G, dtype=torch.int32, device=dev)
        BLOCK_R, BLOCK_KA = 16, min(512, triton.next_power_of_2(K))
        _weight_amax_kernel[(triton.cdiv(N, BLOCK_R), G)](w_GNK, amax_bits, N, K, BLOCK_R=BLOCK_R,
                                                           BLOCK_K=BLOCK_KA, num_warps=4)
    f32 = dict(dtype=torch.float32, device=dev)
    out = {"amax": torch.empty(G, **f32), "scale_inv": torch.empty(G, **f32)}
    if rowwise:
        out["rowwise_data"] = torch.empty(G * N * K, dtype=dtype, device=dev)
        out["n_scale_GN"] = torch.empty(G * N, **f32)
    if transposed:
        out["w_t_GKN"] = torch.empty(G, K, N, dtype=dtype, device=dev)
        out["k_scale_GK"] = torch.empty(G * K, **f32)
    dummy = out["amax"]
    BLOCK_N, BLOCK_K = 64, 64
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K), G)
    _fp8_weight_kernel[grid](
        w_GNK, amax_bits, out.get("rowwise_data", dummy), out.get("w_t_GKN", dummy),
        out.get("n_scale_GN", dummy), out.get("k_scale_GK", dummy), out["amax"], out["scale_inv"], N, K,
        FP8_MAX=fp8_max(dtype), E5M2=dtype == torch.float8_e5m2, POW2=power_2_scale,
        ROWS=rowwise, TRANS=transposed, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out
