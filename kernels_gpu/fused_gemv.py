"""Decode's matmul as one Triton kernel: GGUF blocks dequantized in registers and dotted with a
few activation rows (M <= 8), reading the packed weight (uint8 [N, row_bytes], the file's bytes)
directly; no float copy of the weight is ever written.

Each program owns BLOCK_N weight rows and walks K in BLOCK_K steps: every element k of a row is
decoded from its block (k // QK) by the type's formulas (REFERENCE.md section 2; quants.py has the
same arithmetic as whole-tensor torch ops), in float32, then multiplied with x[:, k] for all M rows
and summed. The sum runs in another order than a GEMM's, so results agree with dequantize + matmul
to float32 rounding, not bit for bit.

On CUDA the kernel is compiled; on torch's CPU device it runs through Triton's interpreter (numpy),
which is how the tests check it without a GPU. Importing this module needs triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quants import Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, TRAITS, row_nbytes

# The types the kernel decodes; (offset of the block's f16 scale d, of its second f16 or -1).
SCALE_FIELDS: dict[int, tuple[int, int]] = {
    Q4_0: (0, -1),
    Q4_1: (0, 2),
    Q5_0: (0, -1),
    Q8_0: (0, -1),
    Q4_K: (0, 2),
    Q6_K: (208, -1),
}
MAX_ROWS = 8
BLOCK_N = 16


def _gemv_body(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    row_bytes,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    D_OFF: tl.constexpr,
    DM_OFF: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # x float32 [M, K], w uint8 [N, row_bytes], out float32 [M, N]; all contiguous
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    ms = tl.arange(0, M_PAD)
    m_ok = ms < M
    row_base = rows.to(tl.int64) * row_bytes
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < K
        ok = row_ok[:, None] & k_ok[None, :]  # [BLOCK_N, BLOCK_K]
        # p: each element's block start, e: its index inside the block
        p = w_ptr + row_base[:, None] + ((k // QK) * TYPE_SIZE)[None, :]
        e = (k % QK)[None, :]
        d_lo = tl.load(p + D_OFF, mask=ok, other=0).to(tl.int32)
        d_hi = tl.load(p + D_OFF + 1, mask=ok, other=0).to(tl.int32)
        d = (d_lo | (d_hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        if DM_OFF >= 0:
            m_lo = tl.load(p + DM_OFF, mask=ok, other=0).to(tl.int32)
            m_hi = tl.load(p + DM_OFF + 1, mask=ok, other=0).to(tl.int32)
            dm = (m_lo | (m_hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        if QTYPE == 2:  # Q4_0: 16 bytes, low nibbles are elements 0..15
            q = (tl.load(p + 2 + e % 16, mask=ok, other=0).to(tl.int32) >> (e // 16 * 4)) & 15
            w = d * (q.to(tl.float32) - 8.0)
        elif QTYPE == 3:  # Q4_1
            q = (tl.load(p + 4 + e % 16, mask=ok, other=0).to(tl.int32) >> (e // 16 * 4)) & 15
            w = d * q.to(tl.float32) + dm
        elif QTYPE == 6:  # Q5_0: the fifth bits as a little-endian 32-bit field
            low = (tl.load(p + 6 + e % 16, mask=ok, other=0).to(tl.int32) >> (e // 16 * 4)) & 15
            high = (tl.load(p + 2 + e // 8, mask=ok, other=0).to(tl.int32) >> (e % 8)) & 1
            w = d * ((low | (high << 4)).to(tl.float32) - 16.0)
        elif QTYPE == 8:  # Q8_0: int8 values
            q = tl.load(p + 2 + e, mask=ok, other=0).to(tl.int32)
            q = tl.where(q >= 128, q - 256, q)
            w = q.to(tl.float32) * d
        elif QTYPE == 12:  # Q4_K: eight sub-blocks of 32, 6-bit scales and mins
            s = e // 32
            a = tl.load(p + 4 + s, mask=ok, other=0).to(tl.int32)
            b = tl.load(p + 8 + s, mask=ok, other=0).to(tl.int32)
            c = tl.load(p + 4 + tl.maximum(s - 4, 0), mask=ok, other=0).to(tl.int32)
            first = s < 4
            sc = tl.where(first, a & 63, (b & 15) | ((c >> 6) << 4))
            mn = tl.where(first, b & 63, (b >> 4) | ((a >> 6) << 4))
            qb = tl.load(p + 16 + (s // 2) * 32 + e % 32, mask=ok, other=0).to(tl.int32)
            q = (qb >> ((s % 2) * 4)) & 15
            w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dm * mn.to(tl.float32)
        else:  # Q6_K: low 4 bits in ql, high 2 in qh, int8 scales per 16 elements
            half = e // 128
            ql = tl.load(p + half * 64 + e % 64, mask=ok, other=0).to(tl.int32)
            qh = tl.load(p + 128 + half * 32 + e % 32, mask=ok, other=0).to(tl.int32)
            low = (ql >> ((e // 64) % 2 * 4)) & 15
            high = (qh >> ((e // 32) % 4 * 2)) & 3
            sc = tl.load(p + 192 + e // 16, mask=ok, other=0).to(tl.int32)
            sc = tl.where(sc >= 128, sc - 256, sc)
            w = (d * sc.to(tl.float32)) * ((low | (high << 4)).to(tl.float32) - 32.0)
        x_ok = m_ok[:, None] & k_ok[None, :]
        xv = tl.load(x_ptr + ms[:, None] * K + k[None, :], mask=x_ok, other=0.0)  # [M_PAD, BLOCK_K]
        acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)
    out_ok = m_ok[:, None] & row_ok[None, :]
    tl.store(out_ptr + ms[:, None] * N + rows[None, :], acc, mask=out_ok)


# Triton builds its language for the interpreter or for a GPU once, when it is first imported
# (TRITON_INTERPRET=1 in the environment then); the kernel follows that choice.
_gemv_kernel = triton.jit(_gemv_body)
INTERPRETED = type(_gemv_kernel).__name__ == "InterpretedFunction"
TRITON_VERSION: str = triton.__version__


def compile_options(m_pad: int, ggml_type: int) -> dict[str, int | bool]:
    """The kernel's compile-time arguments for m_pad (a power of two) rows of a type."""
    qk, type_size = TRAITS[ggml_type]
    d_off, dm_off = SCALE_FIELDS[ggml_type]
    return {
        "QTYPE": ggml_type,
        "QK": qk,
        "TYPE_SIZE": type_size,
        "D_OFF": d_off,
        "DM_OFF": dm_off,
        "M_PAD": m_pad,
        "BLOCK_N": BLOCK_N,
        "BLOCK_K": block_k(m_pad),
    }


