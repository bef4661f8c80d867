"""Grouped GEMM helpers around ``torch._grouped_mm``, with no host sync.

Shape legend: ``T`` rows (tokens), ``K`` reduction features, ``N`` output features,
``G`` groups.  ``offs_G`` holds the int32 *end* offset of each group on the device;
group ``g`` owns rows ``offs[g-1]:offs[g]`` (group 0 starts at row 0).

What ``torch._grouped_mm`` needs (found by probing; see also the tests):

- **Kernels.**  CPU (torch 2.13): fp32, bf16 and fp16; fp64 is rejected.  CUDA
  (torch 2.11, H100): bf16 on sm90+ uses the CUTLASS kernel, sync-free.  fp16 and
  fp32 are accepted and correct but go through torch's fallback, which syncs the host
  ("called a synchronizing CUDA operation" under ``set_sync_debug_mode("error")``), so
  we do not call it for them (``_CUDA_KERNEL_DTYPES``).  Where there is no kernel
  we run :func:`_loop_mm` (CPU: one matmul per group with the offsets read on the
  host, which is free on CPU) or :func:`_masked_mm` (CUDA: one full-size matmul per
  group, masked by a device group-id vector; G times the FLOPs but no host sync).
- **16-byte stride rule.**  Every stride except the unit one must be a multiple of
  16 bytes ("strides should be multiple of 16 bytes"), e.g. K=7 in fp32 fails.  We
  zero-pad K and/or N up to the next multiple of ``16 / itemsize`` and slice the
  result.  Zero columns add nothing to the reduction, so results are exact.
- **Empty groups** in the 2D x 2D form: the H100 kernel did write zeros for an empty
  group (into memory pre-filled with NaN), but that is not documented, so
  :func:`zero_empty_groups` zeroes them anyway (about 16 us for a (8, 4096, 4096)
  output on CUDA: programs of non-empty groups exit at once).
- **Tail rows.**  Rows past ``offs[-1]`` of the 2D x 3D output are never written
  (uninitialized memory).  :func:`grouped_mm` zeroes them on the device unless the
  caller says the offsets cover every row (``zero_tail=False``).  The 2D x 2D (wgrad)
  form ignores rows past ``offs[-1]``.
- **wgrad group starts.**  In the 2D x 2D form the groups split the rows ``T``.  On
  CUDA (H100, torch 2.11) the first operand must then be passed as ``a.t()`` of a
  row-major ``(T, K)`` tensor (K contiguous): group starts are then whole rows, always
  16-byte aligned once K is padded, and uneven sizes (3, 0, 14, 23 rows) are exact.
  Passing a T-contiguous ``(K, T)`` tensor instead needs every group size times the
  item size to be a multiple of 16 bytes, else a device-side assert ("expected input
  tensor dynamic dimension byte size to be non-negative multiple of 16") kills the
  CUDA context.  :func:`grouped_mm_wgrad` always uses the row-major form, so
  arbitrary split sizes need no row padding.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..tensor.row_groups import group_ids, group_sizes, live_rows

__all__ = ["grouped_mm", "grouped_mm_wgrad", "group_row_sum", "add_group_bias", "zero_empty_groups"]

_STRIDE_BYTES = 16
# dtypes for which torch._grouped_mm on CUDA has a fast, sync-free kernel (sm90+).
_CUDA_KERNEL_DTYPES = (torch.bfloat16,)


# ----------------------------------------------------------------------------- kernels
def _align(dtype: torch.dtype) -> int:
    return max(1, _STRIDE_BYTES // torch.empty((), dtype=dtype).element_size())


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@functools.lru_cache(maxsize=None)
def _cpu_has_kernel(dtype: torch.dtype) -> bool:
    a = torch.zeros(4, 16, dtype=dtype)
    b = torch.zeros(2, 16, 16, dtype=dtype)
    try:
        torch._grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32))
        torch._grouped_mm(a.t(), a, offs=torch.tensor([2, 4], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _has_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return _cpu_has_kernel(dtype)
    if device.type == "cuda":
        return dtype in _CUDA_KERNEL_DTYPES and _cuda_capability(device.index) >= (9, 0)
    return False


@functools.lru_cache(maxsize=None)
def _cuda_capability(index) -> tuple:
    return torch.cuda.get_device_capability(index)


def _pad_2d(a_TK: torch.Tensor, k_to: int) -> torch.Tensor:
    """Row-major ``(T, k_to)`` copy/view of ``a`` with an aligned row stride.

    Rows that overlap (a broadcast ``x.expand(T, K)`` has row stride 0) are copied:
    the kernels reject such strides."""
    T, K = a_TK.shape
    al = _align(a_TK.dtype)
    if K == k_to and a_TK.stride(1) == 1 and a_TK.stride(0) % al == 0 and a_TK.stride(0) >= K \
            and a_TK.data_ptr() % _STRIDE_BYTES == 0:
        return a_TK
    return F.pad(a_TK, (0, k_to - K)).contiguous()


def _pad_3d(b_GKN: torch.Tensor, k_to: int, n_to: int) -> torch.Tensor:
    """``(G, k_to, N_to)`` zero-padded ``b`` keeping its layout (row- or column-major)."""
    G, K, N = b_GKN.shape
    al = _align(b_GKN.dtype)
    col_major = b_GKN.stride(1) == 1 and b_GKN.stride(2) != 1
    lead = b_GKN.stride(2) if col_major else b_GKN.stride(1)
    if K == k_to and N == n_to and lead % al == 0 and b_GKN.stride(0) % al == 0 \
            and (b_GKN.stride(1) == 1 or b_GKN.stride(2) == 1) \
            and b_GKN.data_ptr() % _STRIDE_BYTES == 0:
        return b_GKN
    if col_major:
        return F.pad(b_GKN.transpose(1, 2), (0, k_to - K, 0, n_to - N)).contiguous().transpose(1, 2)
    return F.pad(b_GKN, (0, n_to - N, 0, k_to - K)).contiguous()


def _loop_mm(a_TK, b_GKN, offs_G):
    """CPU fallback: one matmul per group, offsets read on the host (free on CPU)."""
    out = a_TK.new_zeros(a_TK.shape[0], b_GKN.shape[2])
    start = 0
    for g, end in enumerate(offs_G.tolist()):
        if end > start:
            out[start:end] = a_TK[start:end] @ b_GKN[g]
        start = end
    return out


def _masked_mm(a_TK, b_GKN, offs_G):
    """Device fallback without a host sync: G full matmuls, each kept on its own rows."""
    gid_T1 = group_ids(offs_G, a_TK.shape[0]).unsqueeze(1)
    out = a_TK.new_zeros(a_TK.shape[0], b_GKN.shape[2])
    for g in range(b_GKN.shape[0]):
        out = torch.where(gid_T1 == g, a_TK @ b_GKN[g], out)
    return out


def _loop_wgrad(a_TK, b_TN, offs_G):
    out = a_TK.new_zeros(offs_G.shape[0], a_TK.shape[1], b_TN.shape[1])
    start = 0
    for g, end in enumerate(offs_G.tolist()):
        if end > start:
            out[g] = a_TK[start:end].t() @ b_TN[start:end]
        start = end
    return out


def _masked_wgrad(a_TK, b_TN, offs_G):
    gid_T1 = group_ids(offs_G, a_TK.shape[0]).unsqueeze(1)
    zero = a_TK.new_zeros(())
    return torch.stack([torch.where(gid_T1 == g, a_TK, zero).t() @ b_TN
                        for g in range(offs_G.shape[0])])


# ----------------------------------------------------------------------------- public
def grouped_mm(a_TK: torch.Tensor, b_GKN: torch.Tensor, offs_G: torch.Tensor,
               zero_tail: bool = True) -> torch.Tensor:
    """``out[rows of g] = a[rows of g] @ b[g]`` -> ``(T, N)`` in ``a``'s dtype.

    ``b_GKN`` may be row-major or a transposed view of a ``(G, N, K)`` weight.  Rows
    past ``offs[-1]`` are zeroed when ``zero_tail`` (pass ``False`` only when the
    offsets are known to cover every row, or the tail is masked later).
    """
    T, K = a_TK.shape
    G, _, N = b_GKN.shape
    if T == 0 or N == 0:
        return a_TK.new_zeros(T, N)
    if not _has_kernel(a_TK.device, a_TK.dtype):
        fallback = _loop_mm if a_TK.device.type == "cpu" else _masked_mm
        return fallback(a_TK, b_GKN, offs_G)  # both write zeros past offs[-1]
    al = _align(a_TK.dtype)
    k_to, n_to = _round_up(max(K, 1), al), _round_up(N, al)
    out = torch._grouped_mm(_pad_2d(a_TK, k_to), _pad_3d(b_GKN, k_to, n_to), offs=offs_G)
    if n_to != N:
        out = out[:, :N]
    if zero_tail:
        out = torch.where(live_rows(offs_G[-1:], T), out, out.new_zeros(()))
    return out


def grouped_mm_wgrad(a_TK: torch.Tensor, b_TN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """``out[g] = a[rows of g].T @ b[rows of g]`` -> ``(G, K, N)``; empty groups give zeros.

    Rows past ``offs[-1]`` are ignored.
    """
    T, K = a_TK.shape
    N = b_TN.shape[1]
    G = offs_G.shape[0]
    if T == 0 or K == 0 or N == 0:
        return a_TK.new_zeros(G, K, N)
    if not _has_kernel(a_TK.device, a_TK.dtype):
        fallback = _loop_wgrad if a_TK.device.type == "cpu" else _masked_wgrad
        return fallback(a_TK, b_TN, offs_G)
    al = _align(a_TK.dtype)
    k_to, n_to = _round_up(K, al), _round_up(N, al)
    a, b = _pad_2d(a_TK, k_to), _pad_2d(b_TN, n_to)
    out = zero_empty_groups(torch._grouped_mm(a.t(), b, offs=offs_G), offs_G)
    if k_to != K or n_to != N:
        out = out[:, :K, :N]
    return out


def zero_empty_groups(out_GKN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """Write zeros into the groups with no rows (whatever the kernel left there).

    CUDA: a Triton kernel whose programs for non-empty groups exit after reading two
    offsets, so the cost does not scale with the (large) weight gradient.  CPU: one
    ``torch.where`` pass.
    """
    if out_GKN.is_cuda and out_GKN.is_contiguous():
        from ._triton_act import triton_zero_empty_groups_
        return triton_zero_empty_groups_(out_GKN, offs_G)
    return torch.where((group_sizes(offs_G) > 0).view(-1, 1, 1), out_GKN, out_GKN.new_zeros(()))


def group_row_sum(x_TN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """Per-group sum of rows, ``(G, N)`` in ``x``'s dtype (fp32 accumulation), no sync.

    Computed as the wgrad GEMM of a ones column with ``x`` (deterministic, unlike
    ``index_add_`` on CUDA).  Rows past ``offs[-1]`` are ignored.
    """
    al = _align(x_TN.dtype)
    ones_TA = x_TN.new_ones(x_TN.shape[0], al)
    return grouped_mm_wgrad(ones_TA, x_TN, offs_G)[:, 0, :]


def add_group_bias(y_TN: torch.Tensor, bias_GN: Optional[torch.Tensor], offs_G: torch.Tensor) -> torch.Tensor:
    """``y[r] += bias[group(r)]`` in place; rows past ``offs[-1]`` get no bias."""
    if bias_GN is None:
        return y_TN
    gid_T = group_ids(offs_G, y_TN.shape[0])            # G for rows past offs[-1]
    table_GN = torch.cat([bias_GN, bias_GN.new_zeros(1, bias_GN.shape[1])])
    return y_TN.add_(table_GN.index_select(0, gid_T))
