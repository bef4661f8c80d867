"""Tests for moe_offload/tensor/row_groups.py (offsets from splits, ids, sizes, masks)."""
import pytest
import torch

from moe_offload.tensor import row_groups as rg

SPLITS = [3, 0, 7, 5]          # uneven, one empty group
OFFS = [3, 3, 10, 15]
CPU = torch.device("cpu")


@pytest.mark.parametrize("splits", [SPLITS, tuple(SPLITS), torch.tensor(SPLITS),
                                    torch.tensor(SPLITS, dtype=torch.int32)])
def test_offsets_host(splits):
    offs = rg.offsets_from_splits(splits, 15, CPU, num_groups=4)
    assert offs.dtype == torch.int32 and offs.tolist() == OFFS
    assert rg.offsets_from_splits(splits, 15, CPU).tolist() == OFFS   # G from the splits


@pytest.mark.parametrize("splits, exc, match", [
    ([3, 0, 7], ValueError, "3 groups, expected num_groups=4"),
    (torch.tensor([3, 0, 7]), ValueError, "3 groups, expected num_groups=4"),
    ([3, -1, 8, 5], ValueError, "negative"),
    (torch.tensor([3, -1, 8, 5]), ValueError, "negative"),
    ([3, 0, 7, 4], ValueError, "sum to 14, but x has 15 rows"),
    (torch.tensor([3, 0, 7, 6]), ValueError, "sum to 16, but x has 15 rows"),
    ([3.0, 0, 7, 5], TypeError, "must contain ints, got float"),
    ([True, 0, 7, 5], TypeError, "must contain ints, got bool"),
    (torch.tensor([3.0, 0, 7, 5]), TypeError, "integer tensor, got dtype torch.float32"),
    (torch.tensor([True, False, True, True]), TypeError, "integer tensor"),
    (torch.tensor([[3, 0], [7, 5]]), ValueError, "must be 1-D"),
    ("3,0,7,5", TypeError, "list of ints or an integer tensor, got str"),
])
def test_offsets_bad(splits, exc, match):
    with pytest.raises(exc, match=match):
        rg.offsets_from_splits(splits, 15, CPU, num_groups=4)


def test_offsets_need_a_group():
    with pytest.raises(ValueError, match="at least one group"):
        rg.offsets_from_splits([], 0, CPU)


def test_group_ids_sizes_masks():
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    assert rg.group_ids(offs, 12).tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 3, 3]
    assert rg.group_sizes(offs).tolist() == [3, 0, 7]
    assert rg.live_rows(offs[-1:], 12).squeeze(1).tolist() == [True] * 10 + [False] * 2
    assert rg.cover_all_rows(offs, 12).tolist() == [3, 3, 12]


@pytest.mark.cuda
def test_cuda_unchecked_device_offsets_are_clamped():
    """Bad device splits are not checked without validate=True, but give safe offsets."""
    dev = torch.device("cuda", torch.cuda.current_device())
    offs = rg.offsets_from_splits(torch.tensor([4, -3, 9, 2], device=dev), 10, dev, num_groups=4)
    assert offs.tolist() == [4, 4, 10, 10]
    with pytest.raises(ValueError, match="negative"):
        rg.offsets_from_splits(torch.tensor([4, -3, 9, 0], device=dev), 10, dev, validate=True)
    with pytest.raises(ValueError, match="sum to 11"):
        rg.offsets_from_splits(torch.tensor([4, 7], device=dev), 10, dev, validate=True)
    with pytest.raises(TypeError, match="integer tensor"):
        rg.offsets_from_splits(torch.tensor([4.0, 6.0], device=dev), 10, dev)
