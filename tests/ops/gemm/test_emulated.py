"""Tests for moe_offload/ops/gemm/emulated.py: the quantized layers on CPU, every recipe.

GEMM results are compared with a float64 reference built on the *same* quantized
values (dequantize, then float64 per-group matmuls), with tight tolerances; gradients
are compared with the high-precision gradients within honest per-format tolerances.
"""
import pytest
import torch

import moe_offload
from moe_offload.offload.marks import is_marked_not_offload
from moe_offload.ops.grouped_linear import grouped_linear
from moe_offload.ops.grouped_mlp import grouped_mlp
from moe_offload.tensor import (Float8CurrentScalingQuantizer, MXFP8Quantizer, NVFP4Quantizer,
                                group_quantize)

from tests.reference import mlp_loop

RECIPES = ["fp8", "mxfp8", "nvfp4"]


def quantized_grouped_linear(x, offs, w, b, recipe):
    return grouped_linear(x, offs, w, b, recipe, covered=False)


def quantized_grouped_mlp(x, offs, w1, b1, w2, b2, probs, activation, recipe):
    return grouped_mlp(x, offs, w1, b1, w2, b2, probs, activation, covered=False, recipe=recipe)
QUANT = {"fp8": Float8CurrentScalingQuantizer, "mxfp8": MXFP8Quantizer, "nvfp4": NVFP4Quantizer}
# relative (Frobenius) error of a quantized result vs the high-precision one
HP_TOL = {"fp8": 0.06, "mxfp8": 0.06, "nvfp4": 0.25}
SIZES = [9, 0, 37, 18]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _deq(x, recipe, sizes, usage="rowwise"):
    q = group_quantize(x.detach(), QUANT[recipe](rowwise=True, columnwise=True), sizes)
    return q.dequantize(torch.float64, usage)


def _loop64(a, b_GNK, sizes, transpose=True):
    out, s = [], 0
    for g, n in enumerate(sizes):
        w = b_GNK[g].t() if transpose else b_GNK[g]
        out.append(a[s:s + n] @ w)
        s += n
    return torch.cat(out)


