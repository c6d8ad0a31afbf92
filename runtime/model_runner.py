"""Owns the model's arrays: packed weights and the per-layer paged K/V pools.

The runner turns a ForwardBatch into logits; which sequences and tokens go into a batch is the
scheduler's business, and which blocks they own is the KV cache manager's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from llmapp.runtime.backend import Backend, make_backend
from llmapp.runtime.batch import ForwardBatch
from llmapp.runtime.config import ModelConfig, load_config
from llmapp.runtime.gguf_file import GGUFFile
from llmapp.runtime.models import ARCHITECTURES
from llmapp.runtime.weights import Weights, load_weights


@dataclass(frozen=True)
class RunnerOptions:
    ctx_size: int = 4096  # tokens of KV cache in all (shared by every running sequence)
    block_size: int = 16
    n_threads: int | None = None
    backend: str = "cpu"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.ctx_size < self.block_size:
            raise ValueError("ctx_size must be at least one block")


class ModelRunner:
    def __init__(self, path: str | Path, options: RunnerOptions | None = None) -> None:
        self.options = options or RunnerOptions()
        start = time.perf_counter()
        self.gguf = GGUFFile(path)
        self.config: ModelConfig = load_config(self.gguf)
        self.arch: ModuleType = ARCHITECTURES[self.config.arch]
        self.backend: Backend = make_backend(self.options.backend, self.options.n_threads)
        self.weights: Weights = load_weights(self.gguf, self.config, self.backend)
        self.gguf.release_pages()  # the packed copies are what the kernels read from now on
        self.block_size = self.options.block_size
        self.num_blocks = -(-self.options.ctx_size // self.block_size)
        cfg = self.config
        self.kv_layers: list[Any] = [
            self.backend.alloc_kv(self.num_blocks, self.block_size, cfg.n_head_kv, cfg.head_dim)
            for _ in range(cfg.n_layer)
        ]
        self.load_seconds = time.perf_counter() - start

    def bind_thread(self) -> None:
        """Make the calling thread (the compute thread) run kernels with our thread count."""
        self.backend.bind_thread()

    def forward(self, batch: ForwardBatch) -> np.ndarray:
        """Logits [len(batch.logits_rows), n_vocab], float32."""
        return self.arch.forward(self.config, self.weights, batch, self.kv_layers, self.backend)

    @property
    def kv_bytes(self) -> int:
        return sum(sum(a.nbytes for a in kv) for kv in self.kv_layers)
