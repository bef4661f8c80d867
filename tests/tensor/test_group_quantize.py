"""Tests for moe_offload/tensor/group_quantize.py: argument checks (CPU).

(Numerics: tests/tensor/test_formats.py; CUDA kernels: test_group_quantize_cuda.py.)"""
import pytest
import torch

from moe_offload.tensor import (Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer,
                                group_quantize)

QUANTIZERS = [Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer]


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("splits, match", [
    (torch.tensor([-1, 7]), "negative"),       # CPU tensor: host splits, always checked
    (torch.tensor([4, 7]), "sum to 11, but x has 6 rows"),
    ([4, 7], "sum to 11, but x has 6 rows"),
    ([7, -1], "negative"),
])
def test_host_splits_are_validated(quantizer, splits, match):
    with pytest.raises(ValueError, match=match):
        group_quantize(torch.randn(6, 32), quantizer(columnwise=True), splits)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_empty_batch(quantizer):
    q = group_quantize(torch.zeros(0, 32), quantizer(columnwise=True), [0, 0])
    assert q.dequantize(torch.float32).shape == (0, 32)
    assert q.dequantize(torch.float32, "columnwise").shape == (0, 32)


@pytest.mark.cuda
def test_cuda_device_splits_validate():
    x = torch.randn(6, 32, device="cuda")
    with pytest.raises(ValueError, match="sum to 11"):
        group_quantize(x, MXFP8Quantizer(), torch.tensor([4, 7], device="cuda"), validate=True)
    with pytest.raises(ValueError, match="negative"):
        group_quantize(x, MXFP8Quantizer(), torch.tensor([-1, 7], device="cuda"), validate=True)
    # unchecked: clamped, memory-safe (rows past the clamped end encode as zeros)
    q = group_quantize(x, MXFP8Quantizer(), torch.tensor([4, 7], device="cuda"))
    assert q.offsets.tolist() == [4, 6]
