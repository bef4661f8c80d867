"""Quantizer configurations: small dataclasses, no tensors, no state.

A quantizer says *what* to produce (format, usages, container type); the work is done
by :func:`moe_offload.tensor.group_quantize` with the pure math of
:mod:`moe_offload.tensor.formats`.

Usages: ``rowwise`` codes are laid out like the input (scales along the last dim);
``columnwise`` codes are the per-group transposed layout that a GEMM reducing over the
token dimension (the weight gradient) consumes.  ``internal=True`` returns a
:class:`~moe_offload.tensor.GroupedTensorStorage` (what layers save); ``internal=False``
returns the :class:`~moe_offload.tensor.GroupedTensor` subclass (for external use).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FP8_MAX

__all__ = ["Float8CurrentScalingQuantizer", "MXFP8Quantizer", "NVFP4Quantizer", "Quantizer"]


def _check_usages(q) -> None:
    if not (q.rowwise or q.columnwise):
        raise ValueError(f"{type(q).__name__}: at least one of rowwise/columnwise must be True")


@dataclass(frozen=True)
class Float8CurrentScalingQuantizer:
    """FP8 with one current (just-in-time) scale per group: ``scale = fp8_max / amax``.

    Args:
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2`` (gradients).
        rowwise / columnwise: usages to produce (columnwise = same codes, transposed per
            group, groups padded to 16 columns).
        internal: return the storage object (True) or the tensor subclass (False).
        power_2_scale: round each scale down to a power of two (exact ``scale_inv``).
    """
    dtype: torch.dtype = torch.float8_e4m3fn
    rowwise: bool = True
    columnwise: bool = False
    internal: bool = True
    power_2_scale: bool = False

    fmt = "fp8"

    def __post_init__(self):
        if self.dtype not in FP8_MAX:
            raise TypeError(f"Float8CurrentScalingQuantizer: dtype must be one of {list(FP8_MAX)}, "
                            f"got {self.dtype}")
        _check_usages(self)


@dataclass(frozen=True)
class MXFP8Quantizer:
    """MXFP8: E4M3 codes with one E8M0 (power-of-two) scale per 32 elements.

    Rowwise blocks run along the last dim (needs ``K % 32 == 0``); columnwise blocks run
    along the tokens of one group (groups padded with zeros to 32, so no block straddles
    two groups).  Scales use RCEIL: ``scale_inv = 2^ceil(log2(block_amax / 448))``.
    """
    rowwise: bool = True
    columnwise: bool = False
    internal: bool = True

    fmt = "mxfp8"
    dtype = torch.float8_e4m3fn

    def __post_init__(self):
        _check_usages(self)


@dataclass(frozen=True)
class NVFP4Quantizer:
    """NVFP4: E2M1 codes (two a byte), one E4M3 scale per 16 elements, and one fp32
    ``S_enc = 448*6/amax`` per group (the grouped analogue of the per-tensor scale).

    Rowwise blocks run along the last dim (needs ``K % 16 == 0``); columnwise blocks run
    along the tokens of one group (padded to 16).  Rounding is to nearest even.
    """
    rowwise: bool = True
    columnwise: bool = False
    internal: bool = True

    fmt = "nvfp4"
    dtype = torch.uint8

    def __post_init__(self):
        _check_usages(self)


Quantizer = (Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer)
