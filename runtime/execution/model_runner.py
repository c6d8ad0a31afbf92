"""Owns the model's arrays: packed weights and the per-layer paged K/V pools.

The runner turns a ForwardBatch into logits; which sequences and tokens go into a batch is the
scheduler's business, and which blocks they own is the KV cache manager's.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from llmapp.runtime.core.batch import ForwardBatch
from llmapp.runtime.core.kv_cache import CACHE_TYPES, DEFAULT_CACHE_TYPE, kv_bytes_per_token
from llmapp.runtime.execution import placement
from llmapp.runtime.execution.backend import (
    Backend,
    LayerBackends,
    TorchBackend,
    find_offload_device,
    make_backend,
)
from llmapp.runtime.execution.config import ModelConfig
from llmapp.runtime.execution.heap import settle_after_load
from llmapp.runtime.execution.models import ARCHITECTURES, load_config
from llmapp.runtime.execution.placement import NGpuLayers, OffloadInfo
from llmapp.runtime.execution.weights import Weights, load_weights
from llmapp.runtime.files.gguf_file import GGUFFile

log = logging.getLogger("llmapp.runtime")
COMPUTE_THREAD_NAME = "llmapp-compute"  # runtime/core/compute.py's thread
EXIT_WAIT_S = 2.0
EMBEDDING = "token_embd.weight"  # looked up row by row from the file at every step


@dataclass(frozen=True)
class RunnerOptions:
    ctx_size: int = 4096  # tokens of KV cache in all (shared by every running sequence)
    block_size: int = 16
    n_threads: int | None = None
    backend: str = "cpu"
    n_gpu_layers: NGpuLayers = 0  # slots on the offload device: a count, "auto" or "all"
    gpu_margin: int = placement.DEFAULT_MARGIN  # bytes `auto` leaves free on the device
    cache_type: str = DEFAULT_CACHE_TYPE  # how K/V are stored: f16, f32 or q8_0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.ctx_size < self.block_size:
            raise ValueError("ctx_size must be at least one block")
        ngl = self.n_gpu_layers
        if not (ngl in ("auto", "all") or (type(ngl) is int and ngl >= 0)):
            raise ValueError(f"n_gpu_layers must be >= 0, 'auto' or 'all', not {ngl!r}")
        if self.cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {', '.join(CACHE_TYPES)}")


class ModelRunner:
    def __init__(self, path: str | Path, options: RunnerOptions | None = None) -> None:
        self.options = options or RunnerOptions()
        start = time.perf_counter()
        self.gguf = GGUFFile(path)
        self.config: ModelConfig = load_config(self.gguf)
        self.arch: ModuleType = ARCHITECTURES[self.config.arch]
        self.backend: Backend = make_backend(self.options.backend, self.options.n_threads)
        self.block_size = self.options.block_size
        self.num_blocks = -(-self.options.ctx_size // self.block_size)
        self.offload: OffloadInfo | None = None
        self.backends = self._place()
        # The packed copies are what the kernels read from: the map's pages go as packing
        # reads them (the largest tensor, the head, would otherwise sit resident twice).
        with self.gguf.releasing_pages():
            self.weights: Weights = load_weights(
                self.gguf, self.config, self.backend, self.backends.layers, self.backends.head
            )
        cfg = self.config
        kv_dims = (self.num_blocks, self.block_size, cfg.n_head_kv, cfg.head_dim)
        self.kv_layers: list[Any] = [
            be.alloc_kv(*kv_dims, self.options.cache_type) for be in self.backends.layers
        ]
        settle_after_load()
        self.load_seconds = time.perf_counter() - start

    def _place(self) -> LayerBackends:
        """Each layer's backend from --n-gpu-layers (placement.py has the rules)."""
        cfg, request = self.config, self.options.n_gpu_layers
        n_layer = cfg.n_layer
        on_cpu = LayerBackends(self.backend, [self.backend] * n_layer, self.backend)
        try:
            device = find_offload_device(request != 0)
        except placement.PlacementError:
            if request != "auto":
                raise
            log.warning("auto offload: PyTorch is not installed, running on the CPU")
            return on_cpu
        if device.warning:
            log.warning(device.warning)
        if device.name is None:
            return on_cpu
        costs = placement.layer_costs(
            self.gguf, cfg, self.num_blocks, self.block_size, self.options.cache_type
        )
        slots = placement.resolve_slots(request, costs, device.free_bytes, self.options.gpu_margin)
        if slots == 0:
            return on_cpu
        gpu = TorchBackend(device.name, self.options.n_threads)
        head, layers = placement.split_slots(n_layer, slots)
        weight_bytes, kv_bytes = costs.slot_bytes(slots)
        self.offload = OffloadInfo(device.name, slots, n_layer + 1, weight_bytes, kv_bytes)
        atexit.register(_release_device_arrays, weakref.ref(self))
        return LayerBackends(
            self.backend,
            [gpu if on else self.backend for on in layers],
            gpu if head else self.backend,
        )

    def bind_thread(self) -> None:
        """Make the calling thread (the compute thread) run kernels with our thread count."""
        for be in self.backends.distinct:
            be.bind_thread()

    def forward(self, batch: ForwardBatch) -> np.ndarray:
        """Logits [len(batch.logits_rows), n_vocab], float32."""
        logits = self.arch.forward(self.config, self.weights, batch, self.kv_layers, self.backends)
        # The embedding rows this step looked up were read through the map, and the kernel maps
        # their neighbours too (~64 KB a row): drop them, or a long session keeps the whole
        # embedding resident. Refaulting a row from the page cache costs a few microseconds.
        self.gguf.release_pages([EMBEDDING])
        return logits

    @property
    def kv_bytes(self) -> int:
        return sum(sum(a.nbytes for a in kv) for kv in self.kv_layers)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes in every layer, in the cache type."""
        cfg = self.config
        dims = (cfg.n_layer, cfg.n_head_kv, cfg.head_dim)
        return kv_bytes_per_token(*dims, self.options.cache_type)


def _release_device_arrays(ref: weakref.ref[ModelRunner]) -> None:
    """At exit, let the engine's compute thread finish, then free the runner's torch tensors
    on the main thread. A daemon thread still inside torch's C++ code (freeing tensors, or its
    thread-local state at thread end) while the interpreter finalizes aborts the process
    ("terminate called without an active exception"), seen in 1 of 3 `run -ngl 5` exits."""
    for thread in threading.enumerate():
        if thread.name.startswith(COMPUTE_THREAD_NAME) and thread is not threading.current_thread():
            thread.join(timeout=EXIT_WAIT_S)  # it ends once no engine is attached
    runner = ref()
    if runner is not None:
        runner.kv_layers = []
        runner.weights.layers = []
        runner.weights.output = runner.weights.output_norm = None
        runner.backends = LayerBackends(runner.backend, [], runner.backend)
