"""``GroupedTensorStorage``: the quantized codes and scales of G row groups.

A plain Python object (not a ``torch.Tensor``) holding a logical ``(T, K)`` matrix whose
rows are split into ``num_groups`` consecutive groups (uneven, possibly empty) by the
device tensor ``offsets`` (int32 *end* offsets; rows past ``offsets[-1]`` belong to no
group and encode as zeros).  Layers save it through ``prepare_for_saving`` /
``restore_from_saved`` (docs/architecture.md), so each component passes the offload
engine on its own.

Components (each a flat 1-D buffer and **its own allocation**, so dropping or
offloading one frees exactly that memory; no bulk buffer lets a small scale keep a big
buffer alive):

============================  =========================================================
``rowwise_data``              codes in row order, ``T*K`` (FP8/MXFP8: float8_e4m3fn or
                              e5m2; NVFP4: ``T*K/2`` uint8, two codes a byte)
``rowwise_scale_inv``         FP8: ``G`` fp32; MXFP8: ``T*K/32`` uint8 E8M0; NVFP4:
                              ``T*K/16`` float8_e4m3fn block scales
``columnwise_data``           the transposed layout ``(K, Tc)`` (NVFP4: ``(K, Tc/2)``)
``columnwise_scale_inv``      FP8: ``G`` fp32 (same values as rowwise); MXFP8:
                              ``(K, Tc/32)`` E8M0; NVFP4: ``(K, Tc/16)`` E4M3
``amax``                      FP8/NVFP4: ``G`` fp32 per-group amax; MXFP8: absent
``offsets``                   ``G`` int32 end offsets of the row groups
``columnwise_offsets``        ``G`` int32 end offsets of the padded column groups
============================  =========================================================

Columnwise layout: group ``g`` owns columns ``[coffs[g-1], coffs[g-1] + n_g)`` of the
``(K, Tc)`` matrix; its column count is padded with zeros to a multiple of
``col_align`` (16 for FP8, the 16-byte group alignment that
``torch._scaled_grouped_mm``'s 2D x 2D form needs; 32 for MXFP8 and 16 for NVFP4, the
block sizes, so a block never straddles two groups).  ``Tc`` is the static upper bound
``round_up(T + G*(col_align-1), col_align)`` (known on the host, no sync); columns past
``coffs[-1]`` are zero.  FP8 columnwise codes are the rowwise codes transposed (same
per-group scale); MXFP8/NVFP4 columnwise codes are quantized from the high-precision
input with blocks along the token dimension.

Nothing here reads device values back to the host except :meth:`split`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import formats
from .row_groups import group_ids, group_sizes

__all__ = ["GroupedTensorStorage", "GroupSlice", "COMPONENTS", "FORMATS"]

FORMATS = ("fp8", "mxfp8", "nvfp4")
COMPONENTS = ("rowwise_data", "rowwise_scale_inv", "columnwise_data", "columnwise_scale_inv",
              "amax", "offsets", "columnwise_offsets")
BLOCK = {"mxfp8": 32, "nvfp4": 16}
COL_ALIGN = {"fp8": 16, "mxfp8": 32, "nvfp4": 16}
# The fused FP8 kernels (:mod:`.fp8_kernels`) hold (columns x groups) tiles per program;
# past this many groups the unfused path runs.
MAX_FUSED_GROUPS = 256


def columnwise_width(num_rows: int, num_groups: int, col_align: int) -> int:
    """Static ``Tc``: enough columns for every group padded to ``col_align``."""
    n = num_rows + num_groups * (col_align - 1)
    return (n + col_align - 1) // col_align * col_align


def padded_column_map(offs_G: torch.Tensor, num_rows: int, col_align: int, Tc: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dest_T, coffs_G)``: column of each row in the padded transposed layout, and the
    padded end offsets.  Rows past ``offs[-1]`` map to the last column ``Tc-1``, which no
    group uses when such rows exist (see module docstring); callers write zeros there."""
    sizes_G = group_sizes(offs_G)
    padded_G = (sizes_G + (col_align - 1)) // col_align * col_align
    coffs_G = torch.cumsum(padded_G, 0, dtype=torch.int32)
    shift_G = (coffs_G - padded_G) - (offs_G - sizes_G)  # new start - old start
    gid_T = group_ids(offs_G, num_rows)
    shift_T = torch.cat([shift_G, shift_G.new_zeros(1)])[gid_T].long()
    rows_T = torch.arange(num_rows, device=offs_G.device, dtype=torch.int64)
    G = offs_G.shape[0]
    dest_T = torch.where(gid_T < G, rows_T + shift_T, torch.full_like(rows_T, Tc - 1))
    return dest_T, coffs_G


