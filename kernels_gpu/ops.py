"""Matmul on packed weights and the element-wise kernels of the forward pass, on torch tensors.

Activations are float32 [M, K] (M token rows); heads are [M, H, D]. Every function works on
whatever device its tensors live on (CUDA, or torch's CPU device in tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quants import TRAITS, dequantize, row_nbytes

# A matmul decodes at most this many weight elements at once, so the output head of a large
# vocabulary never needs a whole float copy of itself. On a GPU a big tile (64 MiB as float32)
# keeps launches few; on the CPU device a small one (1 MiB) stays in cache and reuses the
# allocator's memory, where fresh large buffers cost page faults (6x slower measured).
TILE_ELEMENTS = 1 << 24
CPU_TILE_ELEMENTS = 1 << 18


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


def matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x [M, K] float32 @ W^T -> [M, N]: W decoded tile by tile, each tile one GEMM."""
    step = tile_rows(w, x.device)
    if step >= w.n_rows:
        return x @ dequantize(w.data, w.ggml_type, w.row_len).T
    out = torch.empty((x.shape[0], w.n_rows), dtype=torch.float32, device=x.device)  # [M, N]
    for start in range(0, w.n_rows, step):
        tile = dequantize(w.data[start : start + step], w.ggml_type, w.row_len)
        torch.matmul(x, tile.T, out=out[:, start : start + tile.shape[0]])
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
