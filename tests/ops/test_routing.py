"""Tests for the public routing helpers: sort by expert, permute, (weighted) unpermute."""
import pytest
import torch

from moe_offload.ops import MoE
from moe_offload.ops.routing import (offsets_to_split_sizes, permute, permute_probs,
                                     sort_by_expert, unpermute)


def _ids(T, k, E, gen_empty=True):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    if gen_empty:
        ids[ids == 1] = 0          # expert 1 gets no token
    return ids


def test_sort_by_expert_stable_and_offsets():
    ids = _ids(11, 3, 6)
    order, offs = sort_by_expert(ids, 6)
    e = ids.reshape(-1)
    assert offs.dtype == torch.int32 and offs.device == ids.device
    assert torch.equal(e[order], e[order].sort().values)
    for g in range(6):   # stable: each expert's copies keep slot order
        rows = order[(e[order] == g)]
        assert torch.equal(rows, rows.sort().values)
    counts = torch.bincount(e, minlength=6)
    assert torch.equal(offs.long(), counts.cumsum(0))
    assert torch.equal(offsets_to_split_sizes(offs).long(), counts)
    assert offsets_to_split_sizes(offs)[1] == 0


def test_ids_past_num_experts_sort_last():
    ids = torch.tensor([[0, 5], [2, 1]])       # 5 >= E = 3 (an EP-style sentinel)
    order, offs = sort_by_expert(ids, 3)
    assert offs.tolist() == [1, 2, 3]
    assert order[-1].item() == 1


def _ref_combine(y_SH, order, k, p=None):
    S, H = y_SH.shape
    out = torch.zeros(S // k, H, dtype=y_SH.dtype)
    for i, s in enumerate(order.tolist()):
        w = 1.0 if p is None else p.reshape(-1)[s]
        out[s // k] += w * y_SH[i]
    return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_permute_unpermute_match_reference_and_gradcheck(k):
    T, H, E = 7, 5, 6
    ids = _ids(T, k, E)
    order, _ = sort_by_expert(ids, E)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    xs = permute(x, order, k)
    assert torch.equal(xs, x[order // k])
    y = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    p = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(unpermute(y, order, k), _ref_combine(y.detach(), order, k))
    torch.testing.assert_close(unpermute(y, order, k, probs_Tk=p),
                               _ref_combine(y.detach(), order, k, p.detach()))
    assert torch.autograd.gradcheck(lambda a: permute(a, order, k), (x,))
    assert torch.autograd.gradcheck(lambda a: unpermute(a, order, k), (y,))
    assert torch.autograd.gradcheck(lambda a, b: unpermute(a, order, k, probs_Tk=b), (y, p))
    ps = permute_probs(p, order)
    assert torch.equal(ps, p.reshape(-1)[order])


def test_deterministic_forward_and_backward():
    T, H, E, k = 64, 16, 8, 4
    ids = _ids(T, k, E, gen_empty=False)
    x = torch.randn(T, H)
    p = torch.rand(T, k)
    dy = torch.randn(T, H)
    results = []
    for _ in range(2):
        xi, pi = x.clone().requires_grad_(), p.clone().requires_grad_()
        order, _ = sort_by_expert(ids, E)
        xs = permute(xi, order, k) * 1.5
        out = unpermute(xs, order, k, probs_Tk=pi) + unpermute(xs, order, k)
        out.backward(dy)
        results.append((out, xi.grad, pi.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bitwise_equal_to_moe_permutation():
    """MoE's own permutation and the public helpers give the same bits (so MoE can
    switch to them unchanged)."""
    m = MoE(12, 8, 5, 2, aux_loss_coef=0.0)
    x = torch.randn(3, 7, 12, requires_grad=True)
    dy = torch.randn(3, 7, 12)
    y_ref = m(x)
    y_ref.backward(dy)
    ref = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()

    x_TH = x.reshape(-1, 12)
    _, p_Tk, e_Tk = m.route(x_TH)
    order, offs = sort_by_expert(e_Tk, 5)
    ys = m.experts.forward_offsets(permute(x_TH, order, 2), offs, permute_probs(p_Tk, order))
    y = unpermute(ys, order, 2).view(x.shape)
    y.backward(dy)
    assert torch.equal(y, y_ref)
    for a, b in zip(ref, [x.grad] + [p.grad for p in m.parameters()]):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="expert_ids_Tk"):
        sort_by_expert(torch.rand(3, 2), 4)
    with pytest.raises(ValueError, match="num_experts"):
        sort_by_expert(torch.zeros(3, 2, dtype=torch.long), 0)
    order, _ = sort_by_expert(torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_k"):
        permute(torch.randn(3, 4), order, 0)
    with pytest.raises(ValueError, match="x_TH"):
        permute(torch.randn(4, 4), order, 2)
    with pytest.raises(ValueError, match="y_SH"):
        unpermute(torch.randn(5, 4), order, 2)
    with pytest.raises(ValueError, match="probs_Tk"):
        unpermute(torch.randn(6, 4), order, 2, probs_Tk=torch.rand(3, 3))
    with pytest.raises(TypeError, match="order_S"):
        permute(torch.randn(3, 4), order.float(), 2)


@pytest.mark.cuda
def test_no_host_sync_cuda():
    T, H, E, k = 256, 64, 8, 2
    ids = _ids(T, k, E, gen_empty=False).cuda()
    x = torch.randn(T, H, device="cuda", requires_grad=True)
    p = torch.rand(T, k, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        order, offs = sort_by_expert(ids, E)
        offsets_to_split_sizes(offs)
        xs = permute(x, order, k)
        out = unpermute(xs, order, k, probs_Tk=p) + unpermute(xs, order, k)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
