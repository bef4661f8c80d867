"""``group_quantize``: quantize all groups of a ``(T, K)`` matrix in one pass.

No host sync: the group of each row comes from ``searchsorted`` on the device offsets,
per-group amaxes from one ``aminmax`` and one ``scatter_reduce``, and the columnwise
(transposed, padded) layout from a per-column source-row index into a buffer whose
width is a host-known upper bound.  The number of kernel launches does not depend on G.

On CUDA, bf16 FP8 with up to :data:`MAX_FUSED_GROUPS` groups runs fused: one amax
kernel and one kernel writing the rowwise and columnwise codes (:mod:`.fp8_kernels`,
3 launches in all, bit-identical to the reference below).  Otherwise on CUDA the FP8
code generation runs as two Triton kernels (:mod:`._triton_quant`, imported lazily):
rowwise (gather the group scale, multiply, saturate, cast) and columnwise (the same on
a gathered tile, transposed in registers; torch would need a gather, a mask and a slow
1-byte transpose copy).  The pure-torch code below is the
reference and runs everywhere else.  Both compute ``fp32(x) * scale`` then clamp then
round to nearest even, so the codes are bit-identical (tested on GPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import formats
from .grouped_storage import COL_ALIGN, MAX_FUSED_GROUPS, GroupedTensorStorage, columnwise_width
from .quantizers import Quantizer
from .row_groups import SplitSizes, group_ids, group_sizes, offsets_from_splits

__all__ = ["group_quantize", "fp8_weight_transposed"]


def group_amax(x_TK: torch.Tensor, gid_T: torch.Tensor, num_groups: int) -> torch.Tensor:
    """fp32 ``max|x|`` per group (0 for empty groups; NaN if the group holds a NaN).

    Rows with ``gid == num_groups`` (past the last offset) land in a dropped bin.  One
    ``aminmax`` pass reads ``x`` once (no ``abs`` copy)."""
    if x_TK.shape[0] == 0:
        return x_TK.new_zeros(num_groups, dtype=torch.float32)
    mn, mx = torch.aminmax(x_TK, dim=1)
    row_T = torch.maximum(mx.float(), -mn.float())  # maximum propagates NaN
    nan_T = torch.isnan(row_T)
    # scatter_reduce's NaN handling is not specified: carry NaN in a separate flag.
    amax = row_T.new_zeros(num_groups + 1).scatter_reduce_(
        0, gid_T, torch.where(nan_T, torch.full_like(row_T, float("inf")), row_T), "amax")
    has_nan = row_T.new_zeros(num_groups + 1).scatter_reduce_(0, gid_T, nan_T.float(), "amax")
    # clone: its own allocation, not a view of the G+1 scratch buffer
    return torch.where(has_nan > 0, torch.full_like(amax, float("nan")), amax)[:num_groups].clone()


def _column_sources(offs_G: torch.Tensor, coffs_G: torch.Tensor, Tc: int):
    """``(src_Tc, cgid_Tc)``: source row of each padded column (-1 for padding) and
    the column's group (``G`` past the last group)."""
    zero = offs_G.new_zeros(1)
    sizes_G = group_sizes(offs_G)
    start_G1 = torch.cat([offs_G - sizes_G, zero]).long()
    size_G1 = torch.cat([sizes_G, zero]).long()
    cstart_G1 = torch.cat([torch.cat([zero, coffs_G[:-1]]), coffs_G[-1:]]).long()
    cgid = group_ids(coffs_G, Tc)
    pos = torch.arange(Tc, device=offs_G.device) - cstart_G1[cgid]
    valid = pos < size_G1[cgid]
    return torch.where(valid, start_G1[cgid] + pos, torch.full_like(pos, -1)), cgid


def _pad_transpose(x_TK: torch.Tensor, src_Tc: torch.Tensor) -> torch.Tensor:
    """``(K, Tc)``: column ``c`` is row ``src[c]`` of ``x``, or zeros where ``src < 0``.

    A coalesced row gather into ``(Tc, K)`` followed by one transpose copy (a scatter
    along dim 1 is uncoalesced and far slower on the GPU)."""
    T, K = x_TK.shape
    if T == 0:
        return x_TK.new_zeros(K, src_Tc.shape[0])
    valid = src_Tc >= 0
    rows = x_TK.index_select(0, src_Tc.clamp(min=0))
    rows = torch.where(valid.unsqueeze(1), rows, x_TK.new_zeros(()))
    return rows.t().contiguous()


def fp8_rows_torch(x_TK, gid_T, scale_G, dtype):
    """Reference FP8 codes: ``saturate(fp32(x) * scale[group])``; rows of no group -> 0."""
    scale_T = torch.cat([scale_G, scale_G.new_zeros(1)])[gid_T]
    xv = torch.where((gid_T < scale_G.shape[0]).unsqueeze(1), x_TK.float(), x_TK.new_zeros(()).float())
    return formats.to_fp8_saturated(xv * scale_T.unsqueeze(1), dtype)


