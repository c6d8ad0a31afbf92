"""Matmul on packed weights and the element-wise kernels of the forward pass, on torch tensors.

Activations are float32 [M, K] (M token rows); heads are [M, H, D]. Every function works on
whatever device its tensors live on (CUDA, or torch's CPU device in tests).

A matmul takes one of three paths (matmul_path says which): decode's few rows on CUDA, where
triton imports, one fused dequantize-GEMV kernel over the packed blocks (fused_gemv.py); else the
weight is dequantized tile by tile and each tile is one GEMM, in float16 on CUDA (prefill), in
float32 on the CPU device (bit-exact tiles, the reference the others are tested against). Tests
run the float16/bfloat16 GEMMs on the CPU device by choosing the dtype, and the fused kernel
through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F

from .quants import BF16, F16, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, TRAITS, dequantize, row_nbytes

# A matmul decodes at most this many weight elements at once, so the output head of a large
# vocabulary never needs a whole float copy of itself. On a GPU a big tile (64 MiB as float32)
# keeps launches few; on the CPU device a small one (1 MiB) stays in cache and reuses the
# allocator's memory, where fresh large buffers cost page faults (6x slower measured).
TILE_ELEMENTS = 1 << 24
CPU_TILE_ELEMENTS = 1 << 18

# Decode: up to this many activation rows take the fused dequantize-GEMV Triton kernel, for
# these types (the real test models' ones); other types and more rows dequantize + GEMM.
DECODE_MAX_ROWS = 8
FUSED_TYPES = frozenset({Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K})

# The GEMM's input dtype per device type (absent: float32, bit-exact tiles). float16, not
# bfloat16: its 11-bit significand is 8x finer, and its range is made a non-question by scaling
# (see _half_matmul). The CPU device computes in float32 unless a caller asks otherwise: its
# half-precision GEMMs are slow and serve only to test this path.
GEMM_DTYPES: dict[str, torch.dtype] = {"cuda": torch.float16}

# How many matmuls took each path since the last clear, by (path, "decode" for at most
# DECODE_MAX_ROWS rows else "prefill"); benchmarks print it so their figures say what ran.
path_counts: Counter[tuple[str, str]] = Counter()


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix as the file's bytes on the device: uint8 [n_rows, row_bytes]."""

    data: torch.Tensor
    ggml_type: int
    row_len: int

    @property
    def n_rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())


def pack(raw: torch.Tensor, ggml_type: int, row_len: int) -> PackedWeight:
    """raw: uint8 bytes of whole rows, already on the target device."""
    if ggml_type not in TRAITS:
        raise ValueError(f"unsupported tensor type {ggml_type}")
    return PackedWeight(raw.reshape(-1, row_nbytes(ggml_type, row_len)), ggml_type, row_len)