def block_k(m_pad: int) -> int:
    """Elements of K per step: the [M, BLOCK_N, BLOCK_K] product stays near 2048 values. Compiled
    for sm_90 (ptxas -v, no GPU needed), 4096 made the Q4_K kernel of one row spill registers."""
    return max(32, 2048 // (m_pad * BLOCK_N))


def gemv(x: torch.Tensor, data: torch.Tensor, ggml_type: int, row_len: int) -> torch.Tensor:
    """x float32 [M, K] (M <= MAX_ROWS) @ W^T -> float32 [M, N]; W: uint8 [N, row_bytes]."""
    if ggml_type not in SCALE_FIELDS:
        raise ValueError(f"the fused kernel does not decode type {ggml_type}")
    m, k = x.shape
    if not 1 <= m <= MAX_ROWS or k != row_len:
        raise ValueError(f"x {tuple(x.shape)} does not fit a fused GEMV of rows {row_len}")
    n = int(data.shape[0])
    x = x.to(torch.float32).contiguous()
    data = data.contiguous()
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)  # [M, N]
    if (x.device.type == "cuda") == INTERPRETED:
        state = "with" if INTERPRETED else "without"
        raise RuntimeError(f"triton was imported {state} its interpreter: no kernel for {x.device}")
    options = compile_options(triton.next_power_of_2(m), ggml_type)
    grid = (triton.cdiv(n, BLOCK_N),)
    # fused multiply-adds: the sums' rounding differs from a GEMM's anyway
    fusion = {} if INTERPRETED else {"enable_fp_fusion": True}
    _gemv_kernel[grid](x, data, out, m, n, k, row_nbytes(ggml_type, row_len), **options, **fusion)
    return out
