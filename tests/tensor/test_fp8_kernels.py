"""Tests for moe_offload/tensor/fp8_kernels.py.  CUDA: the fused FP8 kernels (amax + rows/cols cast, weights) are bit-identical to the
torch reference (CPU ``group_quantize``), including NaN/inf, empty groups and tail rows."""
import pytest
import torch

from moe_offload.tensor import Float8CurrentScalingQuantizer, group_quantize
from moe_offload.tensor.grouped_storage import COMPONENTS
from moe_offload.tensor.row_groups import group_ids as row_group_ids

pytestmark = pytest.mark.cuda


def _x(T, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) * torch.exp2(torch.randint(-12, 12, (T, 1), generator=g).float())
    return x.to(torch.bfloat16)


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


CASES = [([300, 0, 17, 700, 1], 256, 0), ([5, 33], 48, 9), ([0, 0, 40], 4096, 3), ([1000], 112, 0),
         ([16, 16, 0, 31], 64, 200)]


@pytest.mark.parametrize("sizes,K,tail", CASES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("usage", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("p2", [False, True])
def test_fused_group_quantize_bit_identical_to_cpu_reference(sizes, K, tail, dtype, usage, p2):
    from moe_offload.tensor.fp8_kernels import fp8_group_quantize_fused
    T = sum(sizes) + tail
    x = _x(T, K)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    quant = Float8CurrentScalingQuantizer(dtype=dtype, rowwise=usage[0], columnwise=usage[1], power_2_scale=p2)
    ref = group_quantize(x, quant, offsets=offs)
    got = group_quantize(x.cuda(), quant, offsets=offs.cuda())
    for name, a, b in zip(COMPONENTS, got.component_tensors(), ref.component_tensors()):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(_bits(a.cpu()), _bits(b)), name
    parts = fp8_group_quantize_fused(x.cuda(), offs.cuda(), dtype, p2, *usage, row_scale=True, k_scale=True)
    sinv = (ref.rowwise_scale_inv if usage[0] else ref.columnwise_scale_inv)
    gid = row_group_ids(offs, T)
    assert torch.equal(parts["row_scale_T"].cpu(), torch.cat([sinv, torch.ones(1)])[gid])
    assert torch.equal(parts["k_scale_GK"].cpu(), sinv.repeat_interleave(K))


def test_fused_nonfinite_and_extremes():
    T, K = 300, 64
    x = _x(T, K, seed=1)
    offs = torch.tensor([100, 200, 300], dtype=torch.int32)
    x[5, 3] = float("nan")          # group 0: NaN amax -> scale 1, NaN code
    x[150, 7] = float("inf")        # group 1: inf amax -> scale 1, saturates
    x[250:300] = 1e-38              # group 2: tiny (subnormal) amax -> scale clamped to fp32 max
    x[260, 0] = -0.0
    quant = Float8CurrentScalingQuantizer(columnwise=True)
    ref = group_quantize(x, quant, offsets=offs)
    got = group_quantize(x.cuda(), quant, offsets=offs.cuda())
    assert torch.isnan(got.amax[0]) and torch.isnan(ref.amax[0])
    assert torch.equal(got.amax[1:].cpu(), ref.amax[1:])
    for name in ("rowwise_data", "columnwise_data"):
        a, b = getattr(got, name).cpu().view(torch.uint8), getattr(ref, name).view(torch.uint8)
        assert torch.equal(a, b), name
    assert torch.equal(got.rowwise_scale_inv.cpu(), ref.rowwise_scale_inv)


@pytest.mark.parametrize("transposed", [True, False])
def test_fused_weight_bit_identical(transposed):
    from moe_offload.tensor.fp8_kernels import fp8_weight_quantize_fused
    from moe_offload.tensor.formats import amax_to_scale
    from moe_offload.tensor.group_quantize import fp8_weight_transposed
    G, N, K = 3, 80, 200
    w = (torch.randn(G, N, K) * torch.tensor([0.01, 3.0, 500.0]).view(G, 1, 1)).to(torch.bfloat16)
    offs = (torch.arange(1, G + 1) * N).to(torch.int32)
    ref = group_quantize(w.reshape(G * N, K), Float8CurrentScalingQuantizer(), offsets=offs)
    o = fp8_weight_quantize_fused(w.cuda(), torch.float8_e4m3fn, False, transposed)
    assert torch.equal(o["rowwise_data"].cpu().view(torch.uint8), ref.rowwise_data.view(torch.uint8))
    assert torch.equal(o["amax"].cpu(), ref.amax) and torch.equal(o["scale_inv"].cpu(), ref.rowwise_scale_inv)
    assert torch.equal(o["n_scale_GN"].cpu(), ref.rowwise_scale_inv.repeat_interleave(N))
    if transposed:
        wt = fp8_weight_transposed(w, amax_to_scale(ref.amax))
        assert torch.equal(o["w_t_GKN"].cpu().view(torch.uint8), wt.view(torch.uint8))
        assert torch.equal(o["k_scale_GK"].cpu(), ref.rowwise_scale_inv.repeat_interleave(K))


def test_fused_weight_transposed_only_from_given_amax():
    """The backward's call (transposed codes only, amax from the forward, no amax pass)
    writes the bits of the full call, NaN and zero experts included."""
    from moe_offload.tensor.fp8_kernels import fp8_weight_quantize_fused
    G, N, K = 4, 80, 200
    w = (torch.randn(G, N, K) * torch.tensor([0.01, 3.0, 500.0, 1.0]).view(G, 1, 1)).to(torch.bfloat16).cuda()
    w[3] = 0
    w[2, 5, 7] = float("nan")
    full = fp8_weight_quantize_fused(w, torch.float8_e4m3fn, False, True)
    part = fp8_weight_quantize_fused(w, torch.float8_e4m3fn, False, True, rowwise=False, amax=full["amax"])
    assert "rowwise_data" not in part and "n_scale_GN" not in part
    assert torch.equal(part["w_t_GKN"].view(torch.uint8), full["w_t_GKN"].view(torch.uint8))
    assert torch.equal(part["k_scale_GK"], full["k_scale_GK"])


def test_fused_no_host_sync_and_few_launches():
    from torch.profiler import ProfilerActivity, profile
    x = _x(4096, 512).cuda()
    offs = torch.tensor([1000, 0, 3000, 4000], dtype=torch.int32, device="cuda")
    quant = Float8CurrentScalingQuantizer(columnwise=True)
    group_quantize(x, quant, offsets=offs)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        group_quantize(x, quant, offsets=offs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        group_quantize(x, quant, offsets=offs)
        torch.cuda.synchronize()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 3, [e.name for e in kernels]  # zeros, amax, cast


def test_group_amax_bits_matches_reference():
    from moe_offload.tensor.fp8_kernels import group_amax_bits
    from moe_offload.tensor.group_quantize import group_amax
    x = _x(1000, 300)
    offs = torch.tensor([0, 500, 900], dtype=torch.int32)
    ref = group_amax(x, row_group_ids(offs, 1000), 3)
    got = group_amax_bits(x.cuda(), offs.cuda()).view(torch.float32).cpu()
    assert torch.equal(got, ref)
