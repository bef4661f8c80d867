"""The one reference module of the tests: plain-torch and float64 references.

Layers (tests/ops): loop-of-matmuls references and the flash-attention style error
bound.  ``bound_check(ours, lowp, ref)``: ``max|ours - ref| <= 2 * max|lowp - ref| + eps``,
where ``lowp`` is the same per-group loop computed with plain torch ops in the test
dtype (so the bound is torch's own error at that precision) and ``ref`` the float64
loop.

Formats (tests/tensor): float64 references of the format formulas, independent of
``moe_offload.tensor.formats``.  Rounding to a low-precision grid is done by
nearest-value search over the format's full code table with ties broken towards the
even code, so a bug in the library's casts or bit tricks cannot hide in the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ============================================================================ layers
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


# ============================================================================ formats
E4M3_MAX = 448.0


def _e4m3_table():
    codes = torch.arange(0, 127, dtype=torch.uint8)             # +0 .. 448 (0x7F is NaN)
    return codes.view(torch.float8_e4m3fn).double()


_E4M3 = _e4m3_table()
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _rne_codes(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Magnitude code of ``|v|`` (float64, finite, already saturated) by RNE onto ``table``."""
    a = v.abs().reshape(-1, 1)
    d = (a - table.reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    idx = torch.arange(table.numel()).reshape(1, -1).expand_as(cand)
    # among tied candidates prefer the even code
    even = cand & (idx % 2 == 0)
    pick = torch.where(even.any(1, keepdim=True), even, cand)
    return pick.float().argmax(1).reshape(v.shape)


def e4m3_rne(v: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 codes of float64 ``v`` (saturating at 448), sign bit kept."""
    v = v.double().clamp(-E4M3_MAX, E4M3_MAX)
    mag = _rne_codes(v, _E4M3).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 7)


def e2m1_rne(v: torch.Tensor) -> torch.Tensor:
    v = v.double().clamp(-6.0, 6.0)
    mag = _rne_codes(v, _E2M1).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def f32(v: torch.Tensor) -> torch.Tensor:
    """Round float64 to the nearest fp32 (models one fp32 operation), back to float64."""
    return v.float().double()


def fp8_ref(x: torch.Tensor, sizes, power_2=False):
    """(codes uint8 (T,K), scale_inv fp32 (G,), amax (G,)) for FP8 current scaling."""
    codes, sinv, amaxes = [], [], []
    start = 0
    for n in sizes:
        xg = x[start:start + n].double()
        amax = xg.abs().max().item() if n else 0.0
        if amax > 0 and math.isfinite(amax):
            scale = f32(torch.tensor(448.0 / amax)).item()
            if power_2:
                scale = 2.0 ** math.floor(math.log2(scale))
        else:
            scale = 1.0
        codes.append(e4m3_rne(f32(xg * scale)))
        sinv.append(f32(torch.tensor(1.0 / scale)).item())
        amaxes.append(amax)
        start += n
    return torch.cat(codes), torch.tensor(sinv, dtype=torch.float32), torch.tensor(amaxes, dtype=torch.float32)


def mx_exponent(amax: float) -> int:
    """Smallest e with 448 * 2^e >= amax (= ceil(log2(amax/448))), exactly."""
    e = math.ceil(math.log2(amax / 448.0))
    while 448.0 * 2.0 ** e < amax:
        e += 1
    while 448.0 * 2.0 ** (e - 1) >= amax:
        e -= 1
    return e


def mx_rows_ref(x: torch.Tensor):
    """(codes uint8 (R,C), e8m0 uint8 (R, C/32)) for MXFP8 blocks along the last dim."""
    R, C = x.shape
    xb = x.double().reshape(R, C // 32, 32)
    codes = torch.zeros(R, C // 32, 32, dtype=torch.uint8)
    e8 = torch.zeros(R, C // 32, dtype=torch.uint8)
    for r in range(R):
        for b in range(C // 32):
            amax = xb[r, b].abs().max().item()
            if amax == 0:
                e8[r, b] = 127
                codes[r, b] = e4m3_rne(xb[r, b])
                continue
            e = max(mx_exponent(amax), -127)
            e8[r, b] = e + 127
            codes[r, b] = e4m3_rne(xb[r, b] / 2.0 ** e)
    return codes.reshape(R, C), e8


def nvfp4_rows_ref(x: torch.Tensor, s_enc_rows: torch.Tensor):
    """(unpacked codes (R,C), block scales uint8 (R, C/16)) for NVFP4 along the last dim;
    ``s_enc_rows``: float64 (R,) per-row S_enc (already an fp32 value)."""
    R, C = x.shape
    xb = x.double().reshape(R, C // 16, 16)
    s = s_enc_rows.double().reshape(R, 1)
    bamax = xb.abs().amax(-1)
    bs_code = e4m3_rne(f32(f32(bamax * s) / 6.0))
    bs = bs_code.view(torch.float8_e4m3fn).double()
    v = f32(f32(xb * s.unsqueeze(-1)) / bs.unsqueeze(-1))
    v = torch.where(bs.unsqueeze(-1) == 0, torch.zeros_like(v), v)
    return e2m1_rne(v).reshape(R, C), bs_code


def nvfp4_s_enc(amax: float) -> float:
    if amax > 0 and math.isfinite(amax):
        return f32(torch.tensor(448.0 * 6.0 / amax)).item()
    return 1.0


def pad_transpose_ref(x: torch.Tensor, sizes, align: int, Tc: int) -> torch.Tensor:
    """(K, Tc) float64: each group's rows as columns, groups padded to ``align``."""
    out = torch.zeros(x.shape[1], Tc, dtype=torch.float64)
    start = col = 0
    for n in sizes:
        out[:, col:col + n] = x[start:start + n].double().t()
        start += n
        col += (n + align - 1) // align * align
    return out
