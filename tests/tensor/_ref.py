"""Float64 references of the format formulas (independent of moe_offload.tensor.formats).

Rounding to a low-precision grid is done here by nearest-value search over the format's
full code table with ties broken towards the even code, so a bug in the library's
casts or bit tricks cannot hide in the reference.
"""
import math

import torch

E4M3_MAX = 448.0


def _e4m3_table():
    codes = torch.arange(0, 127, dtype=torch.uint8)             # +0 .. 448 (0x7F is NaN)
    return codes.view(torch.float8_e4m3fn).double()


_E4M3 = _e4m3_table()
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _rne_codes(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Magnitude code of ``|v|`` (float64, finite, already saturated) by RNE onto ``table``."""
    a = v.abs().reshape(-1, 1)
    d = (a - table.reshape(1, -1)).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    idx = torch.arange(table.numel()).reshape(1, -1).expand_as(cand)
    # among tied candidates prefer the even code
    even = cand & (idx % 2 == 0)
    pick = torch.where(even.any(1, keepdim=True), even, cand)
    return pick.float().argmax(1).reshape(v.shape)


def e4m3_rne(v: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 codes of float64 ``v`` (saturating at 448), sign bit kept."""
    v = v.double().clamp(-E4M3_MAX, E4M3_MAX)
    mag = _rne_codes(v, _E4M3).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 7)


def e2m1_rne(v: torch.Tensor) -> torch.Tensor:
    v = v.double().clamp(-6.0, 6.0)
    mag = _rne_codes(v, _E2M1).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def f32(v: torch.Tensor) -> torch.Tensor:
    """Round float64 to the nearest fp32 (models one fp32 operation), back to float64."""
    return v.float().double()


def fp8_ref(x: torch.Tensor, sizes, power_2=False):
    """(codes uint8 (T,K), scale_inv fp32 (G,), amax (G,)) for FP8 current scaling."""
    codes, sinv, amaxes = [], [], []
    start = 0
    for n in sizes:
        xg = x[start:start + n].double()
        amax = xg.abs().max().item() if n else 0.0
        if amax > 0 and math.isfinite(amax):
            scale = f32(torch.tensor(448.0 / amax)).item()
            if power_2:
                scale = 2.0 ** math.floor(math.log2(scale))
        else:
            scale = 1.0
        codes.append(e4m3_rne(f32(xg * scale)))
        sinv.append(f32(torch.tensor(1.0 / scale)).item())
        amaxes.append(amax)
        start += n
    return torch.cat(codes), torch.tensor(sinv, dtype=torch.float32), torch.tensor(amaxes, dtype=torch.float32)


def mx_exponent(amax: float) -> int:
    """Smallest e with 448 * 2^e >= amax (= ceil(log2(amax/448))), exactly."""
    e = math.ceil(math.log2(amax / 448.0))
    while 448.0 * 2.0 ** e < amax:
        e += 1
    while 448.0 * 2.0 ** (e - 1) >= amax:
        e -= 1
    return e


def mx_rows_ref(x: torch.Tensor):
    """(codes uint8 (R,C), e8m0 uint8 (R, C/32)) for MXFP8 blocks along the last dim."""
    R, C = x.shape
    xb = x.double().reshape(R, C // 32, 32)
    codes = torch.zeros(R, C // 32, 32, dtype=torch.uint8)
    e8 = torch.zeros(R, C // 32, dtype=torch.uint8)
    for r in range(R):
        for b in range(C // 32):
            amax = xb[r, b].abs().max().item()
            if amax == 0:
                e8[r, b] = 127
                codes[r, b] = e4m3_rne(xb[r, b])
                continue
            e = max(mx_exponent(amax), -127)
            e8[r, b] = e + 127
            codes[r, b] = e4m3_rne(xb[r, b] / 2.0 ** e)
    return codes.reshape(R, C), e8


def nvfp4_rows_ref(x: torch.Tensor, s_enc_rows: torch.Tensor):
    """(unpacked codes (R,C), block scales uint8 (R, C/16)) for NVFP4 along the last dim;
    ``s_enc_rows``: float64 (R,) per-row S_enc (already an fp32 value)."""
    R, C = x.shape
    xb = x.double().reshape(R, C // 16, 16)
    s = s_enc_rows.double().reshape(R, 1)
    bamax = xb.abs().amax(-1)
    bs_code = e4m3_rne(f32(f32(bamax * s) / 6.0))
    bs = bs_code.view(torch.float8_e4m3fn).double()
    v = f32(f32(xb * s.unsqueeze(-1)) / bs.unsqueeze(-1))
    v = torch.where(bs.unsqueeze(-1) == 0, torch.zeros_like(v), v)
    return e2m1_rne(v).reshape(R, C), bs_code


def nvfp4_s_enc(amax: float) -> float:
    if amax > 0 and math.isfinite(amax):
        return f32(torch.tensor(448.0 * 6.0 / amax)).item()
    return 1.0


def pad_transpose_ref(x: torch.Tensor, sizes, align: int, Tc: int) -> torch.Tensor:
    """(K, Tc) float64: each group's rows as columns, groups padded to ``align``."""
    out = torch.zeros(x.shape[1], Tc, dtype=torch.float64)
    start = col = 0
    for n in sizes:
        out[:, col:col + n] = x[start:start + n].double().t()
        start += n
        col += (n + align - 1) // align * align
    return out
