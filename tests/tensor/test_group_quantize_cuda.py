"""CUDA: Triton vs torch bit-identical, CUDA vs CPU bit-identical, no host sync."""
import pytest
import torch

from moe_offload.tensor import (Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer,
                                group_quantize)
from moe_offload.tensor.group_quantize import fp8_rows_torch
from moe_offload.tensor.grouped_storage import COMPONENTS
from moe_offload.tensor.row_groups import group_ids as row_group_ids

pytestmark = pytest.mark.cuda


def _x(T, K):
    x = torch.randn(T, K) * torch.exp2(torch.randint(-10, 10, (T, 1)).float())
    return x.to(torch.bfloat16).cuda()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("K", [64, 1000, 4096])
def test_triton_fp8_rows_bit_identical_to_torch(dtype, K):
    from moe_offload.tensor._triton_quant import fp8_rows_triton
    T, G = 777, 5
    x = _x(T, K)
    x[3, 7] = float("nan")
    offs = torch.tensor([100, 100, 300, 500, 700], dtype=torch.int32, device="cuda")  # tail 700..776
    gid = row_group_ids(offs, T)
    scale = torch.rand(G, device="cuda") * 100 + 0.01
    a = fp8_rows_triton(x, gid, scale, dtype)
    b = fp8_rows_torch(x, gid, scale, dtype)
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    assert torch.equal(nan_a, nan_b) and nan_a.sum() == 1
    assert torch.equal(a.view(torch.uint8)[~nan_a], b.view(torch.uint8)[~nan_b])
    assert torch.all(a[700:].float() == 0)


@pytest.mark.parametrize("quant", [Float8CurrentScalingQuantizer(columnwise=True),
                                   Float8CurrentScalingQuantizer(columnwise=True, power_2_scale=True),
                                   MXFP8Quantizer(columnwise=True), NVFP4Quantizer(columnwise=True)],
                         ids=["fp8", "fp8p2", "mxfp8", "nvfp4"])
def test_cuda_bit_identical_to_cpu(quant):
    sizes = [300, 0, 17, 700, 1]
    x = _x(sum(sizes), 256)
    qc = group_quantize(x, quant, torch.tensor(sizes, device="cuda"))
    qh = group_quantize(x.cpu(), quant, sizes)
    for name, a, b in zip(COMPONENTS, qc.component_tensors(), qh.component_tensors()):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a.cpu().view(torch.uint8) if a.element_size() == 1 else a.cpu(),
                               b.view(torch.uint8) if b.element_size() == 1 else b), name


@pytest.mark.parametrize("quant", [Float8CurrentScalingQuantizer(columnwise=True),
                                   MXFP8Quantizer(columnwise=True), NVFP4Quantizer(columnwise=True)],
                         ids=["fp8", "mxfp8", "nvfp4"])
def test_no_host_sync(quant):
    x = _x(1024, 256)
    splits = torch.tensor([100, 0, 500, 424], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = group_quantize(x, quant, splits)
        q.dequantize(torch.float32, "rowwise")
        q.dequantize(torch.float32, "columnwise")
        q.update_usage(rowwise=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_triton_weight_transpose_bit_identical_to_cpu():
    from moe_offload.tensor.group_quantize import fp8_weight_transposed
    w = (torch.randn(3, 80, 200) * 3).to(torch.bfloat16)
    s = torch.rand(3) * 50
    a = fp8_weight_transposed(w.cuda(), s.cuda())
    b = fp8_weight_transposed(w, s)
    assert a.shape == (3, 200, 80)
    assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


def test_triton_columnwise_kernel_bit_identical_to_torch_on_cuda():
    from moe_offload.tensor.group_quantize import fp8_cols_torch, _column_sources
    from moe_offload.tensor._triton_quant import fp8_cols_triton
    from moe_offload.tensor.grouped_storage import columnwise_width, padded_column_map
    T, K = 1000, 300
    x = _x(T, K)
    offs = torch.tensor([100, 100, 517, 900], dtype=torch.int32, device="cuda")
    Tc = columnwise_width(T, 4, 16)
    _, coffs = padded_column_map(offs, T, 16, Tc)
    src, cgid = _column_sources(offs, coffs, Tc)
    scale = torch.rand(4, device="cuda") * 10
    cs = torch.cat([scale, scale.new_zeros(1)])[cgid]
    a = fp8_cols_triton(x, src, cs, torch.float8_e4m3fn)
    b = fp8_cols_torch(x, src, cs, torch.float8_e4m3fn)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
