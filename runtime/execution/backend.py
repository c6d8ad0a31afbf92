"""The one door from the runtime to the kernels: arrays in, arrays out.

Model code calls only these methods, so a layer runs unchanged on the Numba CPU kernels or on
the torch ones. Kernel packages are imported here and nowhere else in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from llmapp.runtime.core.batch import ForwardBatch


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
    def add_rms_norm(
        self, x: np.ndarray, delta: np.ndarray, w: np.ndarray, eps: float, delta_w: Any = None
    ) -> np.ndarray:
        """The residual add and the next norm in one: x += delta (or, with delta_w, the
        normed delta rms_norm(delta) * delta_w) in place; returns rms_norm(x) * w."""
        ...

    def add_(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x += y in place, y [M, K] like x or a bias [K] added to every row; returns x."""
        ...

    def scale_(self, x: np.ndarray, s: float) -> np.ndarray:
        """x *= s in place; returns x."""
        ...

    def split(self, x: np.ndarray, widths: tuple[int, ...], contiguous: bool) -> list[Any]:
        """x [M, sum(widths)] cut into column blocks [M, width]: views, or contiguous copies
        where a view is strided and `contiguous` asks for rows in one piece."""
        ...

    def view(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """x's elements in a new shape (the same memory where the layout allows)."""
        ...

    def rows(self, x: np.ndarray, index: np.ndarray) -> np.ndarray:
        """x[index] for a host array of row numbers."""
        ...

    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray: ...
    def rope_qk(
        self,
        q: np.ndarray,
        k: np.ndarray,
        positions: np.ndarray,
        base: float,
        n_rot: int,
        neox: bool,
    ) -> None:
        """RoPE of q [T, Hq, D] and k [T, Hk, D] in place, by positions [T] (int32)."""
        ...

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray: ...
    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray: ...
    def alloc_kv(
        self, num_blocks: int, block_size: int, n_kv: int, head_dim: int, cache_type: str = "f16"
    ) -> Any:
        """One layer's K/V blocks in a cache type (f16, f32, q8_0: runtime/core/kv_cache.py)."""
        ...

    def write_kv(self, kv: Any, k: np.ndarray, v: np.ndarray, slots: np.ndarray) -> None: ...
    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray: ...
    def vector(self, v: np.ndarray) -> Any:
        """A float32 weight vector (norm, bias) where this backend computes."""
        ...

    def adopt(self, x: np.ndarray) -> Any:
        """Host activations [T, n_embd] handed over at a device boundary."""
        ...

    def to_host(self, x: Any) -> np.ndarray:
        """This backend's activations (or logits) back as a float32 numpy array."""
        ...


@dataclass
class LayerBackends:
    """The backend of each part of the model: the embedding's (always the CPU's), each
    block's and the output head's. Model code moves activations when the backend changes."""

    embed: Backend
    layers: list[Backend]
    head: Backend
    distinct: list[Backend] = field(default_factory=list)

    def __post_init__(self) -> None:
        for be in [self.embed, *self.layers, self.head]:
            if all(be is not d for d in self.distinct):
                self.distinct.append(be)


def move(x: Any, src: Backend, dst: Backend) -> Any:
    """Activations of `src` handed to `dst`: a device boundary is crossed through the host,
    and only where the backend changes (once per direction per step for a contiguous split)."""
    if src is dst:
        return x
    return dst.adopt(src.to_host(x))


def _paged_args(
    q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
) -> tuple[Any, ...]:
    """paged_attention's arguments (and its reference's) from a batch, less the output."""
    seqs = (batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.positions)
    return (q, kv[0], kv[1], *seqs, scale, window)


def _kv_scales(kv: Any) -> dict[str, Any]:
    """A q8_0 layer's (k, v, k_scale, v_scale) scales as keywords; none for f16 and f32."""
    return dict(zip(("k_scale", "v_scale"), kv[2:], strict=False))


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

    def add_rms_norm(
        self, x: np.ndarray, delta: np.ndarray, w: np.ndarray, eps: float, delta_w: Any = None
    ) -> np.ndarray:
        return self._ops.add_rms_norm(x, delta, w, eps, delta_w)

    def add_(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._ops.add_(x, y)

    def scale_(self, x: np.ndarray, s: float) -> np.ndarray:
        return self._ops.scale_(x, s)

    def split(self, x: np.ndarray, widths: tuple[int, ...], contiguous: bool) -> list[Any]:
        parts, start = [], 0
        for width in widths:
            part = x[:, start : start + width]
            start += width
            parts.append(np.ascontiguousarray(part) if contiguous else part)
        return parts

    def view(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return x.reshape(shape)

    def rows(self, x: np.ndarray, index: np.ndarray) -> np.ndarray:
        return x[index]

    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm_heads(x, w, eps)

    def rope_qk(
        self,
        q: np.ndarray,
        k: np.ndarray,
        positions: np.ndarray,
        base: float,
        n_rot: int,
        neox: bool,
    ) -> None:
        self._ops.rope(q, positions, base, n_rot, neox, k=k)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.swiglu(gate, up)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.gelu_tanh_mul(gate, up)

    def alloc_kv(
        self, num_blocks: int, block_size: int, n_kv: int, head_dim: int, cache_type: str = "f16"
    ) -> Any:
        return self._attention.alloc_kv(num_blocks, block_size, n_kv, head_dim, cache_type)

    def write_kv(self, kv: Any, k: np.ndarray, v: np.ndarray, slots: np.ndarray) -> None:
        self._attention.write_kv(kv[0], kv[1], k, v, slots, *kv[2:])

    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray:
        out = np.empty_like(q)
        args = _paged_args(q, kv, batch, scale, window)
        self._attention.paged_attention(*args, out, **_kv_scales(kv))
        return out

    def vector(self, v: np.ndarray) -> Any:
        return v

    def adopt(self, x: np.ndarray) -> Any:
        return x

    def to_host(self, x: Any) -> np.ndarray:
        return x  # type: ignore[no-any-return]


class ReferenceBackend(CPUBackend):
    """The kernels' plain numpy references (float64 inside) on float32 weights: slow and
    memory hungry, but obviously right.

    Weights are dequantized whole at load (the one place that is allowed), so this backend
    is the yardstick the fast kernels and the model code are checked against. Embedding
    lookups and KV writes (stored in the cache type, as the fast kernels store them) are
    the CPU backend's.
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

    def add_rms_norm(
        self, x: np.ndarray, delta: np.ndarray, w: np.ndarray, eps: float, delta_w: Any = None
    ) -> np.ndarray:
        return self._ops.add_rms_norm_ref(x, delta, w, eps, delta_w)

    def add_(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x += y
        return x

    def scale_(self, x: np.ndarray, s: float) -> np.ndarray:
        x *= np.float32(s)
        return x

    def head_rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm_ref(x, w, eps)

    def rope_qk(
        self,
        q: np.ndarray,
        k: np.ndarray,
        positions: np.ndarray,
        base: float,
        n_rot: int,
        neox: bool,
    ) -> None:
        q[...] = self._ops.rope_ref(q, positions, base, n_rot, neox)
        k[...] = self._ops.rope_ref(k, positions, base, n_rot, neox)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.swiglu_ref(gate, up)

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return self._ops.gelu_tanh_mul_ref(gate, up)

    def attention(
        self, q: np.ndarray, kv: Any, batch: ForwardBatch, scale: float, window: int
    ) -> np.ndarray:
        args = _paged_args(q, kv, batch, scale, window)
        return self._attention.paged_attention_ref(*args, **_kv_scales(kv))


def _omp_settings_first() -> None:
    """kernels_cpu sets the OpenMP wait policy in the environment; torch's own libgomp reads it
    once, when torch is imported. Imported the other way round, the CPU layers' 2-thread
    kernels ran 25x slower here (torch's threads spin-wait against them)."""
    from llmapp.kernels_cpu import threads  # noqa: F401


class TorchBackend:
    """kernels_gpu on one torch device: weights packed as the file's bytes on the device,
    KV blocks there too; the step's index arrays cross once and are reused by every layer."""

    name = "torch"

    def __init__(self, device: str, n_threads: int | None = None) -> None:
        _omp_settings_first()
        import torch

        from llmapp.kernels_gpu import attention, ops, quants

        self._torch = torch
        self._attention = attention
        self._ops = ops
        self._quants = quants
        self.device = torch.device(device)
        self.n_threads = n_threads
        # (id of a host array, extra key) -> (the array, kept alive so its id stays unique;
        # what was derived from it on the device)
        self._derived: dict[tuple[int, Any], tuple[Any, Any]] = {}

    def bind_thread(self) -> None:
        # On the CPU device torch's intra-op pool is the compute; keep it to our cores.
        if self.device.type == "cpu" and self.n_threads:
            if self._torch.get_num_threads() != self.n_threads:
                self._torch.set_num_threads(self.n_threads)

    def _upload(self, a: np.ndarray) -> Any:
        # Always a copy torch owns: a tensor over numpy memory frees it through Python, and a
        # daemon compute thread doing that while the interpreter exits aborts the process.
        return self._torch.tensor(a, device=self.device)

    def _cached(self, a: np.ndarray, key: Any, make: Any) -> Any:
        """make(a), computed once per host array (a step's positions, slots, block tables)."""
        hit = self._derived.get((id(a), key))
        if hit is not None and hit[0] is a:
            return hit[1]
        if len(self._derived) > 64:
            self._derived.clear()
        value = make(a)
        self._derived[(id(a), key)] = (a, value)
        return value

    def pack(self, raw: np.ndarray, ggml_type: int, row_len: int) -> Any:
        return self._ops.pack(self._upload(raw), ggml_type, row_len)

    def pack_fused(self, parts: list[tuple[np.ndarray, int, int]]) -> Any | None:
        return None  # each matmul decodes its own matrix; fusing saves no launch worth having

    def matmul(self, x: Any, w: Any) -> Any:
        return self._ops.matmul(x, w)

    def embed(self, raw: np.ndarray, ggml_type: int, row_len: int, ids: np.ndarray) -> Any:
        rows = self._upload(raw[ids.astype(np.int64)])
        return self._quants.dequantize(rows, ggml_type, row_len)

    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        return self._ops.rms_norm(x, w, eps)

    def add_rms_norm(self, x: Any, delta: Any, w: Any, eps: float, delta_w: Any = None) -> Any:
        x.add_(delta if delta_w is None else self._ops.rms_norm(delta, delta_w, eps))
        return self._ops.rms_norm(x, w, eps)

    def add_(self, x: Any, y: Any) -> Any:
        return x.add_(y)

    def scale_(self, x: Any, s: float) -> Any:
        return x.mul_(s)

    def split(self, x: Any, widths: tuple[int, ...], contiguous: bool) -> list[Any]:
        parts = self._torch.split(x, list(widths), dim=1)
        return [p.contiguous() if contiguous else p for p in parts]

    def view(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def rows(self, x: Any, index: np.ndarray) -> Any:
        rows = self._cached(index, "rows", lambda a: self._upload(a.astype(np.int64)))
        return x[rows]

    def head_rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        return self._ops.rms_norm(x, w, eps)

    def rope_qk(
        self, q: Any, k: Any, positions: np.ndarray, base: float, n_rot: int, neox: bool
    ) -> None:
        def tables(p: np.ndarray) -> Any:
            return self._ops.rope_tables(self._upload(p.astype(np.int64)), base, n_rot)

        cos, sin = self._cached(positions, ("rope", base, n_rot), tables)
        self._ops.rope_(q, cos, sin, neox)
        self._ops.rope_(k, cos, sin, neox)

    def swiglu(self, gate: Any, up: Any) -> Any:
        return self._ops.swiglu(gate, up)

    def gelu_tanh_mul(self, gate: Any, up: Any) -> Any:
        return self._ops.gelu_tanh_mul(gate, up)

    def alloc_kv(
        self, num_blocks: int, block_size: int, n_kv: int, head_dim: int, cache_type: str = "f16"
    ) -> Any:
        dims = (num_blocks, block_size, n_kv, head_dim)
        return self._attention.alloc_kv(*dims, self.device, cache_type)

    def write_kv(self, kv: Any, k: Any, v: Any, slots: np.ndarray) -> None:
        slot_t = self._cached(slots, "slots", lambda a: self._upload(a.astype(np.int64)))
        self._attention.write_kv(kv[0], kv[1], k, v, slot_t, *kv[2:])

    def attention(self, q: Any, kv: Any, batch: ForwardBatch, scale: float, window: int) -> Any:
        positions = self._cached(
            batch.positions, "positions", lambda a: self._upload(a.astype(np.int64))
        )
        tables = self._cached(batch.block_tables, "tables", lambda a: a.tolist())
        return self._attention.paged_attention(
            q,
            kv[0],
            kv[1],
            tables,
            batch.seq_lens.tolist(),
            batch.query_start_loc.tolist(),
            positions,
            scale,
            window,
            **_kv_scales(kv),
        )

    def vector(self, v: np.ndarray) -> Any:
        return self._upload(v.astype(np.float32))

    def adopt(self, x: np.ndarray) -> Any:
        return self._upload(x)

    def to_host(self, x: Any) -> np.ndarray:
        return np.ascontiguousarray(x.detach().to("cpu").numpy())


def make_backend(kind: str = "cpu", n_threads: int | None = None) -> Backend:
    if kind == "cpu":
        return CPUBackend(n_threads)
    if kind == "reference":
        return ReferenceBackend(n_threads)
    raise ValueError(f"unknown backend '{kind}' (cpu, reference)")


GPU_INSTALL_HINT = 'offloading layers needs PyTorch: pip install "llmapp[gpu]"'


@dataclass(frozen=True)
class OffloadDevice:
    """Where offloaded layers go: a torch device name, or None to stay on the CPU."""

    name: str | None
    free_bytes: int | None  # what `auto` may fill (None: unknown)
    warning: str | None = None


def find_offload_device(wanted: bool) -> OffloadDevice:
    """The torch device for offloaded layers; torch is imported only here, and only if wanted.

    LLMAPP_DEVICE picks one (`cpu`: torch's CPU device stands in for a GPU); otherwise the
    first CUDA device. Without torch an explicit request is an error with the install line;
    without a CUDA device the layers stay on the CPU with a warning.
    """
    from llmapp.runtime.execution import placement

    if not wanted:
        return OffloadDevice(None, None)
    _omp_settings_first()
    try:
        import torch
    except ImportError:
        raise placement.PlacementError(GPU_INSTALL_HINT) from None
    name = placement.env_device()
    free = placement.env_free_memory()
    if name is None:
        if not torch.cuda.is_available():
            return OffloadDevice(None, None, "no CUDA device found: running every layer on the CPU")
        name = "cuda:0"
    device = torch.device(name)
    if device.type == "cuda" and free is None:
        free = int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu" and free is None:
        free = _host_available()
    return OffloadDevice(str(device), free)


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings once): the CPU backend's
    default thread count, for front ends that report or choose a thread count."""
    from llmapp.kernels_cpu.threads import physical_cores as count

    return count()
