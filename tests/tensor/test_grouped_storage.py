"""GroupedTensorStorage: split, usages, saving contract, components, allocation rule."""
import pytest
import torch

from moe_offload.offload.marks import iter_component_tensors, mark_not_offload, is_marked_not_offload
from moe_offload.offload.saving import prepare_for_saving, restore_from_saved
from moe_offload.tensor import (Float8CurrentScalingQuantizer, GroupedTensorStorage, MXFP8Quantizer,
                                NVFP4Quantizer, group_quantize)
from moe_offload.tensor.grouped_storage import COMPONENTS

QUANTS = [Float8CurrentScalingQuantizer(columnwise=True), MXFP8Quantizer(columnwise=True),
          NVFP4Quantizer(columnwise=True)]
SIZES = [5, 0, 40, 19]


def _q(quant, device="cpu"):
    x = torch.randn(sum(SIZES), 64, device=device)
    return x, group_quantize(x, quant, SIZES)


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.fmt)
def test_split_views_match_dequantize(quant):
    x, q = _q(quant)
    parts = q.split()
    assert [p.rows for p in parts] == SIZES
    start = 0
    for g, p in enumerate(parts):
        assert p.rowwise_data.shape[0] == SIZES[g]
        assert p.rowwise_data.data_ptr() == q.rowwise_2d()[0][start:].data_ptr() or SIZES[g] == 0
        # a one-group storage rebuilt from the views dequantizes to the same rows
        if SIZES[g]:
            cols = p.columnwise_data.shape[1] * (2 if quant.fmt == "nvfp4" else 1)
            assert cols % q.col_align == 0 and cols >= SIZES[g]
        start += SIZES[g]
    assert parts[1].rows == 0 and parts[1].rowwise_data.numel() == 0


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.fmt)
def test_columnwise_dequantize_tracks_input(quant):
    x, q = _q(quant)
    r = q.dequantize(torch.float32, "rowwise")
    c = q.dequantize(torch.float32, "columnwise")
    tol = {"fp8": 0.07, "mxfp8": 0.07, "nvfp4": 0.4}[quant.fmt]
    assert (r - x).abs().max() <= tol * x.abs().max()
    assert (c - x).abs().max() <= tol * x.abs().max()
    if quant.fmt == "fp8":
        assert torch.equal(r, c)


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.fmt)
def test_update_usage_drops_buffers(quant):
    x, q = _q(quant)
    before = q.dequantize(torch.float32, "columnwise")
    q.update_usage(rowwise=False)
    assert q.rowwise_data is None and q.rowwise_scale_inv is None
    assert torch.equal(q.dequantize(torch.float32), before)  # falls back to columnwise
    with pytest.raises(RuntimeError, match="dropped"):
        q.rowwise_2d()
    with pytest.raises(RuntimeError, match="absent"):
        q.update_usage(rowwise=True)
    q.update_usage(columnwise=True)  # present: fine
    with pytest.raises(ValueError):
        q.dequantize(usage="diagonal")


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.fmt)
def test_prepare_restore_round_trip_and_component_tensors(quant):
    x, q = _q(quant)
    ref = q.dequantize(torch.float32)
    comps = q.component_tensors()
    assert len(comps) == len(COMPONENTS)
    assert q.component_tensors()[0] is comps[0]  # non-mutating
    tensors, shell = q.prepare_for_saving()
    assert shell is q and all(t is None for t in q.component_tensors())
    tail = shell.restore_from_saved(list(tensors) + ["extra"])
    assert tail == ["extra"]
    assert torch.equal(shell.dequantize(torch.float32), ref)
    # through the offload helpers (the contract in docs/architecture.md)
    flat, state = prepare_for_saving(None, q, x)
    assert len(flat) == len(COMPONENTS) + 1
    none, q2, x2 = restore_from_saved(state, flat)
    assert none is None and x2 is x and torch.equal(q2.dequantize(torch.float32), ref)
    with pytest.raises(ValueError):
        q2.restore_from_saved([None])


def test_marks_reach_components():
    x, q = _q(Float8CurrentScalingQuantizer(columnwise=True))
    assert len(list(iter_component_tensors(q))) == len(COMPONENTS)
    mark_not_offload(q)
    assert all(is_marked_not_offload(t) for t in q.component_tensors())


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.fmt)
def test_every_component_is_its_own_allocation(quant):
    """TE defect 4: no bulk buffer in which a small scale keeps big data alive."""
    x, q = _q(quant)
    comps = [t for t in q.component_tensors() if t is not None]
    ptrs = [t.untyped_storage().data_ptr() for t in comps]
    assert len(set(ptrs)) == len(ptrs)
    for t in comps:
        assert t.dim() == 1 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_bad_construction():
    with pytest.raises(ValueError):
        GroupedTensorStorage("int8", (1, 1), torch.float32, 1, 16)
    with pytest.raises(TypeError):
        GroupedTensorStorage("fp8", (1, 1), torch.float32, 1, 16, bogus=torch.zeros(1))


def test_nbytes_fp8_about_half_of_bf16():
    x = torch.randn(4096, 256, dtype=torch.bfloat16)
    q = group_quantize(x, Float8CurrentScalingQuantizer(rowwise=False, columnwise=True), [1024] * 4)
    assert q.nbytes() <= 0.52 * x.numel() * 2


@pytest.mark.cuda
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.fmt)
def test_dropping_data_frees_cuda_memory(quant):
    x = torch.randn(4096, 1024, device="cuda")
    q = group_quantize(x, quant, [1000, 0, 3096, 0])
    del x
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    nbytes = q.rowwise_data.numel() * q.rowwise_data.element_size()
    q.update_usage(rowwise=False)
    after = torch.cuda.memory_allocated()
    assert before - after >= nbytes  # the scale buffers do not keep the data alive
    # and a saved-then-dropped component frees as well (what offload relies on)
    tensors, shell = q.prepare_for_saving()
    cw = tensors[COMPONENTS.index("columnwise_data")]
    n2 = cw.numel() * cw.element_size()
    tensors[COMPONENTS.index("columnwise_data")] = None
    del cw
    assert after - torch.cuda.memory_allocated() >= n2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_low_precision_dequantize_is_rounded_fp32(dtype):
    x, q = _q(Float8CurrentScalingQuantizer())
    assert torch.equal(q.dequantize(dtype), q.dequantize(torch.float32).to(dtype))
