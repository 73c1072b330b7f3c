"""Independent NumPy references for the Python tests: the number formats of
docs/formats.md written from the spec, not from kvc's code (different methods
where kvc uses bit tricks), so tests compare kvc against them."""

import numpy as np


def bf16_magnitude(bits):
    """Magnitude of bf16 patterns (sign ignored) in float64; exponent 255 gives the value
    the pattern would have with an unbounded exponent (2^128 for 0x7F80)."""
    bits = np.asarray(bits, dtype=np.int64)
    e = (bits >> 7) & 0xFF
    m = bits & 0x7F
    return np.where(e == 0, m * 2.0 ** -133, (128 + m) * np.exp2(e.astype(np.float64) - 134))


def bf16_round_nearest_even(x):
    """float32 -> bf16 bit patterns (uint16) by comparing the distances to the two
    neighbouring bf16 values in float64; ties to the even pattern; NaN -> 0x7FC0 with the
    sign; values past the largest finite bf16's rounding boundary -> inf."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.int64)
    sign = u >> 31
    mag = u & 0x7FFFFFFF
    lo = mag >> 16
    hi = lo + 1
    with np.errstate(invalid="ignore"):
        ax = np.abs(x.astype(np.float64))
        d_lo = ax - bf16_magnitude(lo)
        d_hi = bf16_magnitude(hi) - ax
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ((lo & 1) == 1))
    r = np.where(pick_hi, hi, lo)
    r = np.where((mag & 0xFFFF) == 0, lo, r)  # exact, including ±inf
    r = np.where(mag > 0x7F800000, 0x7FC0, r)  # NaN
    return ((sign << 15) | r).astype(np.uint16)


def bf16_to_float(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def e4m3_value(codes):
    """E4M3 (FN) codes -> float64: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F/0xFF NaN."""
    c = np.asarray(codes, dtype=np.int64)
    e = (c >> 3) & 0xF
    m = c & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * np.exp2(e.astype(np.float64) - 7))
    v = np.where((c >> 7) == 1, -v, v)
    return np.where((c & 0x7F) == 0x7F, np.nan, v)


def ue8m0_value(b):
    return np.exp2(np.asarray(b, dtype=np.float64) - 127)


def dequantize_kv_rows(rows):
    """584-byte rows (uint8 (n, 584)) -> float64 (n, 512): 448 E4M3 codes times their
    64-code block's UE8M0 scale, then 64 little-endian bf16 RoPE dims; 8 scale bytes last."""
    rows = np.asarray(rows, dtype=np.uint8)
    codes = rows[:, :448]
    scales = ue8m0_value(rows[:, 576:583])  # 7 blocks; byte 583 is padding
    nope = e4m3_value(codes) * np.repeat(scales, 64, axis=1)
    rope = bf16_to_float(rows[:, 448:576].copy().view("<u2")).astype(np.float64)
    return np.concatenate([nope, rope], axis=1)


def hadamard(n=128):
    """Sylvester's Hadamard matrix of order n, scaled by n^-0.5 (orthonormal)."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)
