"""Tests for GroupedLinear against a float64 loop of matmuls."""
import pytest
import torch

from moe_offload.offload import marks
from moe_offload.ops import GroupedLinear
from moe_offload.ops.grouped_linear import grouped_linear
from tests.reference import bound_check, linear_loop, random_splits, run_with_grads


def _check_direct(dtype, bias, splits, K, N, device="cpu", as_tensor=False):
    """Forward + grads of the module vs torch's loop in ``dtype`` and the float64 loop."""
    G, T = len(splits), sum(splits)
    m = GroupedLinear(G, K, N, bias=bias, device=device, dtype=dtype)
    x = torch.randn(T, K, device=device).to(dtype).requires_grad_(True)
    dy = torch.randn(T, N, device=device).to(dtype)
    sp = torch.tensor(splits, device=device) if as_tensor else splits
    y = m(x, sp)
    y.backward(dy)
    ours = [y.detach(), x.grad, m.weight.grad, m.bias.grad if bias else None]
    inputs = [x.detach(), m.weight.detach(), m.bias.detach() if bias else None]
    lowp = run_with_grads(lambda *t: linear_loop(*t, splits), inputs, dy)
    ref = run_with_grads(lambda *t: linear_loop(*t, splits), [None if t is None else t.cpu() for t in inputs],
                         dy.cpu(), torch.float64)
    cpu = [None if t is None else t.cpu() for t in ours]
    bound_check(cpu, [None if t is None else t.cpu() for t in lowp], ref,
                name=f"{dtype} bias={bias} splits={splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K, N", [(16, 24), (7, 5)])
def test_matches_reference(dtype, bias, K, N):
    gen = torch.Generator().manual_seed(K * N)
    splits = random_splits(40, 5, gen, empty=(1, 4))
    _check_direct(dtype, bias, splits, K, N)


def test_fp64_and_cpu_tensor_splits():
    _check_direct(torch.float64, True, [0, 9, 0, 4], 6, 3, as_tensor=True)


def test_all_rows_in_one_group_and_no_rows():
    _check_direct(torch.float32, True, [0, 12, 0], 8, 8)
    m = GroupedLinear(3, 8, 4)
    x = torch.randn(0, 8, requires_grad=True)
    y = m(x, [0, 0, 0])
    y.sum().backward()
    assert y.shape == (0, 4) and torch.equal(m.weight.grad, torch.zeros_like(m.weight))


def test_unchecked_short_offsets_zero_the_tail():
    """Device splits summing to < T (unvalidated): tail rows give zero output and grad."""
    m = GroupedLinear(2, 8, 4, dtype=torch.float32)
    x = torch.randn(10, 8, requires_grad=True)
    offs = torch.tensor([3, 7], dtype=torch.int32)
    y = grouped_linear(x, offs, m.weight, m.bias, covered=False)
    y.backward(torch.randn_like(y))
    assert torch.equal(y[7:], torch.zeros(3, 4)) and torch.equal(x.grad[7:], torch.zeros(3, 8))
    ref = linear_loop(x.detach()[:7].double(), m.weight.double(), m.bias.double(), [3, 4])
    torch.testing.assert_close(y[:7].double(), ref, rtol=1e-5, atol=1e-5)


def test_marks_weights_and_starts_offload_of_saved_input():
    class Engine:
        def __init__(self):
            self.ready = []

        def record_ready(self, t):
            self.ready.append(t)

    m = GroupedLinear(2, 8, 4)
    x = torch.randn(6, 8, requires_grad=True)
    engine = Engine()
    prev = marks.set_active_engine(engine)
    try:
        m(x, [2, 4])
    finally:
        marks.set_active_engine(prev)
    assert marks.is_marked_not_offload(m.weight) and marks.is_marked_not_offload(m.bias)
    assert any(t is x for t in engine.ready)


