"""Quantize/dequantize vs float64 references of the formulas: bit-exact codes and scales."""
import math

import pytest
import torch

from moe_offload.tensor import (Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer,
                                group_quantize)
from moe_offload.tensor import formats
from moe_offload.tensor.grouped_storage import columnwise_width

from tests import reference as _ref

SIZES = [[7, 0, 33, 24], [64], [0, 0, 5], [1, 2, 3, 4, 5]]


def _x(T, K, dtype=torch.bfloat16, spread=True):
    x = torch.randn(T, K)
    if spread:  # per-row magnitudes over many binades, so groups differ in scale
        x = x * torch.exp2(torch.randint(-12, 12, (T, 1)).float())
    return x.to(dtype)


# ----------------------------------------------------------------------------- pure math
def test_amax_to_scale_edge_cases():
    amax = torch.tensor([0.0, float("inf"), float("nan"), 448.0, 1e-45, 3.0])
    s = formats.amax_to_scale(amax)
    assert s[:3].tolist() == [1.0, 1.0, 1.0]
    assert s[3].item() == 1.0
    assert torch.isfinite(s[4]) and s[4] == torch.finfo(torch.float32).max  # 448/tiny clamps
    assert s[5].item() == pytest.approx(448.0 / 3.0, rel=1e-7)
    e5 = formats.amax_to_scale(torch.tensor([2.0]), torch.float8_e5m2)
    assert e5.item() == 57344.0 / 2.0


def test_power_2_scale_rounds_down_exactly():
    s = torch.tensor([1.0, 1.5, 2.0 - 2 ** -22, 2.0, 149.33, 3e-30])
    p = formats.round_scale_down_to_power_of_2(s)
    assert p.tolist() == [2.0 ** math.floor(math.log2(v)) for v in s.double().tolist()]


def test_to_fp8_saturated_clamps_and_keeps_nan():
    x = torch.tensor([1000.0, -1e6, float("inf"), float("-inf"), float("nan"), 447.9])
    q = formats.to_fp8_saturated(x).float()
    assert q[:4].tolist() == [448.0, -448.0, 448.0, -448.0]
    assert math.isnan(q[4].item()) and q[5].item() == 448.0


def test_mx_exponent_exact_at_binade_edges():
    for k in range(-20, 20):
        for amax in (448.0 * 2.0 ** k, math.nextafter(448.0 * 2.0 ** k, math.inf),
                     math.nextafter(448.0 * 2.0 ** k, 0), 1.75 * 2.0 ** k, 1.0 * 2.0 ** k):
            amax = float(torch.tensor(amax).float())
            code = formats.mx_amax_to_e8m0(torch.tensor([amax])).item()
            assert code == _ref.mx_exponent(amax) + 127, amax
    special = formats.mx_amax_to_e8m0(torch.tensor([0.0, float("inf"), float("nan"), 1e-44]))
    assert special.tolist() == [formats.E8M0_ZERO_BLOCK, 255, 255, 0]


def test_e2m1_rne_ties_and_saturation():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, 100.0, -0.0])
    got = formats.e2m1_encode(v)
    assert torch.equal(got, _ref.e2m1_rne(v.double()))
    assert formats.e2m1_decode(got).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, 6.0, -0.0]