def _close(ours, ref, rtol=2e-6):
    err = (ours.double() - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item() + 1e-12, (err, ref.abs().max().item())


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_matches_reference_on_quantized_values(recipe):
    G, K, N = 4, 64, 32
    x = torch.randn(sum(SIZES), K, requires_grad=True)
    w = (torch.randn(G, N, K) * 0.1).requires_grad_()
    b = torch.randn(G, N, requires_grad=True)
    offs = torch.tensor(SIZES).cumsum(0).to(torch.int32)
    y = quantized_grouped_linear(x, offs, w, b, recipe)
    dy = torch.randn_like(y)
    y.backward(dy)

    wsz = [N] * G
    xq = _deq(x, recipe, SIZES)
    wq = _deq(w.reshape(G * N, K), recipe, wsz).view(G, N, K)
    bias = torch.repeat_interleave(b.detach().double(), torch.tensor(SIZES), 0)
    _close(y, _loop64(xq, wq, SIZES) + bias)
    # dgrad: quantized dy (rowwise) @ weight quantized along N (columnwise)
    dyq = _deq(dy, recipe, SIZES)
    wq_col = _deq(w.reshape(G * N, K), recipe, wsz, "columnwise").view(G, N, K)
    _close(x.grad, _loop64(dyq, wq_col, SIZES, transpose=False))
    # wgrad: both operands quantized along tokens (columnwise)
    dyc, xc = _deq(dy, recipe, SIZES, "columnwise"), _deq(x, recipe, SIZES, "columnwise")
    dw_ref, s = [], 0
    for n in SIZES:
        dw_ref.append(dyc[s:s + n].t() @ xc[s:s + n])
        s += n
    _close(w.grad, torch.stack(dw_ref))
    # bias grad is the high-precision group sum of dy
    db_ref = torch.stack([dy[s:s + n].double().sum(0) for s, n in zip([0, 9, 9, 46], SIZES)])
    _close(b.grad, db_ref, 1e-6)
    # and everything is close to the high-precision computation
    xh, wh = x.detach().double(), w.detach().double()
    assert _rel(y, _loop64(xh, wh, SIZES) + bias) < HP_TOL[recipe]
    assert _rel(x.grad, _loop64(dy.double(), wh, SIZES, transpose=False)) < HP_TOL[recipe]


def test_linear_tail_rows_and_no_grad_inputs():
    G, K, N = 2, 32, 16
    x = torch.randn(10, K, requires_grad=True)
    w = torch.randn(G, N, K)       # frozen weight: no wgrad, x not saved
    offs = torch.tensor([3, 7], dtype=torch.int32)
    y = quantized_grouped_linear(x, offs, w, None, "fp8")
    assert torch.all(y[7:] == 0)
    y.sum().backward()
    assert torch.all(x.grad[7:] == 0) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="recipe"):
        quantized_grouped_linear(x, offs, w, None, "int4")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mlp_close_to_high_precision(recipe, activation):
    G, H, F_ = 4, 64, 32
    X = 2 * F_ if activation == "swiglu" else F_
    x = torch.randn(sum(SIZES), H, requires_grad=True)
    w1 = (torch.randn(G, X, H) * H ** -0.5).requires_grad_()
    b1 = (torch.randn(G, X) * 0.1).requires_grad_()
    w2 = (torch.randn(G, H, F_) * F_ ** -0.5).requires_grad_()
    b2 = (torch.randn(G, H) * 0.1).requires_grad_()
    p = torch.rand(sum(SIZES), requires_grad=True)
    offs = torch.tensor(SIZES).cumsum(0).to(torch.int32)
    y = quantized_grouped_mlp(x, offs, w1, b1, w2, b2, p, activation, recipe)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w1, b1, w2, b2, p), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2, p)]
    y_ref = mlp_loop(*leaves[:5], leaves[5], SIZES, activation)
    ref_grads = torch.autograd.grad(y_ref, leaves, dy.double())
    tol = HP_TOL[recipe] * (2 if activation == "swiglu" else 1.5)  # two quantized GEMMs chained
    assert _rel(y, y_ref) < tol
    for name, g, r in zip(["x", "w1", "b1", "w2", "b2", "probs"], grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) < 2 * tol, (name, _rel(g, r))


def test_mlp_fc1_is_the_quantized_linear():
    """With an identity-like fc2 path removed, fc1 of the MLP equals the quantized linear:
    compare the MLP's first GEMM through relu(h) with h >= 0 enforced by the bias."""
    G, H, F_ = 2, 32, 32
    x = torch.rand(20, H)
    w1 = torch.rand(G, F_, H)
    b1 = torch.full((G, F_), 1.0)
    offs = torch.tensor([8, 20], dtype=torch.int32)
    h_lin = quantized_grouped_linear(x, offs, w1, b1, "mxfp8")
    assert torch.all(h_lin > 0)
    w2 = torch.eye(F_).expand(G, F_, F_).contiguous()   # exactly representable in MXFP8
    y = quantized_grouped_mlp(x, offs, w1, b1, w2, None, None, "relu", "mxfp8")
    # y = mxfp8(relu(h)) @ I: equal to h quantized by MXFP8 rowwise
    hq = group_quantize(h_lin, MXFP8Quantizer(), [8, 12]).dequantize(torch.float32)
    assert torch.allclose(y, hq, rtol=1e-6, atol=0)


