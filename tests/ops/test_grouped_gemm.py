"""Tests for moe_offload/ops/grouped_gemm.py (grouped GEMMs, row sums)."""
import pytest
import torch

from moe_offload.ops import grouped_gemm as gg

SPLITS = [3, 0, 7, 5]          # uneven, one empty group
OFFS = [3, 3, 10, 15]


def _offs(device="cpu"):
    return torch.tensor(OFFS, dtype=torch.int32, device=device)


def _ref_mm(a, b, bounds):
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(bounds):
        out[start:end] = a[start:end].double().cpu() @ b[g].double().cpu()
        start = end
    return out


def _ref_wgrad(a, b, bounds):
    out, start = [], 0
    for end in bounds:
        out.append(a[start:end].double().cpu().t() @ b[start:end].double().cpu())
        start = end
    return torch.stack(out)


# ------------------------------------------------------------------ grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K, N", [(8, 16), (7, 5), (1, 3)])
@pytest.mark.parametrize("b_layout", ["row", "transposed"])
def test_grouped_mm(dtype, K, N, b_layout):
    a = torch.randn(15, K).to(dtype)
    if b_layout == "row":
        b = torch.randn(4, K, N).to(dtype)
    else:
        b = torch.randn(4, N, K).to(dtype).transpose(1, 2)
    out = gg.grouped_mm(a, b, _offs())
    assert out.dtype == dtype and out.shape == (15, N)
    ref = _ref_mm(a, b, OFFS)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(out.double(), ref, atol=tol * max(1, ref.abs().max().item()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_mm_zero_tail(dtype):
    """Offsets covering 10 of 15 rows: the rest must come out exactly zero."""
    a = torch.randn(15, 16).to(dtype)
    b = torch.randn(2, 16, 8).to(dtype)
    offs = torch.tensor([4, 10], dtype=torch.int32)
    out = gg.grouped_mm(a, b, offs)
    assert torch.equal(out[10:], torch.zeros(5, 8, dtype=dtype))
    torch.testing.assert_close(out[:10].double(), _ref_mm(a, b, [4, 10])[:10], atol=0.1, rtol=0.02)


def test_grouped_mm_empty_rows():
    out = gg.grouped_mm(torch.randn(0, 8), torch.randn(3, 8, 4), torch.zeros(3, dtype=torch.int32))
    assert out.shape == (0, 4)


@pytest.mark.parametrize("fn, ref", [(gg._masked_mm, _ref_mm), (gg._loop_mm, _ref_mm)])
def test_fallbacks_mm(fn, ref):
    """The no-kernel paths (the masked one is the CUDA fallback), run here on CPU."""
    a, b = torch.randn(17, 6, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    out = fn(a, b, _offs())     # offsets cover 15 of 17 rows
    assert torch.equal(out[15:], torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(out, ref(a, b, OFFS), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ wgrad / row sums
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K, N", [(8, 16), (7, 5)])
def test_grouped_mm_wgrad(dtype, K, N):
    a, b = torch.randn(17, K).to(dtype), torch.randn(17, N).to(dtype)
    a[15:] = float("nan")           # rows past offs[-1] must be ignored
    out = gg.grouped_mm_wgrad(a, b, _offs())
    assert out.shape == (4, K, N) and out.dtype == dtype
    assert torch.equal(out[1], torch.zeros(K, N, dtype=dtype))   # empty group
    ref = _ref_wgrad(a, b, OFFS)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(out.double(), ref, atol=tol * max(1, ref.abs().max().item()), rtol=0)


def test_masked_wgrad_fallback():
    a, b = torch.randn(17, 6, dtype=torch.float64), torch.randn(17, 5, dtype=torch.float64)
    a[15:] = 1e30
    for fn in (gg._masked_wgrad, gg._loop_wgrad):
        torch.testing.assert_close(fn(a, b, _offs()), _ref_wgrad(a, b, OFFS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_row_sum(dtype):
    x = torch.randn(17, 5).to(dtype)
    x[15:] = float("nan")
    out = gg.group_row_sum(x, _offs())
    ref = torch.stack([x[s:e].double().sum(0) for s, e in zip([0] + OFFS[:-1], OFFS)])
    assert out.shape == (4, 5) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.01)


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_grouped_gemm(dtype):
    dev = "cuda"
    offs = _offs(dev)
    a, b = torch.randn(17, 7, device=dev).to(dtype), torch.randn(4, 5, 7, device=dev).to(dtype).transpose(1, 2)
    out = gg.grouped_mm(a, b, offs)
    assert torch.equal(out[15:], torch.zeros_like(out[15:]))
    ref = _ref_mm(a, b, OFFS)
    torch.testing.assert_close(out.double().cpu(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    c = torch.randn(17, 9, device=dev).to(dtype)
    junk = torch.full((4, 8, 16), float("nan"), device=dev, dtype=dtype)   # dirty the allocator
    del junk
    w = gg.grouped_mm_wgrad(a, c, offs)
    assert torch.equal(w[1], torch.zeros_like(w[1]))                      # empty group
    wref = _ref_wgrad(a, c, OFFS)
    torch.testing.assert_close(w.double().cpu(), wref, atol=0.05 * wref.abs().max().item(), rtol=0)
    s = gg.group_row_sum(c, offs)
    sref = torch.stack([c[st:e].double().cpu().sum(0) for st, e in zip([0] + OFFS[:-1], OFFS)])
    torch.testing.assert_close(s.double().cpu(), sref, atol=0.05 * sref.abs().max().item(), rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_zero_empty_groups(dtype):
    out = torch.full((5, 33, 130), float("nan"), device="cuda", dtype=dtype)
    offs = torch.tensor([0, 4, 4, 9, 9], dtype=torch.int32, device="cuda")
    gg.zero_empty_groups(out, offs)
    for g, empty in enumerate([True, False, True, False, True]):
        assert bool((out[g] == 0).all()) if empty else bool(out[g].isnan().all())
