"""Chunked LM head + cross-entropy vs a float64 reference and vs the unchunked PyTorch path.

Bitwise: nothing is promised against ``F.cross_entropy(F.linear(h, W).float(), y)``: our
loss is ``logsumexp - target logit`` (theirs ``-log_softmax[target]``) and our softmax
gradient is ``exp(z - lse)`` (theirs ``exp(log_softmax)``), so they round differently.
Bitwise *is* promised (and tested) for what is transport: saved-tensor hooks that copy
the saved tensors, and the input gradient of a frozen vs a trainable weight.
Everything else is within ``2 x`` PyTorch's own error against float64 (``bound_check``).
"""
import pytest
import torch
import torch.nn.functional as F

from moe_offload.ops.linear_cross_entropy import (causal_lm_loss, default_chunk_tokens,
                                                  linear_cross_entropy)
from tests.reference import bound_check


def _inputs(T, H, V, dtype, bias=False, ignore_every=4, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * H ** -0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    y = torch.randint(0, V, (T,), generator=g)
    y[::ignore_every] = ignore_index
    return h, w, b, y


def _torch_loss(h, w, b, y, ignore_index=-100, reduction="mean", denominator=None):
    """The unchunked path (HF's): GEMM in the input dtype, then ``.float()``."""
    z = F.linear(h, w, b)
    z = z.float() if z.dtype != torch.float64 else z
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction)
    return loss if denominator is None else loss / denominator


def _loss_and_grads(fn, h, w, b, dtype=None):
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in (h, w, b)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [None if t is None else t.grad for t in leaves]


def _check(T, H, V, dtype, chunk, bias=False, reduction="mean", denominator=None, ignore_index=-100):
    h, w, b, y = _inputs(T, H, V, dtype, bias, ignore_index=ignore_index)
    kw = dict(ignore_index=ignore_index, reduction=reduction, denominator=denominator)
    ours = _loss_and_grads(lambda h, w, b: linear_cross_entropy(h, w, y, bias_V=b, chunk_tokens=chunk, **kw),
                           h, w, b)
    lowp = _loss_and_grads(lambda h, w, b: _torch_loss(h, w, b, y, **kw), h, w, b)
    ref = _loss_and_grads(lambda h, w, b: _torch_loss(h, w, b, y, **kw), h, w, b, torch.float64)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    bound_check(ours, lowp, ref, name=f"{dtype} T={T} chunk={chunk} bias={bias} {reduction}")
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 64, 7, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(dtype, chunk, bias):
    """Loss and grads of h, W, b; chunk sizes 7 and 1 do not divide T = 45."""
    _check(45, 32, 300, dtype, chunk, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_and_denominator(dtype):
    _check(40, 16, 100, dtype, 9, reduction="sum")
    _check(40, 16, 100, dtype, 9, reduction="sum", denominator=torch.tensor(57))      # HF num_items_in_batch
    _check(40, 16, 100, dtype, 9, reduction="sum", denominator=13)


def test_other_ignore_index():
    ours, ref = _check(30, 16, 50, torch.float32, 8, ignore_index=-1)
    assert torch.isfinite(ours[0])


def test_all_ignored_matches_torch():
    """``mean`` over zero tokens is 0/0 = nan, as ``F.cross_entropy``; the gradients are
    zero in both.  With a denominator (HF's ``num_items_in_batch`` path) the loss is 0."""
    h, w, _, y = _inputs(12, 8, 20, torch.float32)
    y.fill_(-100)
    for reduction, denominator in (("mean", None), ("sum", 5)):
        ours = _loss_and_grads(lambda h, w, b: linear_cross_entropy(h, w, y, reduction=reduction,
                                                                    denominator=denominator, chunk_tokens=5),
                               h, w, None)
        theirs = _loss_and_grads(lambda h, w, b: _torch_loss(h, w, b, y, reduction=reduction,
                                                             denominator=denominator), h, w, None)
        assert torch.equal(ours[0], theirs[0]) or (ours[0].isnan() and theirs[0].isnan())
        assert ours[0].isnan().item() == (reduction == "mean")
        for a, b in zip(ours[1:3], theirs[1:3]):
            assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))