def _saved_activation_bytes(fn):
    """Bytes of saved tensors that are not marked never-offload and are not parameters."""
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not is_marked_not_offload(t):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("recipe,ratio", [("fp8", 0.55), ("mxfp8", 0.55), ("nvfp4", 0.30)])
def test_mlp_saved_bytes_vs_bf16(recipe, ratio):
    """FP8 GroupedMLP saves <= 0.55x the bytes of bf16 (x + fc1 output).  The columnwise
    padding (<= 15 or 31 columns per group, a static bound) is ~3% at this T."""
    T, H, F_, G = 4096, 256, 128, 4
    torch.manual_seed(0)
    mlp_bf16 = moe_offload.GroupedMLP(G, H, F_, bias=False, dtype=torch.bfloat16)
    mlp_q = moe_offload.GroupedMLP(G, H, F_, bias=False, recipe=recipe, dtype=torch.bfloat16)
    x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    p = torch.rand(T, dtype=torch.bfloat16)
    b_bf16 = _saved_activation_bytes(lambda: mlp_bf16(x, [1024] * 4, p))
    b_q = _saved_activation_bytes(lambda: mlp_q(x, [1024] * 4, p))
    assert b_bf16 >= T * (2 * H + 4 * F_)
    assert b_q <= ratio * b_bf16, (b_q, b_bf16)
    print(f"{recipe}: saved {b_q / T:.1f} B/token vs bf16 {b_bf16 / T:.1f} ({b_q / b_bf16:.3f}x)")


@pytest.mark.parametrize("recipe", RECIPES)
def test_layers_dispatch_to_quantized_path(recipe):
    torch.manual_seed(0)
    lin = moe_offload.GroupedLinear(3, 64, 32, recipe=recipe)
    x = torch.randn(20, 64)
    offs = torch.tensor([5, 5, 20], dtype=torch.int32)
    y = lin(x, [5, 0, 15])
    assert torch.equal(y, quantized_grouped_linear(x, offs, lin.weight, lin.bias, recipe))
    mlp = moe_offload.GroupedMLP(3, 64, 32, recipe=recipe)
    y = mlp(x, [5, 0, 15])
    ref = quantized_grouped_mlp(x, offs, mlp.fc1_weight, mlp.fc1_bias, mlp.fc2_weight, mlp.fc2_bias,
                                None, mlp.activation, recipe)
    assert torch.equal(y, ref)


def test_moe_with_recipe_trains():
    torch.manual_seed(0)
    moe = moe_offload.MoE(64, 32, num_experts=4, top_k=2, recipe="fp8")
    x = torch.randn(24, 64, requires_grad=True)
    y = moe(x)
    y = y[0] if isinstance(y, tuple) else y
    y.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _saved_non_parameter_bytes(fn):
    """Bytes of every saved tensor that is not a parameter, never-offload marks included
    (a weight workspace kept by the graph counts here)."""
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("recipe, limit", [("fp8", 0.6), ("mxfp8", 0.65), ("nvfp4", 0.35)])
def test_no_weight_workspace_is_saved(recipe, limit):
    """Quantized weights are re-quantized in backward, not kept by the graph: the saved
    bytes are ~0.52 / 0.55 / 0.29x bf16's for FP8 / MXFP8 / NVFP4 (0.81-0.98x and 0.46-0.51x
    at this shape when the quantized weight copies were saved)."""
    T, H, F_, G = 1024, 256, 128, 4
    mlp_bf16 = moe_offload.GroupedMLP(G, H, F_, dtype=torch.bfloat16)
    mlp_q = moe_offload.GroupedMLP(G, H, F_, recipe=recipe, dtype=torch.bfloat16)
    lin_bf16 = moe_offload.GroupedLinear(G, H, F_, dtype=torch.bfloat16)
    lin_q = moe_offload.GroupedLinear(G, H, F_, recipe=recipe, dtype=torch.bfloat16)
    x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    for bf16, q in ((mlp_bf16, mlp_q), (lin_bf16, lin_q)):
        b_bf16 = _saved_non_parameter_bytes(lambda: bf16(x, [256] * G))
        b_q = _saved_non_parameter_bytes(lambda: q(x, [256] * G))
        assert b_q <= limit * b_bf16, (type(q).__name__, b_q / b_bf16)
