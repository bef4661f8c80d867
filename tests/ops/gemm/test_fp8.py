"""Tests for moe_offload/ops/gemm/fp8.py: the FP8 ``torch._scaled_grouped_mm`` backend.

CPU: the backend's logic (layouts, scale gathers, padding, masking, weights re-quantized
in backward) through a CPU model of the kernel.  CUDA: the real kernel vs references,
and no host sync."""
import pytest
import torch

from moe_offload.ops.gemm import fp8
from moe_offload.ops.grouped_linear import grouped_linear
from moe_offload.ops.grouped_mlp import grouped_mlp
from moe_offload.tensor import Float8CurrentScalingQuantizer, group_quantize

from tests.reference import mlp_loop

SIZES = [130, 0, 77, 301, 4]  # uneven, empty, not multiples of 16


def quantized_grouped_linear(x, offs, w, b, recipe):
    return grouped_linear(x, offs, w, b, recipe, covered=False)


def quantized_grouped_mlp(x, offs, w1, b1, w2, b2, probs, activation, recipe):
    return grouped_mlp(x, offs, w1, b1, w2, b2, probs, activation, covered=False, recipe=recipe)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


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


# ----------------------------------------------------------------------------- the backend on CPU
def _fake_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, out_dtype=None):
    """CPU model of torch._scaled_grouped_mm (rowwise fp32 scales), with the layout rules
    probed on the H100: E4M3 operands, a row-major, b column-major, 2D x 2D groups
    multiples of 16."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    assert a.stride(-1) == 1 and b.stride(-2) == 1, "a row-major, b column-major"
    assert scale_a.dtype == scale_b.dtype == torch.float32 and out_dtype == torch.bfloat16
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = torch.full((a.shape[0], b.shape[2]), float("nan"))  # rows past offs[-1]: garbage
        assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[2])
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = (a[s:e].double() * scale_a[s:e, None].double()) @ (b[g].double() * scale_b[g][None, :].double())
        return out.to(torch.bfloat16)
    M, N = a.shape[0], b.shape[1]
    G = len(ends)
    assert all(e % 16 == 0 for e in ends), "2D x 2D groups must be multiples of 16"
    assert scale_a.shape == (G * M,) and scale_b.shape == (G * N,)
    out = torch.full((G, M, N), float("nan"))  # empty groups: garbage, must be masked
    for g, (s, e) in enumerate(zip(starts, ends)):
        if e > s:
            out[g] = (a[:, s:e].double() * scale_a[g * M:(g + 1) * M, None].double()) @ \
                (b[s:e].double() * scale_b[g * N:(g + 1) * N][None, :].double())
    return out.to(torch.bfloat16)


@pytest.fixture
def fake_fast_path(monkeypatch):
    monkeypatch.setattr(fp8, "available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _fake_scaled_grouped_mm, raising=False)


def test_fast_path_logic_matches_emulated_on_cpu(fake_fast_path):
    """The H100 path's operand layouts, scale gathers, padding and masking, run through a
    CPU model of the kernel, agree with the emulated path (fp32 GEMMs on the same codes)."""
    G, H, F_ = 4, 64, 32
    sizes = [9, 0, 37, 18]                     # uneven, empty, not multiples of 16, tail rows
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(70, H, dtype=torch.bfloat16)
    w1 = (torch.randn(G, 2 * F_, H) * 0.2).to(torch.bfloat16)
    w2 = (torch.randn(G, H, F_) * 0.2).to(torch.bfloat16)
    p = torch.rand(70, dtype=torch.bfloat16)
    assert fp8.applies(x, H, 2 * F_)

    def run(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w1, w2, p)]
        y = quantized_grouped_mlp(leaves[0], offs, leaves[1], None, leaves[2], None, leaves[3], "swiglu", "fp8")
        y.backward(torch.ones_like(y))
        return [y] + [t.grad for t in leaves]

    fast = run(torch.bfloat16)       # bf16 -> "fast" path (modelled kernel)
    emu = run(torch.float32)         # fp32 -> emulated path
    for name, a, b in zip(["y", "dx", "dw1", "dw2", "dp"], fast, emu):
        assert torch.isfinite(a).all(), name
        if name in ("y", "dx", "dp"):
            assert torch.all(a[64:] == 0), name
        assert _rel(a, b) < 0.03, (name, _rel(a, b))   # bf16 rounding of intermediates only


def test_fast_linear_logic_tight_vs_emulated_on_cpu(monkeypatch):
    """Same bf16 inputs -> same codes; modelled kernel vs emulated differ by bf16 output
    rounding only."""
    G, K, N = 3, 64, 48
    sizes = [20, 0, 30]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(55, K, dtype=torch.bfloat16)
    w = (torch.randn(G, N, K) * 0.2).to(torch.bfloat16)
    b = torch.randn(G, N, dtype=torch.bfloat16)
    dy = torch.randn(55, N, dtype=torch.bfloat16)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = quantized_grouped_linear(leaves[0], offs, leaves[1], leaves[2], "fp8")
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    emu = run()
    monkeypatch.setattr(fp8, "available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _fake_scaled_grouped_mm, raising=False)
    fast = run()
    for name, a, r in zip(["y", "dx", "dw", "db"], fast, emu):
        err = (a.double() - r.double()).abs().max().item()
        assert err <= 2 ** -7 * r.double().abs().max().item(), (name, err)
    assert torch.all(fast[0][50:] == 0) and torch.all(fast[1][50:] == 0)


def _weight_roundtrip(device):
    """The dgrad operand rebuilt in backward equals the forward's codes transposed per
    expert, with the forward's scale (the bits the graph used to keep)."""
    G, N, K = 3, 48, 80
    w = (torch.randn(G, N, K, device=device) * torch.tensor([0.01, 3.0, 500.0], device=device).view(G, 1, 1)
         ).to(torch.bfloat16)
    B = fp8.Fp8Backend()
    wq = B.quantize_weight(w, need_dgrad=True)
    assert wq.codes_t_GKN is None                       # the forward writes no transposed copy
    wd = B.weight_for_dgrad(w, wq.meta_G)
    assert torch.equal(wd.codes_t_GKN.view(torch.uint8), wq.codes_GNK.transpose(1, 2).view(torch.uint8))
    assert torch.equal(wd.scale_GK[:, 0], wq.scale_GN[:, 0])


