"""Half-precision (IEEE f16) and bfloat16 decoding for Numba kernels.

Numba has no float16 type, so the bits are widened to float32 by hand. Every f16 value is
exactly representable in float32; the decode is exact, including subnormals, infinities and
NaN payloads (kept as they are, not quieted, which is what numpy's float16 -> float32 does).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def f16_bits_to_f32(h: int) -> np.float32:
    """Float32 value of the f16 whose 16 bits are `h`."""
    h = np.uint32(h) & np.uint32(0xFFFF)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == 0:
        if mant == 0:
            return np.uint32(sign).view(np.float32)
        # Subnormal half: shift the mantissa up until its leading one is the implicit bit;
        # each shift lowers the (float32-biased) exponent by one, starting from 2^-14.
        e32 = np.uint32(127 - 14)
        while (mant & np.uint32(0x400)) == 0:
            mant = mant << np.uint32(1)
            e32 -= np.uint32(1)
        mant &= np.uint32(0x3FF)
        return np.uint32(sign | (e32 << np.uint32(23)) | (mant << np.uint32(13))).view(np.float32)
    if exp == 31:
        # Inf (mant 0) or NaN with its payload moved to the top of the float32 mantissa.
        return np.uint32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13))).view(np.float32)
    e32 = exp + np.uint32(127 - 15)
    return np.uint32(sign | (e32 << np.uint32(23)) | (mant << np.uint32(13))).view(np.float32)


@njit(cache=True)
def read_f16(buf: np.ndarray, offset: int) -> np.float32:
    """Decode the little-endian f16 stored at buf[offset:offset + 2] (buf: uint8)."""
    bits = np.uint32(buf[offset]) | (np.uint32(buf[offset + 1]) << np.uint32(8))
    return f16_bits_to_f32(bits)


@njit(cache=True)
def bf16_bits_to_f32(h: int) -> np.float32:
    """Float32 value of the bfloat16 whose 16 bits are `h` (the top half of a float32)."""
    return np.uint32((np.uint32(h) & np.uint32(0xFFFF)) << np.uint32(16)).view(np.float32)


@njit(cache=True)
def f16_array_to_f32(bits: np.ndarray) -> np.ndarray:
    """Decode a 1-D array of f16 bit patterns (uint16) into float32."""
    out = np.empty(bits.shape[0], dtype=np.float32)
    for i in range(bits.shape[0]):
        out[i] = f16_bits_to_f32(bits[i])
    return out
