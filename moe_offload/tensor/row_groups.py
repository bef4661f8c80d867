"""Row groups: ``G`` consecutive (uneven, possibly empty) groups of the ``T`` rows of a matrix.

The one home of the concept, used by the quantized containers (``tensor/``) and the
grouped layers (``ops/``) alike.  A grouping is described by ``offs_G``: the int32
*end* offset of each group on the device; group ``g`` owns rows ``offs[g-1]:offs[g]``
(group 0 starts at row 0).  Rows at or past ``offs[-1]`` (the "tail") belong to no
group.

Nothing here reads a device value back to the host, except :func:`offsets_from_splits`
with ``validate=True`` (documented there).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["SplitSizes", "offsets_from_splits", "group_ids", "group_sizes", "live_rows",
           "cover_all_rows"]

SplitSizes = Union[torch.Tensor, Sequence[int]]


def offsets_from_splits(split_sizes: SplitSizes, num_rows: int, device, *,
                        num_groups: Optional[int] = None, validate: bool = False) -> torch.Tensor:
    """Turn per-group row counts into int32 end offsets ``offs_G`` on ``device``.

    One rule for every caller:

    - **Host splits** (a list/tuple of ints or a CPU integer tensor) are always checked,
      which costs nothing: no negative size, sum equal to ``num_rows``.
    - **Device splits** (an integer tensor on ``device``): the cumsum runs on the device.
      They are checked only when ``validate=True``, which reads two values back and
      therefore **syncs the host**.  Unchecked, they are made memory-safe on the device:
      negative sizes count as 0 and the offsets are clamped to ``num_rows`` (rows past
      the last offset are then the tail, which the layers zero).
    - ``num_groups``: the expected ``G`` (checked); ``None`` takes it from the splits.

    Raises ``TypeError`` for non-integer sizes or a tensor on another accelerator, and
    ``ValueError`` (naming ``split_sizes``) for a wrong number of groups, negative sizes
    or a sum != ``num_rows``.
    """
    device = torch.device(device)
    if isinstance(split_sizes, torch.Tensor):
        if split_sizes.dtype.is_floating_point or split_sizes.dtype.is_complex \
                or split_sizes.dtype == torch.bool:
            raise TypeError(f"split_sizes must be an integer tensor, got dtype {split_sizes.dtype}")
        if split_sizes.dim() != 1:
            raise ValueError(f"split_sizes must be 1-D, got shape {tuple(split_sizes.shape)}")
        _check_count(split_sizes.numel(), num_groups)
        if split_sizes.device.type == "cpu":
            return _host_offsets(split_sizes.tolist(), num_rows, device)
        if split_sizes.device != _full_device(device):
            raise TypeError(f"split_sizes is on {split_sizes.device} but x is on {device}")
        if validate:  # syncs the host: reads a boolean and the sum back
            if bool((split_sizes < 0).any()):
                raise ValueError("split_sizes has negative sizes")
            total = int(split_sizes.sum())
            if total != num_rows:
                raise ValueError(f"split_sizes sum to {total}, but x has {num_rows} rows")
        # Unchecked: clamp so that even bad sizes give monotonic offsets within [0, T]
        # (the kernels index memory with them; the 2D x 2D kernel asserts on a
        # decreasing offset).  Negative sizes count as 0, rows past T are dropped.
        offs_G = torch.cumsum(split_sizes.clamp(min=0), 0, dtype=torch.int32)
        return offs_G.clamp_(max=num_rows)
    if not isinstance(split_sizes, (list, tuple)):
        raise TypeError("split_sizes must be a list of ints or an integer tensor, got "
                        f"{type(split_sizes).__name__}")
    for s in split_sizes:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"split_sizes must contain ints, got {type(s).__name__}")
    _check_count(len(split_sizes), num_groups)
    return _host_offsets(list(split_sizes), num_rows, device)


def _check_count(count: int, num_groups: Optional[int]) -> None:
    if num_groups is not None and count != num_groups:
        raise ValueError(f"split_sizes has {count} groups, expected num_groups={num_groups}")
    if count == 0:
        raise ValueError("split_sizes must name at least one group")


def _full_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _host_offsets(sizes: list, num_rows: int, device: torch.device) -> torch.Tensor:
    if any(s < 0 for s in sizes):
        raise ValueError(f"split_sizes has negative sizes: {sizes}")
    if sum(sizes) != num_rows:
        raise ValueError(f"split_sizes sum to {sum(sizes)}, but x has {num_rows} rows")
    offs, acc = [], 0
    for s in sizes:
        acc += s
        offs.append(acc)
    return torch.tensor(offs, dtype=torch.int32).to(device, non_blocking=True)


def group_ids(offs_G: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Group index of each row, ``(T,)`` int64 on the device; tail rows get ``G``."""
    rows = torch.arange(num_rows, device=offs_G.device, dtype=offs_G.dtype)
    return torch.searchsorted(offs_G, rows, right=True)


def group_sizes(offs_G: torch.Tensor) -> torch.Tensor:
    """Rows per group, ``(G,)`` in ``offs_G``'s dtype, on the device (no sync)."""
    return torch.diff(offs_G, prepend=offs_G.new_zeros(1))


def live_rows(rows_end: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(T, 1)`` bool: the row lies before ``rows_end`` (a 1-element device tensor,
    usually ``offs_G[-1:]``), i.e. it belongs to some group."""
    return (torch.arange(num_rows, device=rows_end.device) < rows_end).unsqueeze(1)


def cover_all_rows(offs_G: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Offsets whose last group ends at ``T`` (on the device, no sync).

    The last group absorbs the tail rows.  A GEMM whose tail input rows are zero then
    writes exact zeros there, instead of leaving them uninitialized (which would cost a
    masking pass over the output)."""
    return torch.cat([offs_G[:-1], offs_G.new_full((1,), num_rows)])
