"""Half-precision (IEEE f16) and bfloat16 decoding for Numba kernels.

Numba has no float16 type, so the bits are widened to float32 by hand. Every f16 value is
exactly representable in float32; the decode is exact, including subnormals, infinities and
NaN payloads (kept as they are, not quieted, which is what numpy's float16 -> float32 does).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_TWO_POW_M24 = np.float32(2.0**-24)  # value of the least f16 subnormal bit


@njit(cache=True)
def f16_bits_to_f32(h: int | np.integer) -> np.float32:
    """Float32 value of the f16 whose 16 bits are `h`.

    Written as selects, not branches, so loops over many halves vectorize.
    """
    half = np.uint32(h) & np.uint32(0xFFFF)
    sign = (half & np.uint32(0x8000)) << np.uint32(16)
    magnitude = half & np.uint32(0x7FFF)
    exp = magnitude >> np.uint32(10)
    # Normal numbers: shift exponent and mantissa into place, then rebias 15 -> 127.
    bits = np.uint32((magnitude << np.uint32(13)) + np.uint32(112 << 23))
    if exp == 31:
        # Inf or NaN: exponent all ones; the NaN payload stays as it is (not quieted).
        bits = np.uint32(bits + np.uint32(112 << 23))
    if exp == 0:
        # Zero or subnormal: mantissa * 2^-24, exact in float32 (a normal number there).
        bits = np.float32(np.float32(magnitude) * _TWO_POW_M24).view(np.uint32)
    return np.uint32(bits | sign).view(np.float32)


@njit(cache=True)
def read_f16(buf: np.ndarray, offset: int) -> np.float32:
    """Decode the little-endian f16 stored at buf[offset:offset + 2] (buf: uint8)."""
    bits = np.uint32(buf[offset]) | (np.uint32(buf[offset + 1]) << np.uint32(8))
    return f16_bits_to_f32(bits)


@njit(cache=True)
def bf16_bits_to_f32(h: int | np.integer) -> np.float32:
    """Float32 value of the bfloat16 whose 16 bits are `h` (the top half of a float32)."""
    return np.uint32((np.uint32(h) & np.uint32(0xFFFF)) << np.uint32(16)).view(np.float32)


@njit(cache=True)
def f16_array_to_f32(bits: np.ndarray) -> np.ndarray:
    """Decode a 1-D array of f16 bit patterns (uint16) into float32."""
    out = np.empty(bits.shape[0], dtype=np.float32)
    for i in range(bits.shape[0]):
        out[i] = f16_bits_to_f32(bits[i])
    return out
