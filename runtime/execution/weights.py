"""Model weights as the backend wants them: matrices packed once, vectors as float32.

The token embedding stays as the file's quantized rows (a lookup dequantizes only the rows a
step needs); every other matrix is packed once into the backend's layout at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.backend import Backend
from llmapp.runtime.execution.config import ModelConfig
from llmapp.runtime.files.ggml_types import GGMLType
from llmapp.runtime.files.gguf_file import GGUFFile


@dataclass(frozen=True)
class RawRows:
    """Quantized rows straight from the file (read-only view of the memory map)."""

    data: np.ndarray  # uint8 [n_rows, row_bytes]
    ggml_type: int
    row_len: int


@dataclass
class Weights:
    token_embd: RawRows
    output_norm: Any  # float32 [n_embd], on the head's backend
    output: Any  # packed [n_vocab, n_embd]
    layers: list[dict[str, Any]] = field(default_factory=list)


def read_vector(gguf: GGUFFile, name: str) -> np.ndarray:
    info = gguf.tensors[name]
    raw = gguf.tensor_data(name).reshape(-1)
    if info.ggml_type == GGMLType.F32:
        return np.array(raw.view(np.float32))
    if info.ggml_type == GGMLType.F16:
        return raw.view(np.float16).astype(np.float32)
    raise GGUFError(gguf.path, f"tensor '{name}' is 1-D but stored as type {info.ggml_type}")


def raw_rows(gguf: GGUFFile, name: str) -> RawRows:
    info = gguf.tensors[name]
    return RawRows(gguf.tensor_data(name), info.ggml_type, info.row_len)


def pack_matrix(gguf: GGUFFile, name: str, backend: Backend) -> Any:
    rows = raw_rows(gguf, name)
    return backend.pack(rows.data, rows.ggml_type, rows.row_len)


def load_weights(
    gguf: GGUFFile,
    cfg: ModelConfig,
    backend: Backend,
    layer_backends: list[Backend] | None = None,
    head_backend: Backend | None = None,
) -> Weights:
    """Read every tensor the architecture uses: blk.N.* into per-layer dicts by short name.

    Per layer, 'attn_q' is the attn_q.weight matrix, 'attn_q.bias' its bias, 'attn_norm' the
    norm vector: 2-D tensors are packed, 1-D ones become float32 vectors. Matrices that read
    the same input are packed as one where the backend can (FUSIONS). Each layer (and the
    head) is packed by the backend that runs it (`backend` wherever none is given).
    """
    head = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    head_be = head_backend or backend
    weights = Weights(
        token_embd=raw_rows(gguf, "token_embd.weight"),
        output_norm=head_be.vector(read_vector(gguf, "output_norm.weight")),
        output=pack_matrix(gguf, head, head_be),
    )
    for il in range(cfg.n_layer):
        # What is packed so far (the head, earlier blocks) is read from our copies now: its
        # pages of the map go, so the map never holds more than about one block resident.
        gguf.release_pages()
        layer_be = layer_backends[il] if layer_backends is not None else backend
        prefix = f"blk.{il}."
        layer: dict[str, Any] = {}
        matrices: dict[str, RawRows] = {}
        for name, info in gguf.tensors.items():
            if not name.startswith(prefix):
                continue
            short = name[len(prefix) :].removesuffix(".weight")
            if len(info.shape) == 1:
                layer[short] = read_vector(gguf, name)
            else:
                matrices[short] = raw_rows(gguf, name)
        pack_layer(layer, matrices, layer_be)
        weights.layers.append(layer)
    return weights


FUSIONS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}


def pack_layer(layer: dict[str, Any], matrices: dict[str, RawRows], backend: Backend) -> None:
    """Pack a layer's matrices into `layer`; those that read the same input become one
    (one pass over x, one launch). The parts stay reachable by name through their row widths
    (`<fused>.splits`)."""
    for fused, names in FUSIONS.items():
        if not all(n in matrices for n in names):
            continue
        parts = [matrices[n] for n in names]
        packed = backend.pack_fused([(p.data, p.ggml_type, p.row_len) for p in parts])
        if packed is None:
            continue
        biases = [layer.pop(n + ".bias", None) for n in names]
        widths = [p.data.shape[0] for p in parts]
        for n in names:
            del matrices[n]
        layer[fused] = packed
        layer[fused + ".splits"] = widths
        if any(b is not None for b in biases):
            pieces = [
                b if b is not None else np.zeros(w, np.float32)
                for b, w in zip(biases, widths, strict=True)
            ]
            layer[fused + ".bias"] = np.concatenate(pieces)
    for short, rows in matrices.items():
        layer[short] = backend.pack(rows.data, rows.ggml_type, rows.row_len)
    for short, value in layer.items():
        if isinstance(value, np.ndarray) and value.ndim == 1:
            layer[short] = backend.vector(value)
