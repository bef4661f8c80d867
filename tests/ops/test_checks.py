"""Tests for moe_offload/ops/checks.py (argument and input checks)."""
import pytest
import torch

from moe_offload.ops.checks import check_grouped_input, check_int


@pytest.mark.parametrize("value, exc", [(2.0, TypeError), (True, TypeError), ("2", TypeError),
                                        (0, ValueError), (-3, ValueError)])
def test_check_int_rejects(value, exc):
    with pytest.raises(exc, match="top_k"):
        check_int("top_k", value)


def test_check_int_accepts():
    assert check_int("top_k", 3) == 3 and check_int("n", 0, minimum=0) == 0


@pytest.mark.parametrize("x, exc, match", [
    ([1.0], TypeError, "x must be a tensor"),
    (torch.randn(4), ValueError, "x must be 2-D"),
    (torch.randn(4, 7), ValueError, "expected in_features=8"),
    (torch.randn(4, 8, dtype=torch.float64), TypeError, "x dtype"),
    (torch.randn(4, 8, device="meta"), TypeError, "x device"),
])
def test_check_grouped_input(x, exc, match):
    with pytest.raises(exc, match=match):
        check_grouped_input(x, torch.randn(2, 3, 8), 8)