def _fp8_rows(x_TK, gid_T, scale_G, dtype):
    if x_TK.is_cuda and x_TK.shape[0] > 0:
        from ._triton_quant import fp8_rows_triton
        return fp8_rows_triton(x_TK, gid_T, scale_G, dtype)
    return fp8_rows_torch(x_TK, gid_T, scale_G, dtype)


def fp8_cols_torch(x_TK, src_Tc, cscale_Tc, dtype):
    """Reference FP8 columnwise codes ``(K, Tc)``: column ``c`` is
    ``saturate(fp32(x[src[c]]) * cscale[c])``, zeros where ``src[c] < 0``."""
    cols = _pad_transpose(x_TK.float(), src_Tc)
    return formats.to_fp8_saturated(cols * cscale_Tc.unsqueeze(0), dtype)


def _fp8_cols(x_TK, src_Tc, cscale_Tc, dtype):
    if x_TK.is_cuda and x_TK.shape[0] > 0:
        from ._triton_quant import fp8_cols_triton
        return fp8_cols_triton(x_TK, src_Tc, cscale_Tc, dtype)
    return fp8_cols_torch(x_TK, src_Tc, cscale_Tc, dtype)


def fp8_weight_transposed(w_GNK: torch.Tensor, scale_G: torch.Tensor,
                          dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """``(G, K, N)`` FP8 codes of ``w[g].T`` with the per-group ``scale`` (the same codes
    as the rowwise quantization of ``w``, transposed per group; Triton on CUDA)."""
    w_GNK = w_GNK.contiguous()
    if w_GNK.is_cuda and w_GNK.numel() > 0:
        from ._triton_quant import fp8_weight_t_triton
        return fp8_weight_t_triton(w_GNK, scale_G, dtype)
    q = formats.to_fp8_saturated(w_GNK.float() * scale_G.view(-1, 1, 1), dtype)
    return q.view(torch.uint8).transpose(1, 2).contiguous().view(dtype)


def mx_blocks(x_RC: torch.Tensor):
    """MXFP8 along the last dim: ``(codes (R, C) e4m3, E8M0 (R, C/32) uint8)``."""
    R, C = x_RC.shape
    xb = x_RC.float().reshape(R, C // 32, 32)
    code = formats.mx_amax_to_e8m0(xb.abs().amax(-1) if R else xb.new_zeros(0, C // 32))
    q = formats.to_fp8_saturated(xb / formats.e8m0_to_scale_inv(code).unsqueeze(-1))
    return q.reshape(R, C), code


def nvfp4_blocks(x_RC: torch.Tensor, s_enc_blk: torch.Tensor):
    """NVFP4 along the last dim with per-block ``S_enc`` (broadcastable to (R, C/16)):
    ``(packed codes (R, C/2) uint8, block scales (R, C/16) e4m3)``."""
    R, C = x_RC.shape
    xb = x_RC.float().reshape(R, C // 16, 16)
    bamax = xb.abs().amax(-1) if R else xb.new_zeros(0, C // 16)
    s = s_enc_blk.expand(R, C // 16)
    bs = formats.nvfp4_block_scale(bamax, s)
    bsf = bs.float().unsqueeze(-1)
    v = (xb * s.unsqueeze(-1)) / bsf
    v = torch.where(bsf == 0, torch.zeros_like(v), v)
    codes = formats.e2m1_encode(v).reshape(R, C)
    return formats.pack_nibbles(codes), bs


def group_quantize(x_TK: torch.Tensor, quantizer, split_sizes: Optional[SplitSizes] = None, *,
                   offsets: Optional[torch.Tensor] = None, validate: bool = False):
    """Quantize the row groups of ``x_TK`` with ``quantizer``; no host sync.

    Args:
        x_TK: 2-D floating tensor.
        quantizer: one of the quantizer dataclasses.
        split_sizes: rows per group: a host list / CPU integer tensor (always checked:
            ``ValueError`` for a negative size or a sum != ``T``), or an integer tensor on
            ``x``'s device (checked only with ``validate=True``, which syncs the host;
            unchecked, negative sizes count as 0 and the offsets are clamped to ``T``).
            The rule of :func:`moe_offload.tensor.row_groups.offsets_from_splits`.
        offsets: alternatively, int32 end offsets on ``x``'s device (trusted as given).
        validate: check device ``split_sizes`` (syncs).

    Returns a :class:`GroupedTensorStorage` (``quantizer.internal``) or a
    :class:`GroupedTensor`.  Rows past the last offset encode as zeros.
    """
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be one of {[q.__name__ for q in Quantizer]}, got "
                        f"{type(quantizer).__name__}")
    if not isinstance(x_TK, torch.Tensor) or x_TK.dim() != 2 or not x_TK.dtype.is_floating_point:
        raise TypeError("group_quantize: x must be a 2-D floating-point tensor")
    if x_TK.dtype in formats.FP8_MAX:
        raise TypeError("group_quantize: x is already FP8")
    T, K = x_TK.shape
    fmt = quantizer.fmt
    block = {"fp8": 1, "mxfp8": 32, "nvfp4": 16}[fmt]
    if K == 0 or K % block:
        raise ValueError(f"group_quantize: {fmt} needs the last dim to be a positive multiple of "
                         f"{block}, got {K}")
    if (split_sizes is None) == (offsets is None):
        raise ValueError("group_quantize: pass exactly one of split_sizes and offsets")
    if offsets is None:
        offs_G = offsets_from_splits(split_sizes, T, x_TK.device, validate=validate)
    else:
        offs_G = offsets
    if offs_G.dtype != torch.int32 or offs_G.dim() != 1 or offs_G.numel() == 0:
        raise ValueError("group_quantize: offsets must be a non-empty 1-D int32 tensor")
    G = offs_G.shape[0]
    x_TK = x_TK.contiguous()
    if fmt == "fp8" and _fused_ok(x_TK, G):
        # CUDA: 3 launches (zeros, amax, cast) instead of ~50 ops; same bits
        from .fp8_kernels import fp8_group_quantize_fused
        parts = fp8_group_quantize_fused(x_TK, offs_G, quantizer.dtype, quantizer.power_2_scale,
                                         quantizer.rowwise, quantizer.columnwise)
        parts["offsets"] = offs_G
        if not quantizer.rowwise:
            parts["rowwise_scale_inv"] = None
        return _wrap(GroupedTensorStorage(fmt, (T, K), x_TK.dtype, G, COL_ALIGN[fmt],
                                          fp8_dtype=quantizer.dtype, **parts), quantizer)
    col_align = COL_ALIGN[fmt]
    Tc = columnwise_width(T, G, col_align)
    gid_T = group_ids(offs_G, T)
    valid_T1 = (gid_T < G).unsqueeze(1)
    parts = {"offsets": offs_G}
    need_cols = quantizer.columnwise
    if need_cols:
        sizes_G = group_sizes(offs_G)
        coffs_G = torch.cumsum((sizes_G + (col_align - 1)) // col_align * col_align, 0, dtype=torch.int32)
        parts["columnwise_offsets"] = coffs_G
        src_Tc, cgid_Tc = _column_sources(offs_G, coffs_G, Tc)

    if fmt == "fp8":
        amax_G = group_amax(x_TK, gid_T, G)
        scale_G = formats.amax_to_scale(amax_G, quantizer.dtype, quantizer.power_2_scale)
        scale_inv_G = scale_G.reciprocal()
        parts["amax"] = amax_G
        if quantizer.rowwise:
            parts["rowwise_data"] = _fp8_rows(x_TK, gid_T, scale_G, quantizer.dtype).reshape(-1)
            parts["rowwise_scale_inv"] = scale_inv_G
        if quantizer.columnwise:
            # the same codes as rowwise (same per-group scale), written transposed
            cscale_Tc = torch.cat([scale_G, scale_G.new_zeros(1)])[cgid_Tc]
            parts["columnwise_data"] = _fp8_cols(x_TK, src_Tc, cscale_Tc, quantizer.dtype).reshape(-1)
            parts["columnwise_scale_inv"] = scale_inv_G.clone()
    else:
        xv_TK = torch.where(valid_T1, x_TK, x_TK.new_zeros(()))
        if fmt == "mxfp8":
            if quantizer.rowwise:
                q, s = mx_blocks(xv_TK)
                parts["rowwise_data"], parts["rowwise_scale_inv"] = q.reshape(-1), s.reshape(-1)
            if need_cols:
                q, s = mx_blocks(_pad_transpose(xv_TK, src_Tc))
                parts["columnwise_data"], parts["columnwise_scale_inv"] = q.reshape(-1), s.reshape(-1)
        else:
            amax_G = group_amax(xv_TK, gid_T, G)
            parts["amax"] = amax_G
            s_enc_G1 = torch.cat([formats.nvfp4_global_scale(amax_G), amax_G.new_ones(1)])
            if quantizer.rowwise:
                q, s = nvfp4_blocks(xv_TK, s_enc_G1[gid_T].unsqueeze(1))
                parts["rowwise_data"], parts["rowwise_scale_inv"] = q.reshape(-1), s.reshape(-1)
            if need_cols:
                s_blk = s_enc_G1[cgid_Tc].view(-1, 16)[:, 0].unsqueeze(0)
                q, s = nvfp4_blocks(_pad_transpose(xv_TK, src_Tc), s_blk)
                parts["columnwise_data"], parts["columnwise_scale_inv"] = q.reshape(-1), s.reshape(-1)
    storage = GroupedTensorStorage(fmt, (T, K), x_TK.dtype, G, col_align,
                                   fp8_dtype=quantizer.dtype if fmt == "fp8" else torch.float8_e4m3fn,
                                   **parts)
    return _wrap(storage, quantizer)


def _fused_ok(x_TK: torch.Tensor, num_groups: int) -> bool:
    """The fused FP8 kernels apply (CUDA, bf16 input, not too many groups)."""
    return x_TK.is_cuda and x_TK.dtype == torch.bfloat16 and num_groups <= MAX_FUSED_GROUPS


def _wrap(storage: GroupedTensorStorage, quantizer):
    if quantizer.internal:
        return storage
    from .grouped_tensor import GroupedTensor
    return GroupedTensor.from_storage(storage)