@dataclass
class GroupSlice:
    """Views of one group's components (returned by :meth:`GroupedTensorStorage.split`).

    ``rowwise_data`` is ``(n, K)`` (NVFP4 ``(n, K/2)``), ``columnwise_data`` is the group's
    ``(K, n_padded)`` column block (a strided view), scales likewise; absent -> None.
    """
    rows: int
    rowwise_data: Optional[torch.Tensor]
    rowwise_scale_inv: Optional[torch.Tensor]
    columnwise_data: Optional[torch.Tensor]
    columnwise_scale_inv: Optional[torch.Tensor]
    amax: Optional[torch.Tensor]


class GroupedTensorStorage:
    """Quantized codes and scales of a grouped ``(T, K)`` matrix (see module docstring).

    Built by :func:`moe_offload.tensor.group_quantize` or the quantizers; construct
    directly only from components laid out as documented above.

    Args:
        fmt: ``"fp8"``, ``"mxfp8"`` or ``"nvfp4"``.
        shape: logical ``(T, K)``.
        fake_dtype: dtype :meth:`dequantize` returns by default (the input's dtype).
        num_groups: ``G``.
        col_align: column-group padding of the columnwise layout.
        **components: tensors named in :data:`COMPONENTS` (missing ones are None).
    """

    def __init__(self, fmt: str, shape: Tuple[int, int], fake_dtype: torch.dtype,
                 num_groups: int, col_align: int, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 **components: Optional[torch.Tensor]):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise TypeError(f"unknown components {sorted(unknown)}; expected {COMPONENTS}")
        self.fmt = fmt
        self.shape = (int(shape[0]), int(shape[1]))
        self.fake_dtype = fake_dtype
        self.num_groups = int(num_groups)
        self.col_align = int(col_align)
        self.fp8_dtype = fp8_dtype
        for name in COMPONENTS:
            setattr(self, name, components.get(name))

    # ------------------------------------------------------------------ shapes
    @property
    def columnwise_width(self) -> int:
        """``Tc`` of the columnwise layout."""
        return columnwise_width(self.shape[0], self.num_groups, self.col_align)

    @property
    def split_sizes(self) -> torch.Tensor:
        """Rows per group, int32 device tensor (no sync)."""
        return group_sizes(self.offsets)

    def _codes_per_row(self, k: int) -> int:
        return k // 2 if self.fmt == "nvfp4" else k

    def _scales_per_row(self, k: int) -> int:
        return k // BLOCK[self.fmt]

    def rowwise_2d(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(data, scale_inv)`` views: data ``(T, K or K/2)``; scale ``(G,)`` for FP8, else
        ``(T, K/block)``."""
        if self.rowwise_data is None:
            raise RuntimeError("rowwise usage was dropped (update_usage) or never quantized")
        T, K = self.shape
        data = self.rowwise_data.view(T, self._codes_per_row(K))
        s = self.rowwise_scale_inv
        if self.fmt != "fp8":
            s = s.view(T, self._scales_per_row(K))
        return data, s

    def columnwise_2d(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(data, scale_inv)`` views of the transposed layout: data ``(K, Tc or Tc/2)``;
        scale ``(G,)`` for FP8, else ``(K, Tc/block)``."""
        if self.columnwise_data is None:
            raise RuntimeError("columnwise usage was dropped (update_usage) or never quantized")
        T, K = self.shape
        Tc = self.columnwise_width
        data = self.columnwise_data.view(K, self._codes_per_row(Tc))
        s = self.columnwise_scale_inv
        if self.fmt != "fp8":
            s = s.view(K, self._scales_per_row(Tc))
        return data, s

    # ------------------------------------------------------------------ dequantize
    def _decode_blocks(self, data: torch.Tensor, scale: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """``code * block_scale`` in ``cdt`` of a block matrix laid out along its last dim
        (FP8: just the codes; the per-group factor is applied by the caller)."""
        R = data.shape[0]
        if self.fmt == "fp8":
            return data.to(cdt)
        # explicit sizes, not -1: R may be 0 (an empty batch)
        if self.fmt == "mxfp8":
            C = data.shape[1]
            v = data.to(cdt).view(R, C // 32, 32) * formats.e8m0_to_scale_inv(scale).to(cdt).unsqueeze(-1)
            return v.view(R, C)
        C = 2 * data.shape[1]
        v = formats.e2m1_decode(formats.unpack_nibbles(data)).to(cdt).view(R, C // 16, 16)
        return (v * scale.to(cdt).unsqueeze(-1)).view(R, C)

    def _group_factor(self, gid: torch.Tensor, cdt: torch.dtype) -> Optional[torch.Tensor]:
        """Per-index group factor: FP8 ``scale_inv`` (multiply), NVFP4 ``S_enc`` (divide)."""
        if self.fmt == "mxfp8":
            return None
        if self.fmt == "fp8":
            s_G = self.rowwise_scale_inv if self.rowwise_scale_inv is not None else self.columnwise_scale_inv
        else:
            s_G = formats.nvfp4_global_scale(self.amax)
        return torch.cat([s_G.to(cdt), s_G.new_ones(1).to(cdt)])[gid]

    def _apply_group_factor(self, v: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
        if factor is None:
            return v
        return v * factor if self.fmt == "fp8" else v / factor

    def dequantize(self, dtype: Optional[torch.dtype] = None, usage: Optional[str] = None) -> torch.Tensor:
        """Plain ``(T, K)`` tensor of the represented values (no sync).

        ``usage``: ``"rowwise"`` or ``"columnwise"`` (the columnwise codes are transposed
        back to row order); default: rowwise if present.  ``dtype`` defaults to the fake
        dtype.  Values are computed in fp32 (fp64 when ``dtype`` is fp64: exact) (FP8: ``code * scale_inv``; MXFP8:
        ``code * 2^(e-127)``; NVFP4: ``(code * block_scale) / S_enc``) and rounded once
        to ``dtype``.  Rows past ``offsets[-1]`` are zeros.
        """
        dtype = dtype or self.fake_dtype
        if usage is None:
            usage = "rowwise" if self.rowwise_data is not None else "columnwise"
        if usage not in ("rowwise", "columnwise"):
            raise ValueError(f"usage must be 'rowwise' or 'columnwise', got {usage!r}")
        T, K = self.shape
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        if usage == "rowwise":
            data, s = self.rowwise_2d()
            factor = self._group_factor(group_ids(self.offsets, T), cdt)
            if self.fmt == "fp8" and dtype in (torch.bfloat16, torch.float16):
                # Two passes instead of three: FP8 -> bf16/fp16 is exact, the product is
                # computed in fp32 and rounded once into ``out`` (same values).
                out = torch.empty(T, K, dtype=dtype, device=data.device)
                return torch.mul(data.to(dtype), factor.unsqueeze(1), out=out)
            v = self._decode_blocks(data, s, cdt)
            return self._apply_group_factor(v, None if factor is None else factor.unsqueeze(1)).to(dtype)
        data, s = self.columnwise_2d()
        Tc = self.columnwise_width
        factor = self._group_factor(group_ids(self.columnwise_offsets, Tc), cdt)
        v_KTc = self._decode_blocks(data, s, cdt)
        v_KTc = self._apply_group_factor(v_KTc, None if factor is None else factor.unsqueeze(0))
        dest_T, _ = padded_column_map(self.offsets, T, self.col_align, Tc)
        valid_T1 = (group_ids(self.offsets, T) < self.num_groups).unsqueeze(1)
        out = v_KTc.t()[dest_T]
        return torch.where(valid_T1, out, out.new_zeros(())).to(dtype)

    # ------------------------------------------------------------------ usages
    def update_usage(self, rowwise: Optional[bool] = None, columnwise: Optional[bool] = None) -> None:
        """Drop a usage that is no longer needed (frees its data and scale buffers).

        ``True`` keeps a usage and raises ``RuntimeError`` if it is absent (it cannot be
        recreated without the high-precision input); ``False`` drops it; ``None`` leaves
        it as is.
        """
        for flag, data, scale in ((rowwise, "rowwise_data", "rowwise_scale_inv"),
                                  (columnwise, "columnwise_data", "columnwise_scale_inv")):
            if flag is True and getattr(self, data) is None:
                raise RuntimeError(f"{data} is absent; re-quantize from the input to get it")
            if flag is False:
                setattr(self, data, None)
                setattr(self, scale, None)

    # ------------------------------------------------------------------ saving
    def component_tensors(self) -> List[Optional[torch.Tensor]]:
        """The component tensors in :data:`COMPONENTS` order (None where absent); no mutation."""
        return [getattr(self, name) for name in COMPONENTS]

    def prepare_for_saving(self) -> Tuple[List[Optional[torch.Tensor]], "GroupedTensorStorage"]:
        """Return the components and the tensor-free shell (``self``).

        Components that require grad are detached; the others are returned as the same
        objects, so marks set on them (``mark_not_offload``, ready events) survive."""
        tensors = [t.detach() if t is not None and t.requires_grad else t
                   for t in self.component_tensors()]
        for name in COMPONENTS:
            setattr(self, name, None)
        return tensors, self

    def restore_from_saved(self, tensors: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """Put saved components back (in :data:`COMPONENTS` order); return the unused tail."""
        n = len(COMPONENTS)
        if len(tensors) < n:
            raise ValueError(f"restore_from_saved needs {n} tensors, got {len(tensors)}")
        for name, t in zip(COMPONENTS, tensors[:n]):
            setattr(self, name, t)
        return list(tensors[n:])

    # ------------------------------------------------------------------ views
    def split(self) -> List[GroupSlice]:
        """Per-group views of every present component.

        **Syncs the host**: reads the offsets back to slice.  Not for the MoE hot path.
        """
        offs = [0] + self.offsets.tolist()
        coffs = [0] + self.columnwise_offsets.tolist() if self.columnwise_offsets is not None else None
        out = []
        for g in range(self.num_groups):
            a, b = offs[g], offs[g + 1]
            rd = rs = cd = cs = None
            if self.rowwise_data is not None:
                data, s = self.rowwise_2d()
                rd = data[a:b]
                rs = s[g:g + 1] if self.fmt == "fp8" else s[a:b]
            if self.columnwise_data is not None:
                data, s = self.columnwise_2d()
                ca, cb = coffs[g], coffs[g + 1]
                if self.fmt == "nvfp4":
                    cd = data[:, ca // 2:cb // 2]
                else:
                    cd = data[:, ca:cb]
                cs = s[g:g + 1] if self.fmt == "fp8" else s[:, ca // BLOCK[self.fmt]:cb // BLOCK[self.fmt]]
            amax = self.amax[g:g + 1] if self.amax is not None else None
            out.append(GroupSlice(b - a, rd, rs, cd, cs, amax))
        return out

    def nbytes(self) -> int:
        """Bytes held by the present components."""
        return sum(t.numel() * t.element_size() for t in self.component_tensors() if t is not None)

    def __repr__(self) -> str:
        present = [n for n in COMPONENTS if getattr(self, n) is not None]
        return (f"GroupedTensorStorage(fmt={self.fmt}, shape={self.shape}, groups={self.num_groups}, "
                f"fake_dtype={self.fake_dtype}, components={present})")
