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

    def bind_thread(self) -> None:
        """Apply this backend's thread settings to the calling thread (the compute thread)."""
        ...

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


def _paged_args(
    q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
) -> tuple[Any, ...]:
    """paged_attention's arguments (and its reference's) from a batch, less the output."""
    k_cache, v_cache = kv
    seqs = (batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.positions)
    return (q, k_cache, v_cache, *seqs, scale, window)


class CPUBackend:
    """Numba kernels on the CPU, threads capped at the cores we may use."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None) -> None:
        from llmapp.kernels_cpu import threads

        self._threads = threads
        self.n_threads = threads.set_num_threads(n_threads)
        from llmapp.kernels_cpu import attention, matmul, ops, quants

        self._attention = attention
        self._matmul = matmul
        self._ops = ops
        self._quants = quants

    def bind_thread(self) -> None:
        # Numba's thread count is per calling thread; the weights were packed on another.
        if self._threads.get_num_threads() != self.n_threads:
            self._threads.set_num_threads(self.n_threads)

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
        self._attention.paged_attention(*_paged_args(q, kv, batch, scale, window), out)
        return out


class ReferenceBackend(CPUBackend):
    """The kernels' plain numpy references (float64 inside) on float32 weights: slow and
    memory hungry, but obviously right.

    Weights are dequantized whole at load (the one place that is allowed), so this backend
    is the yardstick the fast kernels and the model code are checked against. Embedding
    lookups and KV writes (exact copies) are the CPU backend's.
    """

    name = "reference"

    def pack(self, raw: np.ndarray, ggml_type: int, row_len: int) -> Any:
        return self._quants.dequantize(raw, ggml_type, row_len)  # float32 [N, K]

    def pack_fused(self, parts: list[tuple[np.ndarray, int, int]]) -> Any | None:
        return np.concatenate([self.pack(*part) for part in parts], axis=0)

    def matmul(self, x: np.ndarray, w: Any) -> np.ndarray:
        return self._matmul.matmul_ref(x, w)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm_ref(x, w, eps)

    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm_ref(x, w, eps)

    def rope(
        self, x: np.ndarray, positions: np.ndarray, base: float, n_rot: int, neox: bool
    ) -> None:
        x[...] = self._ops.rope_ref(x, positions, base, n_rot, neox)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.swiglu_ref(gate, up)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.gelu_tanh_mul_ref(gate, up)

    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray:
        return self._attention.paged_attention_ref(*_paged_args(q, kv, batch, scale, window))


def make_backend(kind: str = "cpu", n_threads: int | None = None) -> Backend:
    if kind == "cpu":
        return CPUBackend(n_threads)
    if kind == "reference":
        return ReferenceBackend(n_threads)
    raise ValueError(f"unknown backend '{kind}' (cpu, reference)")


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings once): the CPU backend's
    default thread count, for front ends that report or choose a thread count."""
    from llmapp.kernels_cpu.threads import physical_cores as count

    return count()
