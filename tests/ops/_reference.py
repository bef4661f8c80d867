"""Loop-of-matmuls references and the flash-attention style error bound for tests/ops.

``bound_check(ours, lowp, ref)``: ``max|ours - ref| <= 2 * max|lowp - ref| + eps``, where
``lowp`` is the same per-group loop computed with plain torch ops in the test dtype (so
the bound is torch's own error at that precision) and ``ref`` the float64 loop.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F


def act_ref(h, activation):
    """Plain-torch activation (exact gelu), the gate is the first half."""
    if activation in ("swiglu", "geglu"):
        a, b = h.chunk(2, dim=-1)
        return (F.silu(a) if activation == "swiglu" else F.gelu(a)) * b
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)


def linear_loop(x, w, b, splits):
    """``cat_g(x_g @ w[g].T + b[g])`` with torch ops in the inputs' dtype."""
    outs, start = [], 0
    for g, s in enumerate(splits):
        y = x[start:start + s] @ w[g].t()
        outs.append(y + b[g] if b is not None else y)
        start += s
    return torch.cat(outs)


def mlp_loop(x, w1, b1, w2, b2, probs, splits, activation):
    """Per-group fc1 -> act -> * probs -> fc2 with torch ops in the inputs' dtype."""
    outs, start = [], 0
    for g, s in enumerate(splits):
        h = x[start:start + s] @ w1[g].t()
        if b1 is not None:
            h = h + b1[g]
        a = act_ref(h, activation)
        if probs is not None:
            a = a * probs.reshape(-1)[start:start + s].unsqueeze(1).to(a.dtype)
        y = a @ w2[g].t()
        outs.append(y + b2[g] if b2 is not None else y)
        start += s
    return torch.cat(outs)


def run_with_grads(fn, inputs, dy, dtype=None):
    """Clone ``inputs`` (cast to ``dtype``), run ``fn``, backprop ``dy``; returns
    ``[out, grad_0, grad_1, ...]`` (``None`` inputs give ``None``)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
              for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def bound_check(ours, lowp, ref, name="", factor=2.0):
    """Assert ``max|ours-ref| <= factor*max|lowp-ref| + eps`` for each pair of tensors."""
    for i, (o, l, r) in enumerate(zip(ours, lowp, ref)):
        if r is None:
            assert o is None or not o.any(), f"{name}[{i}]: expected no grad"
            continue
        assert o is not None, f"{name}[{i}]: missing grad"
        assert o.shape == r.shape, f"{name}[{i}]: shape {tuple(o.shape)} != {tuple(r.shape)}"
        o64, l64, r64 = o.double(), l.double(), r.double()
        assert torch.isfinite(o64).all(), f"{name}[{i}]: non-finite values"
        err = (o64 - r64).abs().max().item() if o.numel() else 0.0
        torch_err = (l64 - r64).abs().max().item() if o.numel() else 0.0
        scale = r64.abs().max().item() if o.numel() else 0.0
        # one ulp of the largest value (fp64: the reference itself, so allow rounding noise)
        eps = (1e-12 if o.dtype == torch.float64 else torch.finfo(o.dtype).eps) * max(scale, 1e-3)
        assert err <= factor * torch_err + eps, (
            f"{name}[{i}]: err {err:.3g} > {factor}*torch err {torch_err:.3g} + {eps:.3g}")


def random_splits(T, G, gen=None, empty=(1,)):
    """``G`` non-negative sizes summing to ``T`` with the groups in ``empty`` set to 0."""
    g_live = [g for g in range(G) if g not in empty]
    cuts = sorted(torch.randint(0, T + 1, (len(g_live) - 1,), generator=gen).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    out = [0] * G
    for g, s in zip(g_live, sizes):
        out[g] = s
    return out
