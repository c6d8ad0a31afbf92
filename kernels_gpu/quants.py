"""GGUF block dequantization as plain torch tensor work, on any device.

Weights stay packed on the device as uint8 [n_rows, row_bytes] (the file's own bytes) and are
decoded per matmul. Results are bit-exact to `gguf.quants.dequantize`: integers are formed
exactly, and every float operation is done in float32 in the oracle's order (the K-quants'
d * scale and dmin * min first, then the multiply by q, then the min). Eager torch does each
op separately, so no fused multiply-add changes a rounding.

Block layouts are REFERENCE.md section 2; type ids are ggml's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16 = 10, 11, 12, 13, 14, 20, 30
QK_K = 256

# (elements per block, bytes per block)
TRAITS: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    IQ4_NL: (32, 18),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def row_nbytes(ggml_type: int, row_len: int) -> int:
    block, nbytes = TRAITS[ggml_type]
    if row_len % block:
        raise ValueError(f"row length {row_len} is not a multiple of the block size {block}")
    return row_len // block * nbytes


def _shifts(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _f16(field: torch.Tensor) -> torch.Tensor:
    """A 2-byte field [n, 2] -> float32 [n, 1] (a copy first: a sliced view may be unaligned)."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 16*g] -> uint8 [n, 32*g]: per 16 bytes the low nibbles, then the high ones."""
    n = qs.shape[0]
    half = qs.reshape(n, -1, 1, 16) >> _shifts([0, 4], qs.device).reshape(1, 1, 2, 1)
    return (half & 0x0F).reshape(n, -1)


def _bits(field: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Little-endian bit field uint8 [n, n_bits/8] -> uint8 [n, n_bits] of 0/1 (bit e at e)."""
    n = field.shape[0]
    out = field.reshape(n, -1, 1) >> _shifts(list(range(8)), field.device).reshape(1, 1, 8)
    return (out & 1).reshape(n, n_bits)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.float32) - 8.0
    return d * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).to(torch.float32) + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return d * (q.to(torch.float32) - 16.0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return d * q.to(torch.float32) + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=b.device)
    return d * table[_nibbles(b[:, 2:]).to(torch.long)]


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    # each 32-byte half of qs holds four 2-bit planes of 32 elements
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low = scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], b.device).reshape(1, 2, 1)
    high = scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 4, 1)
    sc = (low.reshape(n, 16) & 0x0F) | ((high.reshape(n, 16) & 3) << 4)
    dl = (d * (sc.to(torch.float32) - 32.0)).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(list(range(8)), b.device).reshape(1, 1, 8, 1)) & 1
    # a set high bit means no offset; a clear one subtracts 4
    q = ql.reshape(n, 16, 16).to(torch.float32) - 4.0 * (1 - qh.reshape(n, 16, 16)).to(
        torch.float32
    )
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte field of Q4_K/Q5_K -> eight 6-bit (scale, min) pairs, uint8 [n, 8] each."""
    lo, hi = s[:, :4], s[:, 4:8]
    tail = s[:, 8:12]
    sc = torch.cat([lo & 63, (tail & 0x0F) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], dim=1)
    return sc, mn


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    return dl, ml


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    q = (b[:, 16:].reshape(n, 4, 1, 32) >> _shifts([0, 4], b.device).reshape(1, 1, 2, 1)) & 0x0F
    return (dl * q.reshape(n, 8, 32).to(torch.float32) - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = (qs.reshape(n, 4, 1, 32) >> _shifts([0, 4], b.device).reshape(1, 1, 2, 1)) & 0x0F
    hb = (qh.reshape(n, 1, 1, 32) >> _shifts(list(range(8)), b.device).reshape(1, 1, 8, 1)) & 1
    q = ql.reshape(n, 8, 32) | (hb.reshape(n, 8, 32) << 4)
    return (dl * q.to(torch.float32) - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    dl = (d * scales).reshape(n, 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], b.device).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)) & 3
    q = low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)
    q = q.reshape(n, 16, 16).to(torch.float32) - 32.0
    return (dl * q).reshape(n, QK_K)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_rows(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    bits = b.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32)


# Quantized types decode blocks [n_blocks, type_size] -> float32 [n_blocks, block_size].
BLOCK_DECODERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q4_0: _q4_0,
    Q4_1: _q4_1,
    Q5_0: _q5_0,
    Q5_1: _q5_1,
    Q8_0: _q8_0,
    IQ4_NL: _iq4_nl,
    Q2_K: _q2_k,
    Q3_K: _q3_k,
    Q4_K: _q4_k,
    Q5_K: _q5_k,
    Q6_K: _q6_k,
}
# Float types decode whole rows uint8 [n_rows, row_bytes] -> float32 [n_rows, row_len].
ROW_DECODERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    F32: _f32,
    F16: _f16_rows,
    BF16: _bf16,
}


def supported_types() -> tuple[int, ...]:
    return tuple(TRAITS)


def dequantize(raw: torch.Tensor, ggml_type: int, row_len: int) -> torch.Tensor:
    """Raw rows uint8 [n_rows, row_bytes] (on any device) -> float32 [n_rows, row_len] there."""
    if ggml_type not in TRAITS:
        raise ValueError(f"unsupported tensor type {ggml_type}")
    row_bytes = row_nbytes(ggml_type, row_len)
    rows = raw.reshape(-1, row_bytes)
    n_rows = rows.shape[0]
    if ggml_type in ROW_DECODERS:
        return ROW_DECODERS[ggml_type](rows).reshape(n_rows, row_len)
    block, nbytes = TRAITS[ggml_type]
    blocks = rows.reshape(-1, nbytes)
    return BLOCK_DECODERS[ggml_type](blocks).reshape(n_rows, row_len)
