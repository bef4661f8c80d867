"""Quantized compute of the grouped layers: FP8 (H100 kernel), MXFP8/NVFP4 (emulated).

Shape legend: ``T`` rows, ``K`` in, ``N`` out features, ``G`` groups, ``H`` hidden,
``F`` ffn hidden, ``X`` fc1 width (``2F`` gated).  ``offs_G``: int32 end offsets.

Two paths, chosen per GEMM (:func:`_fast_ok`):

- **FP8 on sm90+ ("fast")**: ``torch._scaled_grouped_mm`` with E4M3 operands and fp32
  rowwise scales.  Activations and gradients use per-group current scaling (the group's
  ``scale_inv`` gathered to its rows on the device); weights use one scale per expert.
  All six GEMMs of a linear's forward+backward run in FP8, including the weight
  gradient (2D x 2D form: the columnwise = per-group transposed codes of ``dy`` and
  ``x``).  Why FP8 wgrad: with bf16 at 756 and FP8 at 1037 TFLOP/s (ANCHORS.md), doing
  4 of 6 GEMMs in FP8 costs ``4/1037 + 2/756 = 0.00650`` vs ``6/756 = 0.00794`` per
  unit -> at most 1.22x; all six in FP8 allow 1.37x, the only way to reach >= 1.3x.
  Kernel facts probed on torch 2.11/H100 (``scripts/bench_fp8.py --probe``): the 2D x 3D
  form accepts any group sizes (including 0); the 2D x 2D form needs every group's
  token count to be a multiple of 16 ("strides should be multiple of 16 bytes"), which
  the columnwise layout provides (groups padded with zero columns to 16, static width
  ``T + 15G``, no sync).  Gradients are E4M3 as well: the kernel takes E4M3 only.
  Quantization on this path is fused (:mod:`moe_offload.tensor._triton_fused`): per
  activation one amax kernel and one cast kernel writing rowwise and columnwise codes
  plus the GEMM's scale vectors; per weight one amax and one cast writing the rowwise
  and the per-expert transposed codes; in the MLP, one kernel writes ``h``'s saved
  codes, ``act(h) * p`` and its amax, and the backward activation kernel reads ``h``'s
  codes directly and reduces the amaxes of ``out`` and ``d_h`` on the fly.  All codes
  and scales are bit-identical to the torch reference (tests/tensor/test_fused_cuda.py).

  Measured (``scripts/bench_fp8.py --profile``, H100 80GB HBM3, torch 2.11, T=16384,
  H=4096, F=2048, E=8, SwiGLU, no probs; two leases, the second slower overall): fwd+bwd
  FP8 3.99 / 4.17 ms vs bf16 3.80 / 3.93 ms (0.95x / 0.94x; 12.3 ms = 0.30x before the
  fused kernels).  Breakdown on the first lease, each piece alone (ms): GEMMs 2.65 (fc1
  fwd 0.54, dgrad 0.54, wgrad 0.61; fc2 0.33, 0.29, 0.35); weights 0.53 (w1 0.34, w2
  0.20); x 0.25; fused act fwd 0.20 + amax(h) ~0.05; a rows ~0.08; dy 0.24; fused act
  bwd 0.19; a cols ~0.12; dh ~0.20.  Host issue time 2.6 ms per step (3.5 ms on the
  second lease): GPU-bound, but with little slack.

  **Why >= 1.3x (<= 2.85 ms) is out of reach here** (arithmetic; bytes at ~3 TB/s):
  the six FP8 GEMMs alone take 2.65 ms measured (2.38 ms even at the best 1038
  TFLOP/s of the fc1 forward: 2474 GFLOP per step).  Quantizing the two weights needs
  an amax read (402 MB) and a cast read + rowwise + transposed write (804 MB): 0.40 ms
  -> 3.05 ms > 2.85 ms before any activation is touched.  The unavoidable activation
  passes (x, dy, dh: amax 128 MB + cast 256 MB each; h: amax 128 + fused act 256; a:
  cast 96 twice; act backward 320) add ~2.0 GB = ~0.68 ms, for a floor of ~3.7 ms
  (1.03x) per step with per-step weight quantization, ~3.3 ms (1.14x) with the weight
  codes reused across micro-batches.  bf16 pays none of these passes (its 3.80 ms are
  3.36 ms of GEMMs at 736 TFLOP/s plus the activation).  Reaching 1.3x needs the
  quantization fused into the GEMM epilogues/prologues (amax of ``h`` from the fc1
  epilogue, codes written by the producer), which ``torch._scaled_grouped_mm`` does not
  offer.
- **Emulated** (MXFP8, NVFP4 everywhere; FP8 on CPU, non-bf16 inputs or feature dims
  that are not multiples of 16): quantize, dequantize to fp32, fp32 grouped GEMM.  The
  numerics are those of the format exactly (up to fp32 accumulation).

What is saved (``GroupedTensorStorage``, ``internal=True``, through
``moe_offload.offload.saving``), bytes per token per layer, vs bf16:

==========================  ====================  ================  =================
layer                       bf16                  FP8               MXFP8 / NVFP4
==========================  ====================  ================  =================
GroupedLinear (K in)        x: 2K                 x col: K          K(1+1/32) / K(9/16)
GroupedMLP (H, X=2F gated)  x + h: 2H + 2X        H + X  (0.50x)    (H+X)(33/32) / (H+X)(9/16)
==========================  ====================  ================  =================

(plus 4-byte per-group scales and offsets, the fp8 column padding ``<= 15G`` columns,
and ``probs``).  Only the usage backward needs is kept: ``x`` columnwise (wgrad),
``h`` rowwise (the activation backward recomputes ``act(h)`` from the dequantized
``h``); ``act(h)`` itself is not saved.  Quantized weights are saved too, marked
``mark_not_offload`` (workspaces, never offloaded).  ``start_offload`` is called on each
saved activation right after it is quantized.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..offload.marks import mark_not_offload, start_offload
from ..offload.saving import prepare_for_saving, restore_from_saved
from ..tensor.formats import amax_to_scale
from ..tensor.group_quantize import MAX_FUSED_GROUPS, fp8_weight_transposed, group_quantize
from ..tensor.grouped_storage import GroupedTensorStorage
from ..tensor.row_groups import group_ids as row_group_ids
from ..tensor.quantizers import Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer
from ._grouped_gemm import group_row_sum, grouped_mm, grouped_mm_wgrad
from .activations import act_backward, act_forward, check_activation, is_gated

__all__ = ["quantized_grouped_linear", "quantized_grouped_mlp", "RECIPES", "fast_path_available"]

RECIPES = ("fp8", "mxfp8", "nvfp4")
_FAST_ALIGN = 16


def _quantizer(recipe: str, rowwise: bool, columnwise: bool):
    if recipe == "fp8":
        return Float8CurrentScalingQuantizer(rowwise=rowwise, columnwise=columnwise)
    if recipe == "mxfp8":
        return MXFP8Quantizer(rowwise=rowwise, columnwise=columnwise)
    if recipe == "nvfp4":
        return NVFP4Quantizer(rowwise=rowwise, columnwise=columnwise)
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")


def fast_path_available(device: torch.device) -> bool:
    """True where ``torch._scaled_grouped_mm`` runs FP8 (CUDA sm90+)."""
    return device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm") and _sm90(device.index)


@functools.lru_cache(maxsize=None)
def _sm90(index: Optional[int]) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def _fast_ok(recipe: str, x: torch.Tensor, *dims: int) -> bool:
    return (recipe == "fp8" and x.dtype == torch.bfloat16 and fast_path_available(x.device)
            and all(d % _FAST_ALIGN == 0 and d > 0 for d in dims))


def _use_fused(t: torch.Tensor, num_groups: int) -> bool:
    return t.is_cuda and t.dtype == torch.bfloat16 and num_groups <= MAX_FUSED_GROUPS


# --------------------------------------------------------------------------- quantized operands
@dataclass
class _QAct:
    """A quantized activation/gradient.  ``row_scale_T`` (``scale_inv`` per row, for the
    rowwise GEMM operand) and ``k_scale_GK`` (``scale_inv`` per (group, feature), flat,
    for the wgrad operand) are set on the fast path only."""
    q: GroupedTensorStorage
    row_scale_T: Optional[torch.Tensor] = None
    k_scale_GK: Optional[torch.Tensor] = None


@dataclass
class _QWeight:
    """A quantized ``(G, N, K)`` weight.  Fast: ``codes_GNK`` with ``scale_GN`` (forward)
    and the per-expert transposed ``codes_t_GKN`` with ``scale_GK`` (dgrad); emulated:
    the storage ``q`` (columnwise usage for the dgrad)."""
    q: Optional[GroupedTensorStorage] = None
    codes_GNK: Optional[torch.Tensor] = None
    scale_GN: Optional[torch.Tensor] = None
    codes_t_GKN: Optional[torch.Tensor] = None
    scale_GK: Optional[torch.Tensor] = None


def _q(x_TK, recipe, offs_G, rowwise, columnwise, fast=False, amax_bits=None) -> Optional[_QAct]:
    """Quantize ``x`` per group.  Fast + CUDA: the fused kernels, which also write the
    GEMM scale vectors (3 launches); elsewhere ``group_quantize`` and torch gathers
    (same values).  ``amax_bits``: group amaxes already reduced by a fused producer
    (CUDA fast path only)."""
    if not (rowwise or columnwise):
        return None
    G = offs_G.shape[0]
    if fast and _use_fused(x_TK, G):
        from ..tensor._triton_fused import fp8_group_quantize_fused
        T, K = x_TK.shape
        x_TK = x_TK.contiguous()
        parts = fp8_group_quantize_fused(x_TK, offs_G, torch.float8_e4m3fn, False, rowwise, columnwise,
                                         row_scale=rowwise, k_scale=columnwise, amax_bits=amax_bits)
        rs, ks = parts.pop("row_scale_T", None), parts.pop("k_scale_GK", None)
        q = GroupedTensorStorage("fp8", (T, K), x_TK.dtype, G, 16, offsets=offs_G, **parts)
        return _QAct(q, rs, ks)
    q = group_quantize(x_TK, _quantizer(recipe, rowwise, columnwise), offsets=offs_G)
    if not fast:
        return _QAct(q)
    rs = ks = None
    if rowwise:
        gid_T = row_group_ids(offs_G, x_TK.shape[0])
        rs = torch.cat([q.rowwise_scale_inv, q.rowwise_scale_inv.new_ones(1)])[gid_T].contiguous()
    if columnwise:
        ks = q.columnwise_scale_inv.repeat_interleave(x_TK.shape[1])
    return _QAct(q, rs, ks)


def _quantize_weight(w_GNK: torch.Tensor, recipe: str, fast: bool, need_dgrad: bool) -> _QWeight:
    """Quantize a ``(G, N, K)`` weight as ``G`` groups of ``N`` rows (one scale per expert).

    Fast: the rowwise codes (forward) and, if ``need_dgrad``, the same codes transposed
    per expert (the column-major dgrad operand ``_scaled_grouped_mm`` wants), from one
    read of the weight on CUDA (fused kernel, 3 launches).  Emulated: the storage
    (columnwise = blocks along N for the dgrad).  All are weight workspaces:
    ``mark_not_offload``.
    """
    G, N, K = w_GNK.shape
    w = w_GNK.detach()
    if fast and _use_fused(w, G):
        from ..tensor._triton_fused import fp8_weight_quantize_fused
        o = fp8_weight_quantize_fused(w.contiguous(), torch.float8_e4m3fn, False, need_dgrad)
        qw = _QWeight(codes_GNK=o["rowwise_data"].view(G, N, K), scale_GN=o["n_scale_GN"].view(G, N),
                      codes_t_GKN=o.get("w_t_GKN"), scale_GK=o.get("k_scale_GK"))
    else:
        offs = torch.arange(N, (G + 1) * N, N, device=w.device, dtype=torch.int32)
        wq = group_quantize(w.reshape(G * N, K), _quantizer(recipe, True, need_dgrad and not fast),
                            offsets=offs)
        if not fast:
            qw = _QWeight(q=wq)
        else:
            sinv = wq.rowwise_scale_inv
            qw = _QWeight(codes_GNK=wq.rowwise_data.view(G, N, K),
                          scale_GN=sinv.unsqueeze(1).expand(G, N).contiguous())
            if need_dgrad:
                qw.codes_t_GKN = fp8_weight_transposed(w, amax_to_scale(wq.amax))
                qw.scale_GK = sinv.unsqueeze(1).expand(G, K).contiguous()
    mark_not_offload(qw.q, qw.codes_GNK, qw.scale_GN, qw.codes_t_GKN, qw.scale_GK)
    return qw


def _weight_to_save(qw: _QWeight, fast: bool):
    """What the dgrad needs of a quantized weight, as objects for prepare_for_saving."""
    if fast:
        return qw.codes_t_GKN, qw.scale_GK
    qw.q.update_usage(rowwise=False)
    return qw.q, None


def _weight_from_saved(a, b, fast: bool) -> _QWeight:
    return _QWeight(codes_t_GKN=a, scale_GK=b) if fast else _QWeight(q=a)


def _cover_all_rows(offs_G: torch.Tensor, T: int) -> torch.Tensor:
    """Offsets whose last group ends at ``T`` (on the device, no sync).

    ``_scaled_grouped_mm`` leaves rows past ``offs[-1]`` uninitialized; masking them
    afterwards costs a full pass over the output.  Instead the last group absorbs the
    tail rows: their FP8 codes are zero (``group_quantize`` zeroes rows of no group), so
    their outputs are exactly zero."""
    return torch.cat([offs_G[:-1], offs_G.new_full((1,), T)])


def _add_bias(y_TN, bias_GN, offs_G):
    if bias_GN is None:
        return y_TN
    gid_T = row_group_ids(offs_G, y_TN.shape[0])
    b = torch.cat([bias_GN, bias_GN.new_zeros(1, bias_GN.shape[1])]).index_select(0, gid_T)
    return y_TN + b.to(y_TN.dtype)


# --------------------------------------------------------------------------- GEMMs
def _fwd_mm(xa: _QAct, qw: _QWeight, offs_G, cover_G, G, N, fast, out_dtype):
    """``y[rows of g] = x @ W[g].T`` -> ``(T, N)``.  ``cover_G``: :func:`_cover_all_rows`."""
    T, K = xa.q.shape
    if fast:
        x_TK, _ = xa.q.rowwise_2d()
        y = torch._scaled_grouped_mm(x_TK, qw.codes_GNK.transpose(1, 2), xa.row_scale_T, qw.scale_GN,
                                     offs=cover_G, out_dtype=torch.bfloat16)
        return y.to(out_dtype)
    x = xa.q.dequantize(torch.float32, "rowwise")
    w = qw.q.dequantize(torch.float32, "rowwise").view(G, N, K)
    return grouped_mm(x, w.transpose(1, 2), offs_G).to(out_dtype)


def _dgrad_mm(dya: _QAct, qw: _QWeight, offs_G, cover_G, G, K, fast, out_dtype):
    """``dx[rows of g] = dy @ W[g]`` -> ``(T, K)``."""
    T, N = dya.q.shape
    if fast:
        dy_TN, _ = dya.q.rowwise_2d()
        dx = torch._scaled_grouped_mm(dy_TN, qw.codes_t_GKN.transpose(1, 2), dya.row_scale_T,
                                      qw.scale_GK.view(G, K), offs=cover_G, out_dtype=torch.bfloat16)
        return dx.to(out_dtype)
    dy = dya.q.dequantize(torch.float32, "rowwise")
    w = qw.q.dequantize(torch.float32, "columnwise").view(G, N, K)
    return grouped_mm(dy, w, offs_G).to(out_dtype)


def _wgrad_mm(dya: _QAct, xa: _QAct, offs_G, G, fast, out_dtype):
    """``dW[g] = dy[rows of g].T @ x[rows of g]`` -> ``(G, N, K)``; empty groups zero."""
    if fast:
        dy_NTc, _ = dya.q.columnwise_2d()
        x_KTc, _ = xa.q.columnwise_2d()
        dw = torch._scaled_grouped_mm(dy_NTc, x_KTc.t(), dya.k_scale_GK, xa.k_scale_GK,
                                      offs=dya.q.columnwise_offsets, out_dtype=torch.bfloat16)
        if dw.is_cuda and dw.is_contiguous():
            # programs of non-empty groups exit at once (torch.where: a full pass over dw)
            from ._triton_act import triton_zero_empty_groups_
            dw = triton_zero_empty_groups_(dw, offs_G)
        else:
            sizes_G = torch.diff(offs_G, prepend=offs_G.new_zeros(1))
            dw = torch.where((sizes_G > 0).view(G, 1, 1), dw, dw.new_zeros(()))
        return dw.to(out_dtype)
    dy = dya.q.dequantize(torch.float32, "columnwise")
    x = xa.q.dequantize(torch.float32, "columnwise")
    return grouped_mm_wgrad(dy, x, offs_G).to(out_dtype)


def _save_act(xa: Optional[_QAct]):
    """``(storage, k_scale)`` of a saved activation (the scale vector is metadata)."""
    if xa is None:
        return None, None
    mark_not_offload(xa.k_scale_GK)
    return xa.q, xa.k_scale_GK


# --------------------------------------------------------------------------- linear
class _QuantizedGroupedLinearFn(torch.autograd.Function):
    """Saves ``x`` quantized (columnwise only, for wgrad) and the quantized weight."""

    @staticmethod
    def forward(ctx, x_TK, weight_GNK, bias_GN, offs_G, recipe: str):
        G, N, K = weight_GNK.shape
        T = x_TK.shape[0]
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fast = _fast_ok(recipe, x_TK, K, N)
        mark_not_offload(weight_GNK, bias_GN)
        cover_G = _cover_all_rows(offs_G, T) if fast else None
        xa = _q(x_TK, recipe, offs_G, True, need_dw, fast)
        start_offload(xa.q)
        qw = _quantize_weight(weight_GNK, recipe, fast, need_dx)
        y = _add_bias(_fwd_mm(xa, qw, offs_G, cover_G, G, N, fast, x_TK.dtype), bias_GN, offs_G)
        if need_dw:
            xa.q.update_usage(rowwise=False)
        w_a, w_b = _weight_to_save(qw, fast) if need_dx else (None, None)
        xs, xk = _save_act(xa if need_dw else None)
        tensors, ctx.state = prepare_for_saving(xs, xk, w_a, w_b, offs_G, cover_G)
        ctx.save_for_backward(*tensors)
        ctx.meta = (recipe, fast, G, N, K, x_TK.dtype, weight_GNK.dtype, bias_GN is not None)
        return y

    @staticmethod
    def backward(ctx, dy_TN):
        xs, xk, w_a, w_b, offs_G, cover_G = restore_from_saved(ctx.state, ctx.saved_tensors)
        recipe, fast, G, N, K, x_dtype, w_dtype, has_bias = ctx.meta
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy_TN = dy_TN.contiguous()
        dya = _q(dy_TN, recipe, offs_G, need_dx, need_dw, fast)
        dx = _dgrad_mm(dya, _weight_from_saved(w_a, w_b, fast), offs_G, cover_G, G, K, fast,
                       x_dtype) if need_dx else None
        dw = _wgrad_mm(dya, _QAct(xs, None, xk), offs_G, G, fast, w_dtype) if need_dw else None
        db = group_row_sum(dy_TN, offs_G) if has_bias and need_db else None
        return dx, dw, db, None, None


def _check_recipe(recipe):
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")


def quantized_grouped_linear(x_TK: torch.Tensor, offs_G: torch.Tensor, weight_GNK: torch.Tensor,
                             bias_GN: Optional[torch.Tensor], recipe: str) -> torch.Tensor:
    """Grouped linear ``y[rows of g] = q(x) @ q(W[g]).T + b[g]`` in ``recipe``; ``(T, N)``.

    Differentiable w.r.t. ``x``, ``weight`` and ``bias``; gradients ``dy`` are quantized
    in the same format.  ``offs_G``: validated int32 end offsets on ``x``'s device.
    """
    _check_recipe(recipe)
    return _QuantizedGroupedLinearFn.apply(x_TK, weight_GNK, bias_GN, offs_G, recipe)


# --------------------------------------------------------------------------- MLP
class _QuantizedGroupedMLPFn(torch.autograd.Function):
    """``y = fc2(act(fc1(x)) * probs)``; saves ``x`` (columnwise) and ``h = fc1(x)``
    (rowwise) quantized, and recomputes ``act(h)`` from the dequantized ``h``."""

    @staticmethod
    def forward(ctx, x_TH, w1_GXH, b1_GX, w2_GHF, b2_GH, probs_T, offs_G, activation: str, recipe: str):
        G, X, H = w1_GXH.shape
        F_ = w2_GHF.shape[2]
        T = x_TH.shape[0]
        need = ctx.needs_input_grad
        need_bwd = any(need[:6])
        fast1 = _fast_ok(recipe, x_TH, H, X)
        fast2 = _fast_ok(recipe, x_TH, F_, H)
        mark_not_offload(w1_GXH, b1_GX, w2_GHF, b2_GH)
        cover_G = _cover_all_rows(offs_G, T) if (fast1 or fast2) else None
        xa = _q(x_TH, recipe, offs_G, True, need[1], fast1)
        start_offload(xa.q)
        w1q = _quantize_weight(w1_GXH, recipe, fast1, need[0])
        w2q = _quantize_weight(w2_GHF, recipe, fast2, need_bwd)
        h_TX = _add_bias(_fwd_mm(xa, w1q, offs_G, cover_G, G, X, fast1, x_TH.dtype), b1_GX, offs_G)
        if fast1 and fast2 and _use_fused(h_TX, G):
            # one kernel: h's saved FP8 codes, act(h) * p and its group amax
            from ._triton_act_fp8 import act_forward_fp8
            h_TX = h_TX.contiguous()
            a_TF, amax_a, h_parts = act_forward_fp8(h_TX, offs_G, probs_T, activation,
                                                    is_gated(activation), need_bwd)
            ha = _QAct(GroupedTensorStorage("fp8", (T, X), h_TX.dtype, G, 16, offsets=offs_G,
                                            **h_parts)) if need_bwd else None
            aa = _q(a_TF, recipe, offs_G, True, False, fast2, amax_bits=amax_a)
        else:
            ha = _q(h_TX, recipe, offs_G, need_bwd, False)
            a_TF = act_forward(h_TX, probs_T, activation)
            aa = _q(a_TF, recipe, offs_G, True, False, fast2)
        if ha is not None:
            start_offload(ha.q)
        y = _add_bias(_fwd_mm(aa, w2q, offs_G, cover_G, G, H, fast2, x_TH.dtype), b2_GH, offs_G)
        if need[1]:
            xa.q.update_usage(rowwise=False)
        w1a, w1b = _weight_to_save(w1q, fast1) if need[0] else (None, None)
        w2a, w2b = _weight_to_save(w2q, fast2) if need_bwd else (None, None)
        xs, xk = _save_act(xa if need[1] else None)
        tensors, ctx.state = prepare_for_saving(xs, xk, ha.q if need_bwd else None,
                                                w1a, w1b, w2a, w2b, probs_T, offs_G, cover_G)
        ctx.save_for_backward(*tensors)
        ctx.meta = (recipe, fast1, fast2, G, X, H, F_, activation, x_TH.dtype,
                    b1_GX is not None, b2_GH is not None)
        return y

    @staticmethod
    def backward(ctx, dy_TH):
        xs, xk, hq, w1a, w1b, w2a, w2b, probs_T, offs_G, cover_G = restore_from_saved(
            ctx.state, ctx.saved_tensors)
        recipe, fast1, fast2, G, X, H, F_, activation, dtype, has_b1, has_b2 = ctx.meta
        w1q = _weight_from_saved(w1a, w1b, fast1)
        w2q = _weight_from_saved(w2a, w2b, fast2)
        need = ctx.needs_input_grad
        dy_TH = dy_TH.contiguous()
        dya = _q(dy_TH, recipe, offs_G, True, need[3], fast2)
        d_a_TF = _dgrad_mm(dya, w2q, offs_G, cover_G, G, F_, fast2, dtype)
        amax_a = amax_dh = None
        if fast1 and fast2 and _use_fused(d_a_TF, G):
            # one kernel from h's FP8 codes (no dequantized copy), amaxes on the fly
            from ._triton_act_fp8 import act_backward_fp8
            d_h_TX, d_probs_T, a_TF, amax_a, amax_dh = act_backward_fp8(
                hq.rowwise_data, hq.rowwise_scale_inv, offs_G, hq.shape, dtype, probs_T, d_a_TF,
                activation, is_gated(activation))
        else:
            d_h_TX, d_probs_T, a_TF = act_backward(hq.dequantize(dtype), probs_T, d_a_TF, activation)
        dw2 = db2 = dw1 = db1 = dx = None
        if need[3]:
            aa = _q(a_TF, recipe, offs_G, False, True, fast2, amax_bits=amax_a)
            dw2 = _wgrad_mm(dya, aa, offs_G, G, fast2, dtype)
        if has_b2 and need[4]:
            db2 = group_row_sum(dy_TH, offs_G)
        dha = _q(d_h_TX, recipe, offs_G, need[0], need[1], fast1, amax_bits=amax_dh)
        if need[0]:
            dx = _dgrad_mm(dha, w1q, offs_G, cover_G, G, H, fast1, dtype)
        if need[1]:
            dw1 = _wgrad_mm(dha, _QAct(xs, None, xk), offs_G, G, fast1, dtype)
        if has_b1 and need[2]:
            db1 = group_row_sum(d_h_TX, offs_G)
        if not need[5]:
            d_probs_T = None
        return dx, dw1, db1, dw2, db2, d_probs_T, None, None, None


def quantized_grouped_mlp(x_TH: torch.Tensor, offs_G: torch.Tensor, fc1_weight: torch.Tensor,
                          fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
                          fc2_bias: Optional[torch.Tensor], probs_T: Optional[torch.Tensor],
                          activation: str, recipe: str) -> torch.Tensor:
    """Grouped expert MLP in ``recipe``: ``y = fc2(act(fc1(x)) * probs)`` -> ``(T, H)``.

    Every GEMM input (``x``, ``act(h) * probs``, the weights, and in backward ``dy`` and
    ``dh``) is quantized; the activation runs in ``x``'s dtype.  Differentiable w.r.t.
    ``x``, both weights and biases and ``probs``.
    """
    _check_recipe(recipe)
    check_activation(activation)
    return _QuantizedGroupedMLPFn.apply(x_TH, fc1_weight, fc1_bias, fc2_weight, fc2_bias, probs_T,
                                        offs_G, activation, recipe)
