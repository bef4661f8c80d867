"""Pure scaling math of the quantized formats (no containers, no state).

Every function here maps tensors to tensors with torch ops only, so tests can call
them directly and a float64 reference can restate them.  Arithmetic is fp32 and is
evaluated in the order written in each docstring; that order is part of the format
(bit-exact tests depend on it).

Formats
-------
- **FP8 current scaling** (one scale per group): ``scale = fp8_max / amax`` (448 for
  E4M3, 57344 for E5M2), ``1`` when ``amax`` is 0 or not finite, optionally rounded
  *down* to a power of two; codes ``q = e4m3(clamp(x * scale, -max, max))`` with
  round-to-nearest-even; ``scale_inv = 1 / scale`` is stored.
- **MXFP8** (one E8M0 scale per 32 elements): ``scale_inv = 2^ceil(log2(amax/448))``
  (exponent rounded up, "RCEIL"), stored as a uint8 biased exponent (bias 127);
  codes ``e4m3(clamp(x / scale_inv))``.
- **NVFP4** (one E4M3 scale per 16 elements plus an fp32 scale per group):
  ``S_enc = 448*6/amax`` (1 when amax is 0 or not finite); block scale
  ``bs = e4m3(clamp((block_amax * S_enc) / 6, max 448))``; element code
  ``E2M1(((x * S_enc) / float(bs))``, rounded to nearest even onto
  {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at 6; two codes per byte, even index in the
  low nibble.  Dequantized value: ``code * float(bs) / S_enc``.

Non-finite inputs (documented behaviour, tested):

- FP8: a NaN element gives a NaN code (E4M3 has NaN) and makes its group's amax NaN,
  so that group's scale is 1; an ``inf`` element makes amax inf, scale 1, and the inf
  itself saturates to +-448.  Other elements of that group are then encoded with
  scale 1 (they lose precision, not their value range).
- MXFP8: a block whose amax is inf or NaN gets the E8M0 NaN code 255; its whole block
  dequantizes to NaN.  Other blocks are unaffected.  An all-zero block gets code 127
  (``scale_inv = 1``); its elements are zero either way.
- NVFP4: a NaN makes the group's S_enc 1 and its block scale NaN (E4M3 NaN), so the
  block dequantizes to NaN; an inf gives S_enc 1, block scale 448 and saturates to 6.
"""
from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX", "E2M1_MAX", "E8M0_BIAS", "E8M0_NAN", "E8M0_ZERO_BLOCK",
    "fp8_max", "amax_to_scale", "round_scale_down_to_power_of_2", "to_fp8_saturated",
    "mx_amax_to_e8m0", "e8m0_to_scale_inv", "nvfp4_global_scale", "nvfp4_block_scale",
    "e2m1_encode", "e2m1_decode", "pack_nibbles", "unpack_nibbles",
]

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
E2M1_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_ZERO_BLOCK = 127  # code stored for an all-zero block: scale_inv = 1


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for E4M3, 57344 for E5M2)."""
    if dtype not in FP8_MAX:
        raise TypeError(f"unsupported FP8 dtype {dtype}; expected one of {list(FP8_MAX)}")
    return FP8_MAX[dtype]


def round_scale_down_to_power_of_2(scale: torch.Tensor) -> torch.Tensor:
    """Largest power of two ``<= scale`` (exact: uses the fp32 exponent, no log2)."""
    mantissa, exponent = torch.frexp(scale)  # scale = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(scale), exponent - 1)


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                  power_2_scale: bool = False) -> torch.Tensor:
    """Current-scaling factor ``fp8_max / amax`` in fp32; 1 where amax is 0 or not finite."""
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    # torch.div of two tensors (``float / tensor`` would be reciprocal-then-multiply,
    # which is off by an ulp for some amax).
    num = torch.full_like(amax, fp8_max(dtype))
    scale = torch.where(ok, torch.div(num, torch.where(ok, amax, torch.ones_like(amax))),
                        torch.ones_like(amax))
    # 448/tiny overflows to inf: keep the largest finite fp32 instead.
    scale = torch.clamp(scale, max=torch.finfo(torch.float32).max)
    if power_2_scale:
        scale = round_scale_down_to_power_of_2(scale)
    return scale


def to_fp8_saturated(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Clamp to the FP8 range, then cast (round to nearest even; NaN stays NaN).

    Eager ``Tensor.to(float8)`` does not saturate in torch <= 2.11, hence the clamp.
    """
    m = fp8_max(dtype)
    return torch.clamp(x, -m, m).to(dtype)


