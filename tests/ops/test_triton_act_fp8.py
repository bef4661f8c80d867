"""Tests for moe_offload/ops/_triton_act_fp8.py (CUDA): the fused FP8 MLP activation
kernels give the bits of ``act_forward``/``act_backward`` + ``group_quantize``."""
import pytest
import torch

from moe_offload.tensor import Float8CurrentScalingQuantizer, group_quantize

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("with_p", [True, False])
def test_fused_act_kernels_bit_identical_to_unfused(activation, with_p):
    """The fused MLP kernels give the bits of act_forward/act_backward + group_quantize."""
    from moe_offload.ops.activations import act_backward, act_forward, is_gated
    from moe_offload.ops._triton_act_fp8 import act_backward_fp8, act_forward_fp8
    from moe_offload.tensor.fp8_kernels import group_amax_bits
    gated = is_gated(activation)
    T, F = 777, 1536
    X = 2 * F if gated else F
    offs = torch.tensor([100, 100, 400, 700], dtype=torch.int32, device="cuda")  # empty group, tail
    h = (torch.randn(T, X, device="cuda") * 4).to(torch.bfloat16)
    h[5, 9] = float("nan")
    p = torch.rand(T, device="cuda", dtype=torch.bfloat16) if with_p else None
    out, amax_o, parts = act_forward_fp8(h, offs, p, activation, gated, True)
    ref_out = act_forward(h, p, activation)
    ref_hq = group_quantize(h, Float8CurrentScalingQuantizer(), offsets=offs)
    same_nan = torch.equal(torch.isnan(out), torch.isnan(ref_out))
    assert same_nan and torch.equal(out.nan_to_num(0.0), ref_out.nan_to_num(0.0))  # row 5 is NaN
    keep = torch.ones(T, dtype=torch.bool, device="cuda")
    keep[5] = False  # the NaN row: NaN codes may differ in the sign bit
    a, b = (t.view(torch.uint8).view(T, X)[keep] for t in (parts["rowwise_data"], ref_hq.rowwise_data))
    assert torch.equal(a, b)
    assert torch.isnan(parts["amax"][0]) and torch.equal(parts["amax"][1:], ref_hq.amax[1:])
    assert torch.equal(parts["rowwise_scale_inv"], ref_hq.rowwise_scale_inv)
    assert torch.equal(amax_o[1:], group_amax_bits(ref_out.contiguous(), offs)[1:])
    h[5, 9] = 1.0
    hq = group_quantize(h, Float8CurrentScalingQuantizer(), offsets=offs)
    do = torch.randn(T, F, device="cuda", dtype=torch.bfloat16)
    dh, dp, o2, am_o, am_dh = act_backward_fp8(hq.rowwise_data, hq.rowwise_scale_inv, offs, (T, X),
                                               torch.bfloat16, p, do, activation, gated)
    rdh, rdp, ro2 = act_backward(hq.dequantize(torch.bfloat16), p, do, activation)
    assert torch.equal(dh, rdh) and torch.equal(o2, ro2)
    assert (dp is None and rdp is None) or torch.equal(dp, rdp)
    assert torch.equal(am_o, group_amax_bits(ro2, offs)) and torch.equal(am_dh, group_amax_bits(rdh, offs))
