"""Model weights as the backend wants them: matrices packed once, vectors as float32.

The token embedding stays as the file's quantized rows (a lookup dequantizes only the rows a
step needs); every other matrix is packed once into the backend's layout at load. Each block's
tensors land in typed records (LayerWeights: its AttentionWeights and FFNWeights), the fields
the forward pass reads; which optional ones a layer has follows the config's flags.
"""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass(frozen=True)
class Linear:
    """y = x @ W^T (+ bias): a packed matrix [n_out, n_in] and its optional bias [n_out]."""

    weight: Any
    bias: Any | None = None


@dataclass(frozen=True)
class Projection:
    """Matrices that read the same input (q|k|v, gate|up), output widths `widths`.

    Packed as one Linear where the backend can (one pass over x, one launch; its output splits
    by the widths), else one Linear per part.
    """

    linears: tuple[Linear, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.linears) not in (1, len(self.widths)):
            raise ValueError(f"{len(self.linears)} matrices for {len(self.widths)} outputs")

    @property
    def fused(self) -> bool:
        return len(self.linears) < len(self.widths)


@dataclass(frozen=True)
class AttentionWeights:
    norm: Any  # [n_embd], before attention
    qkv: Projection  # q | k | v: n_embd_q, n_embd_kv, n_embd_kv
    output: Linear  # [n_embd, n_embd_q]
    q_norm: Any | None = None  # [head_dim], per head (config.has_qk_norm)
    k_norm: Any | None = None
    post_norm: Any | None = None  # [n_embd], on the output before the residual add


@dataclass(frozen=True)
class FFNWeights:
    norm: Any  # [n_embd], before the FFN
    gate_up: Projection  # gate | up: n_ff, n_ff
    down: Linear  # [n_embd, n_ff]
    post_norm: Any | None = None  # [n_embd] (config.has_post_norms)


@dataclass(frozen=True)
class LayerWeights:
    attn: AttentionWeights
    ffn: FFNWeights

    def tensors(self) -> Iterator[Any]:
        """Every packed matrix and vector of the layer (to count the bytes it holds)."""
        for part in (self.attn.qkv, self.ffn.gate_up):
            for lin in part.linears:
                yield from _linear_tensors(lin)
        yield from _linear_tensors(self.attn.output)
        yield from _linear_tensors(self.ffn.down)
        attn, ffn = self.attn, self.ffn
        vectors = (attn.norm, attn.q_norm, attn.k_norm, attn.post_norm, ffn.norm, ffn.post_norm)
        yield from (v for v in vectors if v is not None)


def _linear_tensors(lin: Linear) -> Iterator[Any]:
    yield lin.weight
    if lin.bias is not None:
        yield lin.bias


@dataclass
class Weights:
    token_embd: RawRows
    output_norm: Any  # float32 [n_embd], on the head's backend
    output: Any  # packed [n_vocab, n_embd]
    layers: list[LayerWeights] = field(default_factory=list)


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
    """Read every tensor the architecture uses: blk.N.* into one LayerWeights per block.

    Matrices that read the same input are packed as one where the backend can (FUSIONS).
    Each layer (and the head) is packed by the backend that runs it (`backend` wherever none
    is given).
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
        tensors = LayerTensors(gguf, il, layer_be)
        for name, info in gguf.tensors.items():
            if not name.startswith(prefix):
                continue
            short = name[len(prefix) :].removesuffix(".weight")
            if len(info.shape) == 1:
                tensors.vectors[short] = read_vector(gguf, name)
            else:
                tensors.matrices[short] = raw_rows(gguf, name)
        weights.layers.append(pack_layer(cfg, tensors))
    return weights


FUSIONS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}


@dataclass
class LayerTensors:
    """One block's tensors as read from the file, by short name ('attn_q', 'attn_q.bias')."""

    gguf: GGUFFile
    index: int
    backend: Backend
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    matrices: dict[str, RawRows] = field(default_factory=dict)

    def vector(self, short: str) -> Any:
        """A required vector on the layer's backend."""
        if short not in self.vectors:
            raise GGUFError(self.gguf.path, f"missing tensor 'blk.{self.index}.{short}.weight'")
        return self.backend.vector(self.vectors[short])

    def optional_vector(self, short: str, wanted: bool) -> Any | None:
        return self.vector(short) if wanted else None


def pack_layer(cfg: ModelConfig, tensors: LayerTensors) -> LayerWeights:
    """A block's LayerWeights: its matrices packed, q|k|v and gate|up fused where the backend
    can; norms that only some architectures have are read where the config says so."""
    attn = AttentionWeights(
        norm=tensors.vector("attn_norm"),
        qkv=pack_projection(tensors, "attn_qkv", require_bias=cfg.has_qkv_bias),
        output=pack_linear(tensors, "attn_output"),
        q_norm=tensors.optional_vector("attn_q_norm", cfg.has_qk_norm),
        k_norm=tensors.optional_vector("attn_k_norm", cfg.has_qk_norm),
        post_norm=tensors.optional_vector("post_attention_norm", cfg.has_post_norms),
    )
    ffn = FFNWeights(
        norm=tensors.vector("ffn_norm"),
        gate_up=pack_projection(tensors, "ffn_gate_up"),
        down=pack_linear(tensors, "ffn_down"),
        post_norm=tensors.optional_vector("post_ffw_norm", cfg.has_post_norms),
    )
    return LayerWeights(attn, ffn)


def pack_linear(tensors: LayerTensors, short: str) -> Linear:
    rows = tensors.matrices[short]
    bias = tensors.vectors.get(short + ".bias")
    be = tensors.backend
    return Linear(
        be.pack(rows.data, rows.ggml_type, rows.row_len),
        None if bias is None else be.vector(bias),
    )


def pack_projection(tensors: LayerTensors, fused: str, require_bias: bool = False) -> Projection:
    """The parts of FUSIONS[fused] as one packed matrix where the backend can, else one by one.
    A bias present on any part covers the fused output (zeros for the parts without)."""
    names = FUSIONS[fused]
    missing = [n for n in names if n not in tensors.matrices]
    missing += [n + ".bias" for n in names if require_bias and n + ".bias" not in tensors.vectors]
    if missing:
        name = missing[0] if missing[0].endswith(".bias") else missing[0] + ".weight"
        raise GGUFError(tensors.gguf.path, f"missing tensor 'blk.{tensors.index}.{name}'")
    parts = [tensors.matrices[n] for n in names]
    widths = tuple(p.data.shape[0] for p in parts)
    be = tensors.backend
    packed = be.pack_fused([(p.data, p.ggml_type, p.row_len) for p in parts])
    if packed is None:
        return Projection(tuple(pack_linear(tensors, n) for n in names), widths)
    biases = [tensors.vectors.get(n + ".bias") for n in names]
    bias = None
    if any(b is not None for b in biases):
        pieces = [
            b if b is not None else np.zeros(w, np.float32)
            for b, w in zip(biases, widths, strict=True)
        ]
        bias = be.vector(np.concatenate(pieces))
    return Projection((Linear(packed, bias),), widths)