def tile_rows(w: PackedWeight, device: torch.device) -> int:
    elements = CPU_TILE_ELEMENTS if device.type == "cpu" else TILE_ELEMENTS
    return max(1, min(w.n_rows, elements // w.row_len))


@cache
def fused_module() -> ModuleType | None:
    """kernels_gpu.fused_gemv, or None where triton does not import."""
    try:
        from . import fused_gemv
    except (ImportError, RuntimeError):
        return None
    return fused_gemv


def _interpreter_forced() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


# Device types where the fused kernel failed to build or launch (Triton also needs a host C
# compiler and a driver it supports): their matmuls dequantize + GEMM from then on.
fused_failed: set[str] = set()


def fused_usable(device: torch.device) -> bool:
    """The fused kernel runs compiled on CUDA, or through Triton's interpreter on the CPU device
    when TRITON_INTERPRET=1 (tests); triton is imported only when one of those could apply."""
    if device.type == "cpu" and not _interpreter_forced():
        return False
    if device.type not in ("cuda", "cpu") or device.type in fused_failed:
        return False
    module = fused_module()
    return module is not None and module.INTERPRETED == (device.type == "cpu")


def gemm_dtype(device: torch.device) -> torch.dtype:
    return GEMM_DTYPES.get(device.type, torch.float32)


def matmul_path(m_rows: int, w: PackedWeight, device: torch.device, dtype: torch.dtype) -> str:
    """Which path a matmul of m_rows activation rows takes: 'fused-gemv' or '<dtype>-gemm'."""
    if m_rows <= DECODE_MAX_ROWS and w.ggml_type in FUSED_TYPES and fused_usable(device):
        return "fused-gemv"
    return f"{str(dtype).removeprefix('torch.')}-gemm"


def matmul(x: torch.Tensor, w: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W^T -> float32 [M, N].

    Few rows on a device with the fused kernel: one dequantize-GEMV launch. Otherwise W is
    decoded tile by tile, each tile one GEMM in `dtype` (default: the device's, GEMM_DTYPES).
    """
    dtype = dtype or gemm_dtype(x.device)
    path = matmul_path(int(x.shape[0]), w, x.device, dtype)
    if path == "fused-gemv":
        try:
            out = _fused_gemv(x, w)
        except Exception as e:  # a Triton build or launch failure: not worth a failed request
            fused_failed.add(x.device.type)
            warnings.warn(f"fused GEMV off on {x.device.type}: {e!r}", RuntimeWarning, stacklevel=2)
            path = matmul_path(int(x.shape[0]), w, x.device, dtype)
        else:
            path_counts[path, "decode"] += 1
            return out
    path_counts[path, "decode" if x.shape[0] <= DECODE_MAX_ROWS else "prefill"] += 1
    if dtype == torch.float32:
        return _float32_matmul(x, w)
    return _half_matmul(x, w, dtype)


def _fused_gemv(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    module = fused_module()
    assert module is not None
    return module.gemv(x, w.data, w.ggml_type, w.row_len)  # type: ignore[no-any-return]


def _float32_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    step = tile_rows(w, x.device)
    if step >= w.n_rows:
        return x @ dequantize(w.data, w.ggml_type, w.row_len).T
    out = torch.empty((x.shape[0], w.n_rows), dtype=torch.float32, device=x.device)  # [M, N]
    for start in range(0, w.n_rows, step):
        tile = dequantize(w.data[start : start + step], w.ggml_type, w.row_len)
        torch.matmul(x, tile.T, out=out[:, start : start + tile.shape[0]])
    return out


def row_scales(a: torch.Tensor) -> torch.Tensor:
    """Per row of a [R, K], the power of two 2^e with max|row| in [2^(e-1), 2^e) (1 for a zero
    row): float32 [R, 1]. Dividing by it is exact and brings every row into (-1, 1)."""
    amax = a.abs().amax(dim=1, keepdim=True)
    mantissa, _ = torch.frexp(amax)  # amax = mantissa * 2^e, mantissa in [0.5, 1)
    return torch.where(mantissa > 0, amax / mantissa, torch.ones_like(amax))


def _half_tile(
    raw: torch.Tensor, w: PackedWeight, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight rows uint8 [n, row_bytes] -> the tile in dtype [n, K] and, for a float16 tile of
    decoded values, the power-of-two scales float32 [n, 1] it was divided by."""
    if w.ggml_type == F16 and dtype == torch.float16:
        return raw.contiguous().view(torch.float16), None  # the file's values, range and all
    if w.ggml_type == BF16 and dtype == torch.bfloat16:
        return raw.contiguous().view(torch.bfloat16), None
    tile = dequantize(raw, w.ggml_type, w.row_len)  # float32 [n, K]
    if dtype != torch.float16:
        return tile.to(dtype), None
    scales = row_scales(tile)
    return (tile / scales).to(dtype), scales  # not in place: an F32 tile views the weight


def _half_matmul(x: torch.Tensor, w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The tiled matmul with half-precision GEMMs (accumulating in float32 on CUDA).

    float16's range ends at 65504: a weight d * q past it needs a scale d beyond any trained
    model's (Q8_0: d > 515), but a float32 or bfloat16 tensor, an activation (down-projection
    inputs reach thousands) or a hostile file can go there. So for float16 both operands are
    divided row by row by a power of two into (-1, 1) (exact) and the product multiplied back
    in float32: every partial sum then stays below K, inside float16's range, and no value
    overflows whatever its size. bfloat16 has float32's range and needs none of it.
    """
    step = tile_rows(w, x.device)
    out = torch.empty((x.shape[0], w.n_rows), dtype=torch.float32, device=x.device)  # [M, N]
    x_scales = row_scales(x) if dtype == torch.float16 else None  # [M, 1]
    xh = (x / x_scales if x_scales is not None else x).to(dtype)  # [M, K]
    for start in range(0, w.n_rows, step):
        tile, w_scales = _half_tile(w.data[start : start + step], w, dtype)
        part = torch.matmul(xh, tile.T).to(torch.float32)  # [M, n]
        if x_scales is not None:
            part *= x_scales
        if w_scales is not None:
            part *= w_scales.T
        out[:, start : start + tile.shape[0]] = part
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., K] -> x / rms(x) * w (w [K]); the mean of squares in float64, as llama.cpp."""
    ms = x.to(torch.float64).square().mean(dim=-1, keepdim=True)
    scale = torch.rsqrt(ms + eps).to(torch.float32)
    return (x * scale) * w


def rope_tables(
    positions: torch.Tensor, base: float, n_rot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [M, 1, n_rot/2] of theta_i = pos * base^(-2i/n_rot), angles in float64."""
    i = torch.arange(n_rot // 2, dtype=torch.float64, device=positions.device)
    inv_freq = base ** (-2.0 * i / n_rot)
    theta = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [M, n_rot/2]
    return theta.cos().to(torch.float32)[:, None, :], theta.sin().to(torch.float32)[:, None, :]


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x [M, H, D] in place; neox rotates (x[i], x[i + n_rot/2]), normal (x[2i], x[2i+1])."""
    half = cos.shape[-1]
    n_rot = 2 * half
    if neox:
        a, b = x[..., :half].clone(), x[..., half:n_rot].clone()
        x[..., :half] = a * cos - b * sin
        x[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2].clone(), x[..., 1:n_rot:2].clone()
        x[..., 0:n_rot:2] = a * cos - b * sin
        x[..., 1:n_rot:2] = a * sin + b * cos
    return x


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up