def mx_amax_to_e8m0(amax: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponent (uint8) of ``2^ceil(log2(amax / 448))`` per block.

    Exact integer arithmetic on the fp32 bits (no log2, no division): for a normal
    ``amax = 1.f * 2^(E-127)``, ``amax / 448 = (1.f / 1.75) * 2^(E-127-8)``, so the
    rounded-up exponent is ``E - 135`` when ``1.f <= 1.75`` and ``E - 134`` otherwise;
    biased: ``E - 8 + (mantissa > 0.75)``, clamped to [0, 254].  Subnormal amax clamps
    to 0 (``2^-127``).  amax 0 -> :data:`E8M0_ZERO_BLOCK`; inf/NaN -> :data:`E8M0_NAN`.
    """
    bits = amax.float().contiguous().view(torch.int32)
    biased_exp = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    code = biased_exp - 8 + (mantissa > 0x600000).to(torch.int32)
    code = torch.clamp(code, 0, 254)
    code = torch.where(amax == 0, torch.full_like(code, E8M0_ZERO_BLOCK), code)
    code = torch.where(biased_exp == 0xFF, torch.full_like(code, E8M0_NAN), code)
    return code.to(torch.uint8)


def e8m0_to_scale_inv(code: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^(code - 127)``; code 255 -> NaN."""
    c = code.to(torch.int32)
    val = torch.ldexp(torch.ones(c.shape, dtype=torch.float32, device=c.device), c - E8M0_BIAS)
    return torch.where(c == E8M0_NAN, torch.full_like(val, float("nan")), val)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``S_enc = 448 * 6 / amax`` in fp32; 1 where amax is 0 or not finite."""
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    num = torch.full_like(amax, 448.0 * E2M1_MAX)
    s = torch.where(ok, torch.div(num, torch.where(ok, amax, torch.ones_like(amax))), torch.ones_like(amax))
    return torch.clamp(s, max=torch.finfo(torch.float32).max)


def nvfp4_block_scale(block_amax: torch.Tensor, s_enc: torch.Tensor) -> torch.Tensor:
    """E4M3 block scale ``e4m3(clamp((block_amax * S_enc) / 6, max 448))``."""
    t = block_amax.float() * s_enc
    # Divide by a tensor: CUDA turns division by a host scalar into a multiplication by
    # its (inexact) reciprocal.
    return to_fp8_saturated(torch.div(t, torch.full_like(t, E2M1_MAX)), torch.float8_e4m3fn)


# E2M1 magnitudes by code, and the rounding thresholds between neighbours.  A tie goes
# to the even code: ">" where the lower neighbour is even, ">=" where the upper is.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_UP_GT = (0.25, 1.25, 2.5, 5.0)    # lower code even: tie stays down
_E2M1_UP_GE = (0.75, 1.75, 3.5)         # upper code even: tie goes up


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8, sign in bit 3) of fp32 ``v``, RNE, saturating at 6.

    NaN encodes as +-0 (E2M1 has no NaN; NVFP4 carries NaN in the block scale).
    """
    a = v.float().abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for t in _E2M1_UP_GT:
        code += (a > t).to(torch.uint8)
    for t in _E2M1_UP_GE:
        code += (a >= t).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """fp32 values of 4-bit E2M1 codes (uint8 in 0..15)."""
    # Arithmetic, not a table: a host->device table copy would sync.  For magnitude
    # code m = (e, t) = (m >> 1, m & 1): e == 0 -> 0.5 t (0, 0.5), else 2^(e-1) (1 + t/2).
    m = (code & 7).to(torch.int32)
    e, t = m >> 1, (m & 1).float()
    mag = torch.where(e == 0, 0.5 * t, torch.ldexp(1.0 + 0.5 * t, e - 1))
    return torch.where((code & 8) != 0, -mag, mag)


def pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """Pack pairs along the last dim into bytes: even index in the low nibble."""
    if code.shape[-1] % 2:
        raise ValueError(f"last dim must be even to pack, got {code.shape[-1]}")
    return code[..., 0::2] | (code[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)