@pytest.mark.parametrize("make, exc, match", [
    (lambda m: m(torch.randn(6, 8), [2, 4, 0]), ValueError, "3 groups, expected num_groups=2"),
    (lambda m: m(torch.randn(6, 8), [7, -1]), ValueError, "negative"),
    (lambda m: m(torch.randn(6, 8), [2, 3]), ValueError, "sum to 5, but x has 6 rows"),
    (lambda m: m(torch.randn(6, 8), [2.0, 4.0]), TypeError, "must contain ints"),
    (lambda m: m(torch.randn(6, 8), torch.tensor([2.0, 4.0])), TypeError, "integer tensor"),
    (lambda m: m(torch.randn(6, 8, dtype=torch.float64), [2, 4]), TypeError, "x dtype torch.float64 does not match"),
    (lambda m: m(torch.randn(6, 8, device="meta"), [2, 4]), TypeError, "x device meta does not match"),
    (lambda m: m(torch.randn(2, 3, 8), [2, 4]), ValueError, "x must be 2-D"),
    (lambda m: m(torch.randn(6, 7), [2, 4]), ValueError, "x has 7 features, expected in_features=8"),
])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make(GroupedLinear(2, 8, 4))


def test_bad_constructor():
    with pytest.raises(ValueError, match="unknown recipe 'fp4'"):
        GroupedLinear(2, 8, 4, recipe="fp4")
    with pytest.raises(ValueError, match="must be >= 1"):
        GroupedLinear(0, 8, 4)


@pytest.mark.parametrize("recipe", [None, "fp8", "mxfp8", "nvfp4"])
def test_broadcast_input(recipe):
    """A stride-0 ``x`` (``row.expand(T, K)``) gives the result of its contiguous copy."""
    m = GroupedLinear(2, 32, 32, recipe=recipe)
    row = torch.randn(1, 32, requires_grad=True)
    y = m(row.expand(6, 32), [2, 4])
    ref = m(row.detach().expand(6, 32).contiguous(), [2, 4])
    assert torch.equal(y, ref)
    y.sum().backward()
    assert row.grad.shape == (1, 32)


@pytest.mark.parametrize("recipe", [None, "fp8", "mxfp8", "nvfp4"])
def test_empty_batch_every_recipe(recipe):
    m = GroupedLinear(2, 32, 32, recipe=recipe)
    x = torch.zeros(0, 32, requires_grad=True)
    y = m(x, [0, 0])
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 32)
    assert torch.equal(m.weight.grad, torch.zeros_like(m.weight))


@pytest.mark.parametrize("recipe, arg, kw", [
    ("mxfp8", "out_features", dict(in_features=32, out_features=24)),
    ("mxfp8", "in_features", dict(in_features=48, out_features=32)),
    ("nvfp4", "out_features", dict(in_features=32, out_features=24)),
])
def test_block_multiple_checked_at_construction(recipe, arg, kw):
    with pytest.raises(ValueError, match=f"{arg} must be a multiple of"):
        GroupedLinear(2, recipe=recipe, **kw)


@pytest.mark.parametrize("args, exc, name", [
    ((2.5, 8, 4), TypeError, "num_groups"),
    ((2, 8.0, 4), TypeError, "in_features"),
    ((2, 8, True), TypeError, "out_features"),
    ((2, 8, 0), ValueError, "out_features"),
])
def test_integer_arguments(args, exc, name):
    with pytest.raises(exc, match=name):
        GroupedLinear(*args)


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_cuda_matches_reference(dtype, as_tensor):
    gen = torch.Generator().manual_seed(1)
    _check_direct(dtype, True, random_splits(300, 6, gen, empty=(0, 3)), 136, 72, "cuda", as_tensor)


@pytest.mark.cuda
def test_cuda_validate_device_splits():
    m = GroupedLinear(2, 16, 8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(6, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sum to 5, but x has 6 rows"):
        m(x, torch.tensor([2, 3], device="cuda"), validate=True)
    with pytest.raises(ValueError, match="negative"):
        m(x, torch.tensor([7, -1], device="cuda"), validate=True)
    # unvalidated short splits: tail rows are zero, not garbage
    y = m(x, torch.tensor([2, 3], device="cuda"))
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))