def test_weight_requantized_in_backward_is_bit_identical():
    _weight_roundtrip("cpu")


def test_fp8_mlp_keeps_no_weight_codes(fake_fast_path):
    """On the (modelled) FP8 kernel path, no saved tensor is a weight's codes."""
    G, H, F_ = 4, 64, 48
    x = torch.randn(64, H, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(G, 2 * F_, H) * 0.2).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(G, H, F_) * 0.2).to(torch.bfloat16).requires_grad_()
    offs = torch.tensor([16, 16, 48, 64], dtype=torch.int32)
    saved = []

    def pack(t):
        if t is not w1 and t is not w2:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quantized_grouped_mlp(x, offs, w1, None, w2, None, None, "swiglu", "fp8")
    assert not {G * 2 * F_ * H, G * H * F_} & set(saved), saved     # FP8 codes of w1, w2
    y.float().sum().backward()
    assert torch.isfinite(w1.grad).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_fp8_linear_fast_path_vs_reference_on_quantized_values():
    G, K, N = 5, 256, 128
    T = sum(SIZES)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(G, N, K, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    offs = torch.tensor(SIZES, device="cuda").cumsum(0).to(torch.int32)
    assert fp8.applies(x, K, N)
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


@pytest.mark.cuda
def test_fp8_linear_fast_matches_emulated():
    G, K, N = 4, 128, 64
    x = torch.randn(200, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(G, N, K, device="cuda") * 0.1).to(torch.bfloat16)
    offs = torch.tensor([50, 50, 120, 190], device="cuda", dtype=torch.int32)  # tail rows
    y_fast = quantized_grouped_linear(x, offs, w, None, "fp8")
    y_emu = quantized_grouped_linear(x.float(), offs, w.float(), None, "fp8")  # fp32: emulated
    assert torch.all(y_fast[190:] == 0)
    _close_bf16(y_fast, y_emu.double(), "fast vs emulated")


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
def test_cuda_weight_requantized_in_backward_is_bit_identical():
    _weight_roundtrip("cuda")
