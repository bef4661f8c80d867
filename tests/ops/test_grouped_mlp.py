"""Tests for GroupedMLP (fused fc1 -> act * probs -> fc2) and the fused activations."""
import pytest
import torch

from moe_offload.offload import marks
from moe_offload.ops import GroupedLinear, GroupedMLP
from moe_offload.ops.activations import ACTIVATIONS, act_backward, act_forward
from tests.reference import act_ref, bound_check, mlp_loop, random_splits, run_with_grads


def _mlp_case(dtype, activation, bias, with_probs, splits, H=16, Fh=12, device="cpu",
              as_tensor=False, probs_shape="T", recompute="activation"):
    G, T = len(splits), sum(splits)
    m = GroupedMLP(G, H, Fh, activation, bias=bias, recompute=recompute, device=device, dtype=dtype)
    x = torch.randn(T, H, device=device).to(dtype).requires_grad_(True)
    probs = None
    if with_probs:
        probs = torch.rand(T, device=device).to(dtype)
        probs = (probs.unsqueeze(1) if probs_shape == "T1" else probs).requires_grad_(True)
    dy = torch.randn(T, H, device=device).to(dtype)
    sp = torch.tensor(splits, device=device) if as_tensor else splits
    y = m(x, sp, probs)
    y.backward(dy)
    ours = [y.detach(), x.grad, m.fc1_weight.grad, m.fc1_bias.grad if bias else None,
            m.fc2_weight.grad, m.fc2_bias.grad if bias else None, probs.grad if with_probs else None]
    inputs = [x.detach(), m.fc1_weight.detach(), m.fc1_bias.detach() if bias else None,
              m.fc2_weight.detach(), m.fc2_bias.detach() if bias else None,
              probs.detach() if with_probs else None]
    return m, ours, inputs, dy


def _check(dtype, activation, bias, with_probs, splits, **kw):
    m, ours, inputs, dy = _mlp_case(dtype, activation, bias, with_probs, splits, **kw)
    fn = lambda *t: mlp_loop(*t, splits, activation)  # noqa: E731
    lowp = run_with_grads(fn, inputs, dy)
    ref = run_with_grads(fn, [None if t is None else t.cpu() for t in inputs], dy.cpu(), torch.float64)
    if with_probs and kw.get("probs_shape") == "T1":
        assert ours[-1].shape == inputs[-1].shape
    cpu = lambda ts: [None if t is None else t.cpu() for t in ts]  # noqa: E731
    bound_check(cpu(ours), cpu(lowp), ref, name=f"{dtype} {activation} bias={bias} probs={with_probs}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, with_probs", [(False, True), (True, False)])
def test_matches_reference(activation, dtype, bias, with_probs):
    gen = torch.Generator().manual_seed(3)
    _check(dtype, activation, bias, with_probs, random_splits(37, 4, gen, empty=(2,)))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp16_fp64_and_odd_sizes(activation):
    _check(torch.float16, activation, True, True, [5, 0, 9], H=8, Fh=16)
    _check(torch.float64, activation, True, True, [5, 0, 9], H=7, Fh=5, as_tensor=True, probs_shape="T1")
    _check(torch.float32, activation, False, True, [0, 11, 0], H=9, Fh=3, recompute="fc1")


