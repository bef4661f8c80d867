"""Grouped quantized formats: FP8 current scaling, MXFP8, NVFP4.

- :mod:`.formats`: pure scaling math (tests call it directly);
- :mod:`.quantizers`: dataclass configurations;
- :mod:`.grouped_storage`: :class:`GroupedTensorStorage`, the plain container layers save;
- :mod:`.grouped_tensor`: :class:`GroupedTensor`, the tensor subclass for external use;
- :mod:`.group_quantize`: :func:`group_quantize`, one pass over all groups, no host sync;
- :mod:`.row_groups`: offsets from split sizes (one rule), group ids/sizes, live rows;
- :mod:`.fp8_kernels`: the fused FP8 Triton kernels (CUDA, imported lazily).
"""
from .formats import amax_to_scale, fp8_max, to_fp8_saturated
from .group_quantize import group_quantize
from .grouped_storage import GroupedTensorStorage
from .grouped_tensor import GroupedTensor
from .quantizers import Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer

__all__ = ["Float8CurrentScalingQuantizer", "MXFP8Quantizer", "NVFP4Quantizer",
           "GroupedTensorStorage", "GroupedTensor", "group_quantize", "amax_to_scale",
           "fp8_max", "to_fp8_saturated"]
