"""``GroupedMLP``: fused grouped expert MLP ``fc1 -> activation (* probs) -> fc2``.

Shape legend: ``T`` rows (token copies routed to experts), ``H`` hidden, ``F`` ffn
hidden, ``X`` fc1 width (``2F`` gated, ``F`` otherwise), ``G`` groups (experts).

One autograd function does the whole MLP, for every precision, so that backward can
recompute the cheap activation instead of saving it (see :class:`GroupedMLP` for what
is saved).  The precision of each GEMM is its backend (:mod:`.gemm`).

Measured (H100, torch 2.11, T=16384 H=4096 F=2048 E=8 bf16 SwiGLU, uniform device
splits, ``scripts/bench_grouped_mlp.py``, median of 40): fwd+bwd 4.12 ms against
4.77 ms for the unfused ``torch._grouped_mm`` + autograd composition (1.16x), saving
8 KiB/token beyond ``x`` instead of 20 KiB; ``recompute="fc1"`` 4.95 ms, nothing saved
beyond ``x``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..offload.marks import mark_not_offload, start_offload
from ..tensor.row_groups import SplitSizes, offsets_from_splits
from .activations import check_activation, is_gated
from .checks import check_grouped_input, check_int
from .gemm import backend_for, check_recipe
from .gemm.base import GemmBackend, Operand, Rows, load_record, save_record
from .grouped_gemm import add_group_bias, group_row_sum

__all__ = ["GroupedMLP", "grouped_mlp", "SavedMLP", "RECOMPUTE_MODES"]

RECOMPUTE_MODES = ("activation", "fc1")


@dataclass
class SavedMLP:
    """What the backward of :class:`GroupedMLP` keeps.

    ``x``: fc1's wgrad input as fc1's backend holds it (bf16: ``x``; quantized: its
    columnwise codes), also the input of the fc1 recompute (``recompute="fc1"``, bf16).
    ``h``: the fc1 output as fc1's backend stores it (bf16: ``h``; quantized: its
    rowwise codes), ``None`` when recomputed.  ``probs_T``, ``offs_G``.  The weights by
    reference (``w1``, ``b1`` only for the recompute, ``w2``) with their backends'
    per-expert metadata (``w1_meta``, ``w2_meta``), never copies."""
    x: Optional[Operand]
    h: Any
    probs_T: Optional[torch.Tensor]
    offs_G: torch.Tensor
    w1_GXH: Optional[torch.Tensor]
    w1_meta: Optional[torch.Tensor]
    b1_GX: Optional[torch.Tensor]
    w2_GHF: Optional[torch.Tensor]
    w2_meta: Optional[torch.Tensor]


class _GroupedMLPFn(torch.autograd.Function):
    """Fused forward/backward on two GEMM backends (fc1's ``B1``, fc2's ``B2``).

    ``covered``: the offsets are known to cover all ``T`` rows (host splits, validated
    or routed splits).  Otherwise rows past ``offs[-1]`` (the "tail") must come out as
    zeros in ``y``, ``dx`` and ``d_probs`` although the grouped GEMMs leave them
    uninitialized.  We get that without an extra pass: the activation writes zeros for
    tail rows (``Rows.rows_end``), and the two GEMMs that consume its output (fc2
    forward, the dx GEMM) are told their input tail is zero (``tail="zero_input"``),
    so their tail rows are ``0 @ w = 0``.  The wgrad GEMMs and row sums use the true
    offsets and never read the tail.
    """

    @staticmethod
    def forward(ctx, x_TH, w1_GXH, b1_GX, w2_GHF, b2_GH, probs_T, offs_G,
                activation: str, recompute: str, covered: bool, B1: GemmBackend, B2: GemmBackend):
        need = ctx.needs_input_grad
        need_bwd = any(need[:6])
        rows = Rows(offs_G, x_TH.shape[0], covered)
        recompute_fc1 = recompute == "fc1" and not B1.quantized
        mark_not_offload(w1_GXH, b1_GX, w2_GHF, b2_GH)
        xa = B1.quantize_act(x_TH, offs_G, True, need[1])
        start_offload(xa.data, probs_T)
        w1q = B1.quantize_weight(w1_GXH, need[0])
        w2q = B2.quantize_weight(w2_GHF, need_bwd)
        h_TX = add_group_bias(B1.forward(xa, w1q, rows, "any", x_TH.dtype), b1_GX, offs_G)
        aa, stored_h = B2.activation_forward(h_TX, probs_T, activation, rows,
                                             need_bwd and not recompute_fc1, B1)
        start_offload(stored_h)
        y_TH = add_group_bias(B2.forward(aa, w2q, rows, "zero_input", x_TH.dtype), b2_GH, offs_G)
        keep_x = need[1] or (need_bwd and recompute_fc1)
        save_record(ctx, SavedMLP(
            x=B1.keep_for_wgrad(xa) if keep_x else None, h=stored_h, probs_T=probs_T, offs_G=offs_G,
            w1_GXH=w1_GXH if (need[0] or recompute_fc1) else None, w1_meta=w1q.meta_G if need[0] else None,
            b1_GX=b1_GX if recompute_fc1 else None,
            w2_GHF=w2_GHF if need_bwd else None, w2_meta=w2q.meta_G if need_bwd else None))
        ctx.activation, ctx.recompute_fc1, ctx.covered = activation, recompute_fc1, covered
        ctx.B1, ctx.B2, ctx.dtype = B1, B2, x_TH.dtype
        ctx.has_b1, ctx.has_b2 = b1_GX is not None, b2_GH is not None
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):
        s: SavedMLP = load_record(ctx)
        B1, B2, dtype = ctx.B1, ctx.B2, ctx.dtype
        need = ctx.needs_input_grad
        rows = Rows(s.offs_G, dy_TH.shape[0], ctx.covered)
        dy_TH = dy_TH.contiguous()
        h = s.h
        if ctx.recompute_fc1:      # bf16 only: x is kept as is
            h = add_group_bias(B1.forward(s.x, B1.quantize_weight(s.w1_GXH, False), rows, "any", dtype),
                               s.b1_GX, s.offs_G)
        dya = B2.quantize_act(dy_TH, s.offs_G, True, need[3])
        d_a_TF = B2.dgrad(dya, B2.weight_for_dgrad(s.w2_GHF, s.w2_meta), rows, "any", dtype)
        d_h_TX, d_probs_T, a_TF, amax_a, amax_dh = B2.activation_backward(
            h, s.probs_T, d_a_TF, ctx.activation, rows, B1, dtype)
        dw2 = db2 = dw1 = db1 = dx = None
        if need[3]:
            dw2 = B2.wgrad(dya, B2.quantize_act(a_TF, s.offs_G, False, True, amax_bits=amax_a), rows, dtype)
        if ctx.has_b2 and need[4]:
            db2 = group_row_sum(dy_TH, s.offs_G)
        dha = B1.quantize_act(d_h_TX, s.offs_G, need[0], need[1], amax_bits=amax_dh)
        if need[1]:
            dw1 = B1.wgrad(dha, s.x, rows, dtype)
        if ctx.has_b1 and need[2]:
            db1 = group_row_sum(d_h_TX, s.offs_G)
        if need[0]:
            dx = B1.dgrad(dha, B1.weight_for_dgrad(s.w1_GXH, s.w1_meta), rows, "zero_input", dtype)
        if not need[5]:
            d_probs_T = None
        return dx, dw1, db1, dw2, db2, d_probs_T, None, None, None, None, None, None


def grouped_mlp(x_TH, offs_G, w1_GXH, b1_GX, w2_GHF, b2_GH, probs_T, activation: str,
                recompute: str = "activation", covered: bool = True,
                recipe: Optional[str] = None) -> torch.Tensor:
    """Functional form of :class:`GroupedMLP` on validated int32 offsets (no checks).

    ``recipe``: ``None`` (the parameters' dtype) or a key of
    :data:`moe_offload.ops.gemm.RECIPES`; each GEMM gets its backend."""
    G, X, H = w1_GXH.shape
    F_ = w2_GHF.shape[2]
    B1 = backend_for(recipe, x_TH, H, X)
    B2 = backend_for(recipe, x_TH, F_, H)
    return _GroupedMLPFn.apply(x_TH, w1_GXH, b1_GX, w2_GHF, b2_GH, probs_T, offs_G,
                               activation, recompute, covered, B1, B2)


class GroupedMLP(nn.Module):
    """Grouped expert MLP: ``y = fc2(act(fc1(x)) * probs)`` per group, one fused autograd op.

    Args:
        num_groups: ``G`` experts.
        hidden_size, ffn_hidden_size: ``H``, ``F``.
        activation: ``"swiglu"`` (``silu(a) * b``), ``"geglu"`` (``gelu(a) * b`` with the
            **exact** erf gelu), ``"gelu"`` (exact), ``"relu"`` or ``"silu"``.  For the gated
            ones fc1 produces ``h = [a | b]`` of width ``2F`` and the **first half ``a``
            is the gate**.
        bias: learn ``fc1_bias`` ``(G, X)`` and ``fc2_bias`` ``(G, H)``.
        recipe: ``None`` (parameter dtype) or ``"fp8"``/``"mxfp8"``/``"nvfp4"`` (the GEMM
            backends of :mod:`moe_offload.ops.gemm`; MXFP8/NVFP4 need ``hidden_size`` and
            ``ffn_hidden_size`` to be multiples of 32/16, checked here).  Quantized
            recipes save ``x`` (columnwise codes) and ``h`` (rowwise codes) and ignore
            ``recompute``; see docs/quantization.md for the bytes.
        recompute: what backward recomputes instead of saving:

            - ``"activation"`` (default): saves ``x`` ``(T, H)`` and the fc1 output
              ``h`` ``(T, X)`` (+ ``probs`` ``(T,)`` and the int32 offsets ``(G,)``);
              the activation is recomputed.  bf16 SwiGLU: ``2H + 4F`` bytes/token
              (+ 4 for fp32 probs).
            - ``"fc1"``: saves only ``x`` (+ ``probs``, the offsets); fc1 and the activation
              are recomputed (one more fc1 GEMM).  bf16: ``2H`` bytes/token (+ 4).

            Weights are saved by reference and marked never-offload (quantized recipes
            re-quantize them in backward: no weight copy is kept by the graph).

    Parameters: ``fc1_weight`` ``(G, X, H)``, ``fc2_weight`` ``(G, H, F)``, and with
    ``bias`` ``fc1_bias`` ``(G, X)``, ``fc2_bias`` ``(G, H)``.

    ``forward(x, split_sizes, probs=None, *, validate=False)``: ``x`` ``(T, H)`` grouped
    as in :class:`~moe_offload.ops.grouped_linear.GroupedLinear` (same ``split_sizes``
    and ``validate`` rules; no host sync with device splits); ``probs`` ``(T,)`` or
    ``(T, 1)`` scales each row after the activation and gets a gradient.
    """

    def __init__(self, num_groups: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "swiglu", bias: bool = False, *, recipe: Optional[str] = None,
                 recompute: str = "activation", device=None, dtype=None):
        super().__init__()
        check_int("num_groups", num_groups)
        check_int("hidden_size", hidden_size)
        check_int("ffn_hidden_size", ffn_hidden_size)
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute {recompute!r}; expected one of {RECOMPUTE_MODES}")
        self.activation = check_activation(activation)
        self.recipe = check_recipe(recipe, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size)
        self.recompute = recompute
        self.num_groups, self.hidden_size, self.ffn_hidden_size = num_groups, hidden_size, ffn_hidden_size
        X = 2 * ffn_hidden_size if is_gated(activation) else ffn_hidden_size
        kw = {"device": device, "dtype": dtype}
        self.fc1_weight = nn.Parameter(torch.empty(num_groups, X, hidden_size, **kw))
        self.fc2_weight = nn.Parameter(torch.empty(num_groups, hidden_size, ffn_hidden_size, **kw))
        self.fc1_bias = nn.Parameter(torch.empty(num_groups, X, **kw)) if bias else None
        self.fc2_bias = nn.Parameter(torch.empty(num_groups, hidden_size, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``-style uniform initialisation per expert."""
        with torch.no_grad():
            for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
                bound = 1.0 / math.sqrt(w.shape[2])
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def _check_probs(self, probs: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
        if probs is None:
            return None
        if not isinstance(probs, torch.Tensor) or not probs.dtype.is_floating_point:
            raise TypeError("probs must be a floating-point tensor")
        if probs.device != x.device:
            raise TypeError(f"probs device {probs.device} does not match x device {x.device}")
        T = x.shape[0]
        if tuple(probs.shape) not in ((T,), (T, 1)):
            raise ValueError(f"probs must have shape ({T},) or ({T}, 1), got {tuple(probs.shape)}")
        return probs.reshape(T)

    def forward(self, x: torch.Tensor, split_sizes: SplitSizes, probs: Optional[torch.Tensor] = None,
                *, validate: bool = False) -> torch.Tensor:
        """Grouped MLP of ``x`` -> ``(T, hidden_size)``."""
        check_grouped_input(x, self.fc1_weight, self.hidden_size)
        probs_T = self._check_probs(probs, x)
        host = not (isinstance(split_sizes, torch.Tensor) and split_sizes.device.type != "cpu")
        offs_G = offsets_from_splits(split_sizes, x.shape[0], x.device, num_groups=self.num_groups,
                                     validate=validate)
        return self.forward_offsets(x, offs_G, probs_T, covered=host or validate)

    def forward_offsets(self, x_TH: torch.Tensor, offs_G: torch.Tensor,
                        probs_T: Optional[torch.Tensor] = None, covered: bool = True) -> torch.Tensor:
        """Forward on ready int32 end offsets (used by ``MoE``; inputs are not checked).

        ``covered=True`` promises ``offs[-1] == T`` (skips the tail masking)."""
        return grouped_mlp(x_TH, offs_G, self.fc1_weight, self.fc1_bias, self.fc2_weight,
                           self.fc2_bias, probs_T, self.activation, self.recompute, covered,
                           self.recipe)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, hidden_size={self.hidden_size}, "
                f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation!r}, "
                f"bias={self.fc1_bias is not None}, recipe={self.recipe}, recompute={self.recompute!r}")
