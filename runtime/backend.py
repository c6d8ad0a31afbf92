"""The one door from the runtime to the kernels: arrays in, arrays out.

Model code calls only these methods, so a layer runs unchanged on the Numba CPU kernels or on
the torch ones. Kernel packages are imported here and nowhere else in the runtime.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from llmapp.runtime.batch import ForwardBatch


class Backend(Protocol):
    name: str

    def pack(self, raw: np.ndarray, ggml_type: int, row_len: int) -> Any: ...
    def pack_fused(self, parts: list[tuple[np.ndarray, int, int]]) -> Any | None: ...
    def matmul(self, x: np.ndarray, w: Any) -> np.ndarray: ...
    def embed(
        self, raw: np.ndarray, ggml_type: int, row_len: int, ids: np.ndarray
    ) -> np.ndarray: ...
    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray: ...
    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray: ...
    def rope(
        self, x: np.ndarray, positions: np.ndarray, base: float, n_rot: int, neox: bool
    ) -> None: ...
    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray: ...
    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray: ...
    def alloc_kv(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int) -> Any: ...
    def write_kv(self, kv: Any, k: np.ndarray, v: np.ndarray, slots: np.ndarray) -> None: ...
    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray: ...


class CPUBackend:
    """Numba kernels on the CPU, threads capped at the cores we may use."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None) -> None:
        from llmapp.kernels_cpu import threads

        threads.set_num_threads(n_threads)
        from llmapp.kernels_cpu import attention, matmul, ops, quants

        self._attention = attention
        self._matmul = matmul
        self._ops = ops
        self._quants = quants

    def pack(self, raw: np.ndarray, ggml_type: int, row_len: int) -> Any:
        return self._matmul.pack_weight(raw, ggml_type, row_len)

    def pack_fused(self, parts: list[tuple[np.ndarray, int, int]]) -> Any | None:
        """One packed matrix from several (raw, type, row_len) sharing an input (q|k|v,
        gate|up), or None where their layouts differ (they are then packed one by one)."""
        try:
            return self._matmul.pack_weights(parts)
        except ValueError:
            return None

    def matmul(self, x: np.ndarray, w: Any) -> np.ndarray:
        return self._matmul.matmul(x, w)

    def embed(self, raw: np.ndarray, ggml_type: int, row_len: int, ids: np.ndarray) -> np.ndarray:
        return self._quants.dequantize_rows(raw, ggml_type, row_len, ids.astype(np.int64))

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm(x, w, eps)

    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm_heads(x, w, eps)

    def rope(
        self, x: np.ndarray, positions: np.ndarray, base: float, n_rot: int, neox: bool
    ) -> None:
        self._ops.rope(x, positions, base, n_rot, neox)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.swiglu(gate, up)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.gelu_tanh_mul(gate, up)

    def alloc_kv(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int) -> Any:
        shape = (num_blocks, block_size, n_kv, head_dim)
        return (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32))

    def write_kv(self, kv: Any, k: np.ndarray, v: np.ndarray, slots: np.ndarray) -> None:
        self._attention.write_kv(kv[0], kv[1], k, v, slots)

    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray:
        out = np.empty_like(q)
        self._attention.paged_attention(
            q,
            kv[0],
            kv[1],
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.positions,
            scale,
            window,
            out,
        )
        return out


class ReferenceBackend:
    """Plain numpy on float32 weights: slow and memory hungry, but obviously right.

    Weights are dequantized whole at load (the one place that is allowed), so this backend
    is the yardstick the fast kernels and the model code are checked against.
    """

    name = "reference"

    def __init__(self, n_threads: int | None = None) -> None:
        from llmapp.kernels_cpu import quants

        self._quants = quants

    def pack(self, raw: np.ndarray, ggml_type: int, row_len: int) -> Any:
        return self._quants.dequantize(raw, ggml_type, row_len)  # float32 [N, K]

    def pack_fused(self, parts: list[tuple[np.ndarray, int, int]]) -> Any | None:
        return np.concatenate([self.pack(*part) for part in parts], axis=0)

    def matmul(self, x: np.ndarray, w: Any) -> np.ndarray:
        return (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)

    def embed(self, raw: np.ndarray, ggml_type: int, row_len: int, ids: np.ndarray) -> np.ndarray:
        return self._quants.dequantize_rows(raw, ggml_type, row_len, ids.astype(np.int64))

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x64 = x.astype(np.float64)
        scale = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
        return (x64 * scale * w).astype(np.float32)

    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self.rms_norm(x, w, eps)

    def rope(
        self, x: np.ndarray, positions: np.ndarray, base: float, n_rot: int, neox: bool
    ) -> None:
        half = n_rot // 2
        inv = base ** (-np.arange(half, dtype=np.float64) * 2 / n_rot)
        theta = positions.astype(np.float64)[:, None] * inv[None, :]  # [T, half]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        if neox:
            a, b = x[..., :half].astype(np.float64), x[..., half:n_rot].astype(np.float64)
            x[..., :half] = a * cos - b * sin
            x[..., half:n_rot] = a * sin + b * cos
        else:
            a, b = x[..., 0:n_rot:2].astype(np.float64), x[..., 1:n_rot:2].astype(np.float64)
            x[..., 0:n_rot:2] = a * cos - b * sin
            x[..., 1:n_rot:2] = a * sin + b * cos

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        g = gate.astype(np.float64)
        return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        g = gate.astype(np.float64)
        inner = np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3)
        return (0.5 * g * (1.0 + np.tanh(inner)) * up).astype(np.float32)

    def alloc_kv(self, num_blocks: int, block_size: int, n_kv: int, head_dim: int) -> Any:
        shape = (num_blocks, block_size, n_kv, head_dim)
        return (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32))

    def write_kv(self, kv: Any, k: np.ndarray, v: np.ndarray, slots: np.ndarray) -> None:
        n_kv, d = k.shape[1:]
        kv[0].reshape(-1, n_kv, d)[slots] = k
        kv[1].reshape(-1, n_kv, d)[slots] = v

    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray:
        out = np.empty_like(q)
        _, bs, n_kv, d = kv[0].shape
        n_head = q.shape[1]
        k_slots, v_slots = kv[0].reshape(-1, n_kv, d), kv[1].reshape(-1, n_kv, d)
        for s in range(batch.num_seqs):
            rows = slice(batch.query_start_loc[s], batch.query_start_loc[s + 1])
            n_keys = int(batch.seq_lens[s])
            pos_k = np.arange(n_keys)
            table = batch.block_tables[s]
            slots = table[pos_k // bs].astype(np.int64) * bs + pos_k % bs
            k = k_slots[slots].astype(np.float64)  # [n_keys, n_kv, D]
            v = v_slots[slots].astype(np.float64)
            qs = q[rows].astype(np.float64)  # [t, n_head, D]
            pos_q = batch.positions[rows][:, None]
            visible = pos_k[None, :] <= pos_q
            if window:
                visible &= pos_q - pos_k[None, :] < window
            kh = np.repeat(k, n_head // n_kv, axis=1)  # [n_keys, n_head, D]
            vh = np.repeat(v, n_head // n_kv, axis=1)
            scores = np.einsum("thd,khd->htk", qs, kh) * scale
            scores = np.where(visible[None], scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            out[rows] = np.einsum("htk,khd->thd", p, vh).astype(np.float32)
        return out


def make_backend(kind: str = "cpu", n_threads: int | None = None) -> Backend:
    if kind == "cpu":
        return CPUBackend(n_threads)
    if kind == "reference":
        return ReferenceBackend(n_threads)
    raise ValueError(f"unknown backend '{kind}' (cpu, reference)")