def test_equals_grouped_linear_composition():
    """GroupedMLP == GroupedLinear -> act * probs -> GroupedLinear (fp32)."""
    torch.manual_seed(1)
    G, H, Fh, splits = 3, 16, 8, [4, 0, 9]
    mlp = GroupedMLP(G, H, Fh, "swiglu", bias=True)
    fc1, fc2 = GroupedLinear(G, H, 2 * Fh), GroupedLinear(G, Fh, H)
    with torch.no_grad():
        fc1.weight.copy_(mlp.fc1_weight), fc1.bias.copy_(mlp.fc1_bias)
        fc2.weight.copy_(mlp.fc2_weight), fc2.bias.copy_(mlp.fc2_bias)
    x = torch.randn(13, H, requires_grad=True)
    p = torch.rand(13, requires_grad=True)
    dy = torch.randn(13, H)
    y1 = mlp(x, splits, p)
    g1 = torch.autograd.grad(y1, [x, p, mlp.fc1_weight, mlp.fc1_bias, mlp.fc2_weight, mlp.fc2_bias], dy)
    y2 = fc2(act_ref(fc1(x, splits), "swiglu") * p.unsqueeze(1), splits)
    g2 = torch.autograd.grad(y2, [x, p, fc1.weight, fc1.bias, fc2.weight, fc2.bias], dy)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_recompute_fc1_is_bitwise_equal(activation):
    """Recomputing fc1 on CPU repeats the same deterministic GEMM: grads are identical."""
    grads = {}
    for mode in ("activation", "fc1"):
        torch.manual_seed(5)
        m = GroupedMLP(3, 16, 8, activation, bias=True, recompute=mode)
        x = torch.randn(21, 16, requires_grad=True)
        p = torch.rand(21, requires_grad=True)
        m(x, [7, 0, 14], p).backward(torch.randn(21, 16))
        grads[mode] = [x.grad, p.grad] + [q.grad for q in m.parameters()]
    for a, b in zip(grads["activation"], grads["fc1"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recompute, expected", [
    ("activation", [(3,), (13,), (13, 16), (13, 24)]),
    ("fc1", [(3,), (13,), (13, 16)]),
])
def test_saves_only_what_the_docstring_says(recompute, expected):
    m = GroupedMLP(3, 16, 12, "swiglu", recompute=recompute)
    params = {id(p) for p in m.parameters()}
    saved = []

    def pack(t):
        if id(t) not in params:
            saved.append(tuple(t.shape))
        return t

    x = torch.randn(13, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, [5, 0, 8], torch.rand(13, requires_grad=True))
    assert sorted(saved) == expected   # x, h, probs and the (G,) offsets


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_unchecked_short_offsets_zero_the_tail(activation):
    """Offsets covering 7 of 10 rows (unchecked device splits): the tail rows give zero
    output, x grad and probs grad, even with NaN in x and dy there, and the
    parameter grads equal those of the first 7 rows alone."""
    m = GroupedMLP(2, 8, 4, activation, bias=True)
    x = torch.randn(10, 8)
    x[7:] = float("nan")
    x.requires_grad_(True)
    p = torch.rand(10, requires_grad=True)
    dy = torch.randn(10, 8)
    dy[7:] = float("nan")
    y = m.forward_offsets(x, torch.tensor([3, 7], dtype=torch.int32), p, covered=False)
    y.backward(dy)
    assert torch.equal(y[7:], torch.zeros(3, 8))
    assert torch.equal(x.grad[7:], torch.zeros(3, 8)) and torch.equal(p.grad[7:], torch.zeros(3))
    got = [y[:7], x.grad[:7], p.grad[:7]] + [q.grad for q in m.parameters()]
    m.zero_grad()
    x7 = x.detach()[:7].clone().requires_grad_(True)
    p7 = p.detach()[:7].clone().requires_grad_(True)
    y7 = m(x7, [3, 4], p7)
    y7.backward(dy[:7])
    for a, b in zip(got, [y7, x7.grad, p7.grad] + [q.grad for q in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_marks():
    class Engine:
        ready = []

        def record_ready(self, t):
            self.ready.append(t)

    m = GroupedMLP(2, 8, 4, "swiglu", bias=True)
    prev = marks.set_active_engine(Engine())
    try:
        m(torch.randn(6, 8), [2, 4], torch.rand(6))
    finally:
        marks.set_active_engine(prev)
    assert all(marks.is_marked_not_offload(p) for p in m.parameters())
    # x (6, 8), probs (6,) and the fc1 output h (6, 2F = 8): each saved activation
    assert sorted(tuple(t.shape) for t in Engine.ready) == [(6,), (6, 8), (6, 8)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_probs", [True, False])
def test_act_backward_matches_autograd(activation, with_probs):
    X = 10 if activation in ("swiglu", "geglu") else 5
    h = torch.randn(7, X, dtype=torch.float64, requires_grad=True)
    p = torch.rand(7, dtype=torch.float64, requires_grad=True) if with_probs else None
    out = act_ref(h, activation) * (p.unsqueeze(1) if with_probs else 1)
    torch.testing.assert_close(act_forward(h.detach(), None if p is None else p.detach(), activation), out)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [h] + ([p] if with_probs else []), d_out)
    d_h, d_p, out2 = act_backward(h.detach(), None if p is None else p.detach(), d_out, activation)
    torch.testing.assert_close(d_h, grads[0])
    torch.testing.assert_close(out2, out.detach())
    assert (d_p is None) == (not with_probs)
    if with_probs:
        torch.testing.assert_close(d_p, grads[1])


@pytest.mark.parametrize("make, exc, match", [
    (lambda m: m(torch.randn(6, 8), [2, 4, 0]), ValueError, "3 groups, expected num_groups=2"),
    (lambda m: m(torch.randn(6, 8), [2, 3]), ValueError, "sum to 5, but x has 6 rows"),
    (lambda m: m(torch.randn(6, 8), [7, -1]), ValueError, "negative"),
    (lambda m: m(torch.randn(6, 8), ["2", 4]), TypeError, "must contain ints"),
    (lambda m: m(torch.randn(6, 8).double(), [2, 4]), TypeError, "x dtype"),
    (lambda m: m(torch.randn(6, 8, device="meta"), [2, 4]), TypeError, "x device"),
    (lambda m: m(torch.randn(6), [2, 4]), ValueError, "x must be 2-D"),
    (lambda m: m(torch.randn(6, 8), [2, 4], torch.rand(5)), ValueError, r"probs must have shape \(6,\) or \(6, 1\)"),
    (lambda m: m(torch.randn(6, 8), [2, 4], torch.ones(6, dtype=torch.int64)), TypeError, "probs must be a floating"),
    (lambda m: m(torch.randn(6, 8), [2, 4], torch.rand(6, device="meta")), TypeError, "probs device"),
])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make(GroupedMLP(2, 8, 4))


def test_bad_constructor():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        GroupedMLP(2, 8, 4, "tanh")
    with pytest.raises(ValueError, match="unknown recompute 'all'"):
        GroupedMLP(2, 8, 4, recompute="all")
    with pytest.raises(ValueError, match="unknown recipe 'int8'"):
        GroupedMLP(2, 8, 4, recipe="int8")


def test_shapes():
    m = GroupedMLP(3, 8, 4, "swiglu", bias=True)
    assert m.fc1_weight.shape == (3, 8, 8) and m.fc2_weight.shape == (3, 8, 4)
    assert m.fc1_bias.shape == (3, 8) and m.fc2_bias.shape == (3, 8)
    assert GroupedMLP(3, 8, 4, "relu").fc1_weight.shape == (3, 4, 8)


@pytest.mark.parametrize("recipe", [None, "fp8", "mxfp8", "nvfp4"])
def test_broadcast_input(recipe):
    """A stride-0 ``x`` (``row.expand(T, H)``) gives the result of its contiguous copy."""
    m = GroupedMLP(2, 32, 32, recipe=recipe)
    row = torch.randn(1, 32, requires_grad=True)
    y = m(row.expand(6, 32), [2, 4])
    assert torch.equal(y, m(row.detach().expand(6, 32).contiguous(), [2, 4]))
    y.sum().backward()
    assert row.grad.shape == (1, 32)


@pytest.mark.parametrize("recipe", [None, "fp8", "mxfp8", "nvfp4"])
def test_empty_batch_every_recipe(recipe):
    m = GroupedMLP(2, 32, 32, recipe=recipe)
    x = torch.zeros(0, 32, requires_grad=True)
    y = m(x, [0, 0], torch.zeros(0))
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 32)
    assert torch.equal(m.fc1_weight.grad, torch.zeros_like(m.fc1_weight))


@pytest.mark.parametrize("recipe, arg, kw", [
    ("mxfp8", "ffn_hidden_size", dict(hidden_size=32, ffn_hidden_size=48)),
    ("mxfp8", "hidden_size", dict(hidden_size=48, ffn_hidden_size=32)),
    ("nvfp4", "ffn_hidden_size", dict(hidden_size=32, ffn_hidden_size=24)),
])
def test_block_multiple_checked_at_construction(recipe, arg, kw):
    with pytest.raises(ValueError, match=f"{arg} must be a multiple of"):
        GroupedMLP(2, recipe=recipe, **kw)


@pytest.mark.parametrize("args, exc, name", [
    ((2.0, 8, 4), TypeError, "num_groups"),
    ((2, 8.0, 4), TypeError, "hidden_size"),
    ((2, 8, 4.5), TypeError, "ffn_hidden_size"),
    ((2, -8, 4), ValueError, "hidden_size"),
])
def test_integer_arguments(args, exc, name):
    with pytest.raises(exc, match=name):
        GroupedMLP(*args)


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", ["activation", "fc1"])
def test_cuda_matches_reference(activation, recompute):
    gen = torch.Generator().manual_seed(2)
    _check(torch.bfloat16, activation, True, True, random_splits(300, 5, gen, empty=(1,)), H=64, Fh=96,
           device="cuda", as_tensor=True, recompute=recompute)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_other_dtypes(dtype):
    _check(dtype, "swiglu", False, True, [40, 0, 37], H=24, Fh=20, device="cuda", as_tensor=True)


@pytest.mark.cuda
def test_cuda_unchecked_short_splits():
    m = GroupedMLP(2, 64, 32, "swiglu", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p = torch.rand(50, device="cuda", requires_grad=True)
    y = m(x, torch.tensor([10, 30], device="cuda"), p)
    y.backward(torch.randn_like(y))
    assert torch.equal(y[40:], torch.zeros_like(y[40:]))
    assert torch.equal(x.grad[40:], torch.zeros_like(x.grad[40:])) and torch.equal(p.grad[40:], torch.zeros(10, device="cuda"))
