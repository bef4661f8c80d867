"""CUDA: the FP8 ``torch._scaled_grouped_mm`` path vs references, and no host sync."""
import pytest
import torch

from moe_offload.ops.quantized import _fast_ok, quantized_grouped_linear, quantized_grouped_mlp
from moe_offload.tensor import Float8CurrentScalingQuantizer, group_quantize

from ._reference import mlp_loop

pytestmark = pytest.mark.cuda
SIZES = [130, 0, 77, 301, 4]  # uneven, empty, not multiples of 16


def _deq(x, sizes, usage="rowwise"):
    q = group_quantize(x.detach(), Float8CurrentScalingQuantizer(columnwise=True),
                       torch.tensor(sizes, device=x.device))
    return q.dequantize(torch.float64, usage)


def _loop64(a, b, sizes, transpose=True):
    out, s = [], 0
    for g, n in enumerate(sizes):
        out.append(a[s:s + n] @ (b[g].t() if transpose else b[g]))
        s += n
    return torch.cat(out)


def _close_bf16(ours, ref, name):
    # bf16 output rounding (2^-9 relative) plus fp32 accumulation order
    err = (ours.double() - ref).abs().max().item()
    assert err <= 6e-3 * ref.abs().max().item(), (name, err, ref.abs().max().item())


def test_fp8_linear_fast_path_vs_reference_on_quantized_values():
    G, K, N = 5, 256, 128
    T = sum(SIZES)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(G, N, K, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    offs = torch.tensor(SIZES, device="cuda").cumsum(0).to(torch.int32)
    assert _fast_ok("fp8", x, K, N)
    y = quantized_grouped_linear(x, offs, w, None, "fp8")
    dy = torch.randn_like(y)
    y.backward(dy)
    wq = _deq(w.reshape(G * N, K), [N] * G).view(G, N, K)
    _close_bf16(y, _loop64(_deq(x, SIZES), wq, SIZES), "y")
    _close_bf16(x.grad, _loop64(_deq(dy, SIZES), wq, SIZES, transpose=False), "dx")
    dyc, xc = _deq(dy, SIZES, "columnwise"), _deq(x, SIZES, "columnwise")
    ref, s = [], 0
    for n in SIZES:
        ref.append(dyc[s:s + n].t() @ xc[s:s + n])
        s += n
    _close_bf16(w.grad, torch.stack(ref), "dw")
    assert torch.all(w.grad[1] == 0)


def test_fp8_linear_fast_matches_emulated():
    G, K, N = 4, 128, 64
    x = torch.randn(200, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(G, N, K, device="cuda") * 0.1).to(torch.bfloat16)
    offs = torch.tensor([50, 50, 120, 190], device="cuda", dtype=torch.int32)  # tail rows
    y_fast = quantized_grouped_linear(x, offs, w, None, "fp8")
    y_emu = quantized_grouped_linear(x.float(), offs, w.float(), None, "fp8")  # fp32: emulated
    assert torch.all(y_fast[190:] == 0)
    _close_bf16(y_fast, y_emu.double(), "fast vs emulated")


@pytest.mark.parametrize("recipe", ["fp8", "mxfp8", "nvfp4"])
def test_mlp_grads_close_to_bf16_reference(recipe):
    G, H, F_ = 4, 256, 128
    T = 512
    sizes = [100, 0, 300, 112]
    dev = "cuda"
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(G, 2 * F_, H, device=dev) * H ** -0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(G, H, F_, device=dev) * F_ ** -0.5).to(torch.bfloat16).requires_grad_()
    p = torch.rand(T, device=dev, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor(sizes, device=dev).cumsum(0).to(torch.int32)
    y = quantized_grouped_mlp(x, offs, w1, None, w2, None, p, "swiglu", recipe)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w1, w2, p), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2, p)]
    y_ref = mlp_loop(leaves[0], leaves[1], None, leaves[2], None, leaves[3], sizes, "swiglu")
    ref = torch.autograd.grad(y_ref, leaves, dy.double())
    tol = {"fp8": 0.12, "mxfp8": 0.12, "nvfp4": 0.5}[recipe]
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(y, y_ref) < tol  # E4M3: 3 mantissa bits, four quantized operands chained
    for name, g, r in zip(["x", "w1", "w2", "p"], grads, ref):
        assert torch.isfinite(g).all()
        assert rel(g, r) < tol, (name, rel(g, r))


def test_fp8_fast_path_no_host_sync():
    G, H, F_ = 4, 256, 128
    x = torch.randn(512, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(G, 2 * F_, H, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(G, H, F_, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    b1 = torch.zeros(G, 2 * F_, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p = torch.rand(512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([100, 100, 400, 512], device="cuda", dtype=torch.int32)
    for _ in range(2):  # first call compiles the Triton kernels (may sync)
        y = quantized_grouped_mlp(x, offs, w1, b1, w2, None, p, "swiglu", "fp8")
        dy = torch.randn_like(y)
        y.backward(dy)
        quantized_grouped_linear(x, offs, w1, b1, "fp8").backward(torch.ones(512, 2 * F_, device="cuda",
                                                                             dtype=torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = quantized_grouped_mlp(x, offs, w1, b1, w2, None, p, "swiglu", "fp8")
        y.backward(dy)
        quantized_grouped_linear(x, offs, w1, b1, "fp8").backward(dy[:, :1].expand(512, 2 * F_).contiguous())
    finally:
        torch.cuda.set_sync_debug_mode(0)
