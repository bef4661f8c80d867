"""Tests for moe_offload/ops/gemm/bf16.py and the protocol helpers of gemm/base.py."""
import pytest
import torch

from moe_offload.ops.gemm import RECIPES, backend_for, check_recipe
from moe_offload.ops.gemm.base import Operand, Rows
from moe_offload.ops.gemm.bf16 import BF16
from moe_offload.ops.gemm.emulated import EmulatedBackend
from moe_offload.ops.grouped_gemm import grouped_mm, grouped_mm_wgrad

OFFS = torch.tensor([3, 3, 7], dtype=torch.int32)   # 7 of 10 rows: 3 tail rows


def _nan_tail(T, K):
    x = torch.randn(T, K)
    x[7:] = float("nan")
    return x


def test_tail_modes_are_the_grouped_mm_calls():
    """Each ``tail`` mode is exactly one grouped_mm call (bitwise)."""
    x, w = _nan_tail(10, 16), torch.randn(3, 8, 16)
    rows = Rows(OFFS, 10, covered=False)
    wq = BF16.quantize_weight(w, True)
    y_zero = BF16.forward(Operand(x), wq, rows, "zero", x.dtype)
    assert torch.equal(y_zero, grouped_mm(x, w.transpose(1, 2), OFFS, zero_tail=True))
    assert torch.equal(y_zero[7:], torch.zeros(3, 8))
    x0 = x.clone()
    x0[7:] = 0
    y_in = BF16.forward(Operand(x0), wq, rows, "zero_input", x.dtype)
    assert torch.equal(y_in, grouped_mm(x0, w.transpose(1, 2), torch.tensor([3, 3, 10], dtype=torch.int32),
                                        zero_tail=False))
    assert torch.equal(y_in[7:], torch.zeros(3, 8))
    y_any = BF16.forward(Operand(x), wq, rows, "any", x.dtype)
    assert torch.equal(y_any[:7], y_zero[:7])
    dy = torch.randn(10, 8)
    dx = BF16.dgrad(Operand(dy), BF16.weight_for_dgrad(w, None), rows, "zero", x.dtype)
    assert torch.equal(dx, grouped_mm(dy, w, OFFS, zero_tail=True))
    dw = BF16.wgrad(Operand(dy), Operand(x0), rows, x.dtype)
    assert torch.equal(dw, grouped_mm_wgrad(dy, x0, OFFS))


def test_covered_rows_skip_the_tail_work():
    rows = Rows(torch.tensor([3, 10], dtype=torch.int32), 10, covered=True)
    assert rows.rows_end is None and rows.cover_G is rows.offs_G
    y = torch.randn(10, 4)
    assert rows.mask_tail(y) is y


def test_identity_operands_and_storage():
    x = torch.randn(5, 4)
    assert BF16.quantize_act(x, OFFS, True, False).data is x
    assert BF16.quantize_act(x, OFFS, False, False) is None
    assert BF16.store(x, OFFS) is x and BF16.load(x, torch.float32) is x
    assert not BF16.quantized


def test_registry():
    assert set(RECIPES) == {"fp8", "mxfp8", "nvfp4"}
    x = torch.randn(4, 32)
    assert backend_for(None, x, 32, 32) is BF16
    assert isinstance(backend_for("fp8", x, 32, 32), EmulatedBackend)      # CPU: no FP8 kernel
    assert backend_for("nvfp4", x, 32, 32).name == "nvfp4"
    with pytest.raises(ValueError, match="unknown recipe 'int4'"):
        backend_for("int4", x, 32, 32)
    with pytest.raises(ValueError, match="width must be a multiple of 32"):
        check_recipe("mxfp8", width=48)
    assert check_recipe("fp8", width=7) == "fp8"