def test_pack_nibbles_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = formats.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(formats.unpack_nibbles(packed), codes)
    with pytest.raises(ValueError):
        formats.pack_nibbles(torch.zeros(1, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------- FP8
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("power_2", [False, True])
def test_fp8_current_scaling_bit_exact(sizes, power_2):
    T, K = sum(sizes), 48
    x = _x(T, K)
    q = group_quantize(x, Float8CurrentScalingQuantizer(columnwise=True, power_2_scale=power_2), sizes)
    codes, sinv, amax = _ref.fp8_ref(x, sizes, power_2)
    data, s = q.rowwise_2d()
    assert torch.equal(data.view(torch.uint8), codes)
    assert torch.equal(s, sinv)
    assert torch.equal(q.amax, amax)
    # columnwise = same codes transposed per group, padded to 16 with zeros
    Tc = columnwise_width(T, len(sizes), 16)
    cdata, cs = q.columnwise_2d()
    ref_cols = _ref.pad_transpose_ref(codes.double(), sizes, 16, Tc).to(torch.uint8)
    assert torch.equal(cdata.view(torch.uint8), ref_cols)
    assert torch.equal(cs, sinv)
    # dequantize: code * scale_inv (exact in float64)
    deq = codes.view(torch.float8_e4m3fn).double()
    deq = deq * torch.repeat_interleave(sinv.double(), torch.tensor(sizes)).unsqueeze(1)
    assert torch.equal(q.dequantize(torch.float64), deq)
    assert torch.equal(q.dequantize(torch.float64, "columnwise"), deq)


def test_fp8_e5m2_codes():
    x = _x(20, 16, torch.float32)
    q = group_quantize(x, Float8CurrentScalingQuantizer(dtype=torch.float8_e5m2), [20])
    scale = formats.amax_to_scale(x.abs().max().reshape(1), torch.float8_e5m2)
    ref = torch.clamp(x * scale, -57344, 57344).to(torch.float8_e5m2)
    assert torch.equal(q.rowwise_2d()[0].view(torch.uint8), ref.view(torch.uint8))


def test_fp8_zero_group_nan_inf_documented():
    x = torch.randn(12, 16)
    x[0:4] = 0.0                     # group 0: all zero -> scale 1, zero codes
    x[5, 3] = float("nan")           # group 1: NaN -> amax NaN, scale 1, NaN code
    x[9, 0] = float("inf")           # group 2: inf -> scale 1, inf saturates to 448
    q = group_quantize(x, Float8CurrentScalingQuantizer(), [4, 4, 4])
    data, s = q.rowwise_2d()
    assert s.tolist() == [1.0, 1.0, 1.0]
    assert math.isnan(q.amax[1].item()) and q.amax[2].item() == math.inf and q.amax[0].item() == 0
    v = data.float()
    assert torch.all(v[0:4] == 0)
    assert math.isnan(v[5, 3].item()) and torch.isfinite(v[4:8]).sum() == 4 * 16 - 1
    assert v[9, 0].item() == 448.0
    assert torch.equal(v[8:12][1:], x[9:12].to(torch.float8_e4m3fn).float())  # scale 1


def test_fp8_saturation_of_large_inputs():
    x = torch.tensor([[1e30] * 16, [-1e30] * 16])
    q = group_quantize(x, Float8CurrentScalingQuantizer(), [2])
    assert q.dequantize(torch.float64).abs().max().item() == pytest.approx(1e30, rel=1e-6)


def test_tail_rows_past_last_offset_are_zero():
    x = torch.randn(10, 32) + 5
    offs = torch.tensor([3, 7], dtype=torch.int32)
    for quant in (Float8CurrentScalingQuantizer(columnwise=True), MXFP8Quantizer(columnwise=True),
                  NVFP4Quantizer(columnwise=True)):
        q = group_quantize(x, quant, offsets=offs)
        for usage in ("rowwise", "columnwise"):
            d = q.dequantize(torch.float32, usage)
            assert torch.all(d[7:] == 0), (quant, usage)
            assert torch.all(d[:7] != 0)


# ----------------------------------------------------------------------------- MXFP8
@pytest.mark.parametrize("sizes", [[7, 0, 33, 24], [32], [0, 1, 40]])
def test_mxfp8_bit_exact_rowwise_and_columnwise(sizes):
    T, K = sum(sizes), 64
    x = _x(T, K)
    x[:, 32:] *= 1e-3                          # blocks of one row differ in scale
    q = group_quantize(x, MXFP8Quantizer(columnwise=True), sizes)
    codes, e8 = _ref.mx_rows_ref(x)
    data, s = q.rowwise_2d()
    assert torch.equal(data.view(torch.uint8), codes)
    assert torch.equal(s, e8)
    Tc = columnwise_width(T, len(sizes), 32)
    ccodes, ce8 = _ref.mx_rows_ref(_ref.pad_transpose_ref(x, sizes, 32, Tc))
    cdata, cs = q.columnwise_2d()
    assert torch.equal(cdata.view(torch.uint8), ccodes)
    assert torch.equal(cs, ce8)
    deq = (codes.view(torch.float8_e4m3fn).double().view(T, -1, 32)
           * torch.exp2(e8.double() - 127).unsqueeze(-1)).view(T, K)
    assert torch.equal(q.dequantize(torch.float64), deq)


def test_mxfp8_zero_and_nonfinite_blocks():
    x = torch.randn(4, 96)
    x[0, :32] = 0.0
    x[1, 40] = float("nan")
    x[2, 70] = float("inf")
    q = group_quantize(x, MXFP8Quantizer(), [4])
    data, s = q.rowwise_2d()
    assert s[0, 0].item() == 127 and torch.all(data[0, :32].float() == 0)
    assert s[1, 1].item() == 255 and s[2, 2].item() == 255
    d = q.dequantize(torch.float32)
    assert torch.isnan(d[1, 32:64]).all() and torch.isnan(d[2, 64:96]).all()
    assert torch.isfinite(d[1, :32]).all() and torch.isfinite(d[2, :64]).all()


def test_mxfp8_needs_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        group_quantize(torch.randn(4, 48), MXFP8Quantizer(), [4])


# ----------------------------------------------------------------------------- NVFP4
@pytest.mark.parametrize("sizes", [[7, 0, 33, 24], [16], [0, 3, 0]])
def test_nvfp4_bit_exact_rowwise_and_columnwise(sizes):
    T, K = sum(sizes), 48
    x = _x(T, K, torch.float32)
    q = group_quantize(x, NVFP4Quantizer(columnwise=True), sizes)
    amaxes, s_rows, start = [], [], 0
    for n in sizes:
        a = x[start:start + n].abs().max().item() if n else 0.0
        amaxes.append(a)
        s_rows += [_ref.nvfp4_s_enc(a)] * n
        start += n
    s_rows = torch.tensor(s_rows, dtype=torch.float64)
    codes, bs = _ref.nvfp4_rows_ref(x, s_rows)
    data, s = q.rowwise_2d()
    assert torch.equal(formats.unpack_nibbles(data), codes)
    assert torch.equal(s.view(torch.uint8), bs)
    assert q.amax.tolist() == pytest.approx(amaxes, rel=0, abs=0)
    # columnwise: blocks of 16 tokens within a group, per-group S_enc per column
    Tc = columnwise_width(T, len(sizes), 16)
    xt = _ref.pad_transpose_ref(x, sizes, 16, Tc)
    s_cols, col = torch.ones(Tc, dtype=torch.float64), 0
    for n, a in zip(sizes, amaxes):
        w = (n + 15) // 16 * 16
        s_cols[col:col + w] = _ref.nvfp4_s_enc(a)
        col += w
    # transpose trick: quantize each column block with its own S -> build per-row ref
    ccodes = torch.zeros(xt.shape, dtype=torch.uint8)
    cbs = torch.zeros(xt.shape[0], Tc // 16, dtype=torch.uint8)
    for b in range(Tc // 16):
        blk = xt[:, b * 16:(b + 1) * 16]
        c, sc = _ref.nvfp4_rows_ref(blk, torch.full((xt.shape[0],), s_cols[b * 16].item(), dtype=torch.float64))
        ccodes[:, b * 16:(b + 1) * 16], cbs[:, b] = c, sc[:, 0]
    cdata, cs = q.columnwise_2d()
    assert torch.equal(formats.unpack_nibbles(cdata), ccodes)
    assert torch.equal(cs.view(torch.uint8), cbs)
    # dequantize: code * block_scale / S_enc
    vals = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)[(codes & 7).long()]
    vals = torch.where((codes & 8) > 0, -vals, vals).view(T, -1, 16)
    deq = (vals * bs.view(torch.float8_e4m3fn).double().unsqueeze(-1)).view(T, K) / s_rows.unsqueeze(1)
    assert torch.allclose(q.dequantize(torch.float64), deq, rtol=1e-15, atol=0)


def test_nvfp4_nan_inf_documented():
    x = torch.randn(32, 32)
    x[3, 5] = float("nan")     # group 0
    x[20, 1] = float("inf")    # group 1
    q = group_quantize(x, NVFP4Quantizer(), [16, 16])
    d = q.dequantize(torch.float32)
    assert torch.isnan(d[3, :16]).all() and torch.isfinite(d[3, 16:]).all()
    data, s = q.rowwise_2d()
    assert s[20, 0].float().item() == 448.0
    assert d[20, 1].item() == 6.0 * 448.0  # saturates to 6 * block scale / S_enc(=1)


def test_quantizer_validation():
    with pytest.raises(TypeError):
        Float8CurrentScalingQuantizer(dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        MXFP8Quantizer(rowwise=False, columnwise=False)
    with pytest.raises(TypeError):
        group_quantize(torch.randn(4, 16), "fp8", [4])
    with pytest.raises(ValueError, match="sum"):
        group_quantize(torch.randn(4, 16), NVFP4Quantizer(), [1, 2])
    with pytest.raises(TypeError):
        group_quantize(torch.randn(4, 16, 2), NVFP4Quantizer(), [4])
