"""Expert activations, fused with the router-probability scale, forward and backward.

Shape legend: ``T`` rows, ``F`` ffn hidden, ``X`` = ``2F`` for gated activations and
``F`` otherwise (the width of the fc1 output ``h_TX``).

Activations (``h`` is the fc1 output of one row):

- ``"swiglu"``: ``silu(a) * b`` with ``a = h[:F]`` (the gate, first half), ``b = h[F:]``;
- ``"geglu"``: ``gelu(a) * b``, **exact** (erf) gelu, same halves;
- ``"gelu"`` (exact erf), ``"relu"``, ``"silu"``: applied to all of ``h``.

The fused forward returns ``out = act(h) * p`` in one pass (``p`` the per-row prob, or
1).  The fused backward takes ``d_out`` and returns, in one pass, ``d_h``, ``d_p`` (the
row sum of ``d_out * act(h)``) and the recomputed ``out`` (needed for the fc2 weight
gradient), so nothing but ``h`` has to be saved.

On CUDA a Triton kernel does each pass (:mod:`._triton_act`, imported lazily); elsewhere
the pure-torch path below computes in fp32 and rounds once to ``h``'s dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..tensor.row_groups import live_rows

__all__ = ["ACTIVATIONS", "GATED", "is_gated", "check_activation", "act_forward",
           "act_backward"]

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
GATED = ("swiglu", "geglu")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: str) -> str:
    """Return ``activation`` if it is supported, else raise ``ValueError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return activation


def is_gated(activation: str) -> bool:
    """True for the gated activations (fc1 output width ``2F``)."""
    return check_activation(activation) in GATED


def _use_triton(h: torch.Tensor) -> bool:
    return h.is_cuda and h.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _act_and_grad(a: torch.Tensor, activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``f(a)`` and ``f'(a)`` (fp32) of the non-gated part."""
    if activation in ("swiglu", "silu"):
        s = torch.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    if activation in ("geglu", "gelu"):
        cdf = 0.5 * (1.0 + torch.erf(a * _INV_SQRT2))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return torch.relu(a), (a > 0).to(a.dtype)


def _live_rows(rows_end: Optional[torch.Tensor], num_rows: int) -> Optional[torch.Tensor]:
    """``(T, 1)`` bool mask of rows before ``rows_end``, ``None`` when there is no tail."""
    return None if rows_end is None else live_rows(rows_end, num_rows)


def act_forward(h_TX: torch.Tensor, probs_T: Optional[torch.Tensor], activation: str,
                rows_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(h) * probs[:, None]`` -> ``(T, F)`` in ``h``'s dtype, one pass.

    ``rows_end``: optional 1-element int tensor on the device; rows at or past it are
    written as zeros (whatever ``h`` holds there), which is how the grouped MLP keeps
    uninitialized GEMM tail rows out of its results at no extra pass.
    """
    gated = is_gated(activation)
    if _use_triton(h_TX):
        from ._triton_act import triton_act_forward
        return triton_act_forward(h_TX, probs_T, activation, gated, rows_end)
    hf = _wide(h_TX)
    F_ = hf.shape[1] // 2 if gated else hf.shape[1]
    z, _ = _act_and_grad(hf[:, :F_], activation)
    if gated:
        z = z * hf[:, F_:]
    if probs_T is not None:
        z = z * _wide(probs_T).unsqueeze(1)
    live = _live_rows(rows_end, z.shape[0])
    if live is not None:
        z = torch.where(live, z, z.new_zeros(()))
    return z.to(h_TX.dtype)


def act_backward(h_TX: torch.Tensor, probs_T: Optional[torch.Tensor], d_out_TF: torch.Tensor,
                 activation: str, rows_end: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Backward of :func:`act_forward`: ``(d_h_TX, d_probs_T or None, out_TF)``.

    ``out_TF`` is the recomputed forward output ``act(h) * probs``.  Rows at or past
    ``rows_end`` come out zero in all three.
    """
    gated = is_gated(activation)
    if _use_triton(h_TX):
        from ._triton_act import triton_act_backward
        return triton_act_backward(h_TX, probs_T, d_out_TF, activation, gated, rows_end)
    hf, do = _wide(h_TX), _wide(d_out_TF)
    F_ = hf.shape[1] // 2 if gated else hf.shape[1]
    a = hf[:, :F_]
    f, df = _act_and_grad(a, activation)
    z = f * hf[:, F_:] if gated else f
    p = _wide(probs_T).unsqueeze(1) if probs_T is not None else None
    d_probs = (do * z).sum(1).to(probs_T.dtype) if p is not None else None
    dz = do * p if p is not None else do
    if gated:
        d_h = torch.cat([dz * hf[:, F_:] * df, dz * f], dim=1)
    else:
        d_h = dz * df
    out = z * p if p is not None else z
    live = _live_rows(rows_end, d_h.shape[0])
    if live is not None:
        zero = d_h.new_zeros(())
        d_h, out = torch.where(live, d_h, zero), torch.where(live, out, zero)
        d_probs = None if d_probs is None else torch.where(live.squeeze(1), d_probs, d_probs.new_zeros(()))
    return d_h.to(h_TX.dtype), d_probs, out.to(h_TX.dtype)