def test_no_tokens_matches_torch():
    h, w, _, y = _inputs(0, 8, 20, torch.float32)
    ours = _loss_and_grads(lambda h, w, b: linear_cross_entropy(h, w, y), h, w, None)
    theirs = _loss_and_grads(lambda h, w, b: _torch_loss(h, w, b, y), h, w, None)
    assert ours[0].isnan() and theirs[0].isnan()
    assert all(torch.equal(a, b) for a, b in zip(ours[1:3], theirs[1:3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weight_and_frozen_hidden(dtype):
    h, w, _, y = _inputs(33, 16, 70, dtype)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    linear_cross_entropy(hg, wg, y, chunk_tokens=10).backward()
    hf = h.clone().requires_grad_()
    linear_cross_entropy(hf, w, y, chunk_tokens=10).backward()            # frozen LM head
    assert torch.equal(hf.grad, hg.grad)
    wf = w.clone().requires_grad_()
    linear_cross_entropy(h, wf, y, chunk_tokens=10).backward()            # hidden needs no grad
    assert torch.equal(wf.grad, wg.grad)
    with pytest.raises(RuntimeError):                                     # nothing needs grad
        linear_cross_entropy(h, w, y, chunk_tokens=10).backward()


def test_gradcheck_float64():
    h, w, b, y = _inputs(7, 4, 6, torch.float64, bias=True, ignore_every=3)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    for chunk in (3, 7):
        for reduction, den in (("mean", None), ("sum", 4.0)):
            fn = lambda h, w, b: linear_cross_entropy(h, w, y, bias_V=b, chunk_tokens=chunk, reduction=reduction,
                                                      denominator=den, logit_dtype=torch.float64)
            assert torch.autograd.gradcheck(fn, (h, w, b))


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return loss, numels


def test_saves_no_logits():
    """The forward saves h, W, labels and T log-sum-exps (and the mean's 0-dim count):
    nothing of T x V elements.
    (The unchunked path does save T x V tensors, so the check can fail.)"""
    T, H, V = 200, 8, 100                      # T*V = 20000 > V*H, T*H
    h, w, _, y = _inputs(T, H, V, torch.bfloat16)
    h, w = h.requires_grad_(), w.requires_grad_()
    _, numels = _saved_numels(lambda: linear_cross_entropy(h, w, y, chunk_tokens=16))
    assert sorted(numels) == sorted([T * H, V * H, T, T, 1])
    _, theirs = _saved_numels(lambda: _torch_loss(h, w, None, y))
    assert max(theirs) >= T * V


def test_saved_tensors_survive_hooks_bitwise():
    """Saved tensors copied by a pack hook (as the offload engine does) give identical grads."""
    h, w, _, y = _inputs(50, 16, 90, torch.bfloat16)
    runs = []
    for hooks in (False, True):
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                loss = linear_cross_entropy(hg, wg, y, chunk_tokens=16)
        else:
            loss = linear_cross_entropy(hg, wg, y, chunk_tokens=16)
        loss.backward()
        runs.append((loss, hg.grad, wg.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_batched_shapes_and_causal_lm_loss():
    """``(B, S, H)`` inputs; ``causal_lm_loss`` = shift left + ignore the last position."""
    B, S, H, V = 3, 11, 16, 40
    h, w, _, _ = _inputs(B * S, H, V, torch.float32)
    h = h.view(B, S, H)
    labels = torch.randint(0, V, (B, S))
    labels[0, :4] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], 1)
    ref = _torch_loss(h.reshape(-1, H), w, None, shifted.reshape(-1))
    ours = causal_lm_loss(h, w, labels, chunk_tokens=5)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(causal_lm_loss(h, w, None, shift_labels=shifted, chunk_tokens=5), ref,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(causal_lm_loss(h, w, labels.int(), chunk_tokens=5), ref, rtol=1e-6, atol=0)
    n = (shifted != -100).sum() + 3
    torch.testing.assert_close(causal_lm_loss(h, w, labels, num_items_in_batch=n, chunk_tokens=5),
                               _torch_loss(h.reshape(-1, H), w, None, shifted.reshape(-1), reduction="sum") / n,
                               rtol=1e-6, atol=0)


def test_autocast_runs_gemm_in_autocast_dtype():
    """Under CPU autocast (bf16) with fp32 params, as ``F.linear`` under autocast."""
    h, w, _, y = _inputs(30, 16, 50, torch.float32)
    ours = _loss_and_grads(lambda h, w, b: _autocast(lambda: linear_cross_entropy(h, w, y, chunk_tokens=8)),
                           h, w, None)
    lowp = _loss_and_grads(lambda h, w, b: _autocast(lambda: _torch_loss(h, w, None, y)), h, w, None)
    ref = _loss_and_grads(lambda h, w, b: _torch_loss(h, w, None, y), h, w, None, torch.float64)
    assert ours[1].dtype == torch.float32
    bound_check(ours[:3], lowp[:3], ref[:3], name="autocast")
    assert not torch.equal(ours[0], _torch_loss(h, w, None, y))          # it did run in bf16


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def test_default_chunk_tokens():
    assert default_chunk_tokens(151_936) == 1728                      # 1728 * 151936 * 4 B = 1002 MiB
    assert default_chunk_tokens(32_000) == 8384
    assert default_chunk_tokens(10 ** 10) == 1
    assert default_chunk_tokens(151_936, torch.bfloat16) == 3520


def test_bad_inputs():
    h, w, _, y = _inputs(10, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="denominator"):
        linear_cross_entropy(h, w, y, denominator=3)
    with pytest.raises(ValueError, match="last dim"):
        linear_cross_entropy(h[:, :4], w, y)
    with pytest.raises(ValueError, match="labels_T shape"):
        linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="dtypes differ"):
        linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match="bias_V"):
        linear_cross_entropy(h, w, y, bias_V=torch.zeros(3))
    with pytest.raises(ValueError, match="do not match"):
        causal_lm_loss(h.view(2, 5, 8), w, y.view(5, 2)[:4])
