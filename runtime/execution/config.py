"""Typed model config built from GGUF metadata, one small reader per architecture.

`models.load_config` dispatches on `general.architecture` to models/<arch>.py; each of those
reads its own keys, applies its quirks and checks its tensors, using the shared helpers here
(`read_hparams`, `standard_tensor_shapes`, `check_tensors`, `build_config`), so a fourth
architecture is one short new file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.files.ggml_types import type_name
from llmapp.runtime.files.gguf_file import GGUFArray, GGUFFile

ROPE_TYPES = ("normal", "neox")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class HParams:
    """The hyperparameters every decoder-only architecture stores under `<arch>.*`
    (`read_hparams`); ModelConfig adds each architecture's own fields to them."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    norm_eps: float
    rope_base: float
    n_rot: int  # leading dims of each head that RoPE rotates


@dataclasses.dataclass(frozen=True)
class ModelConfig(HParams):
    """Everything the runtime needs to know about a model's shape, checked once when built.

    Shapes follow the usual names: the attention width is n_head * head_dim (not always n_embd:
    Gemma 3 270M has 4 heads of 256 on a 640-wide residual stream).
    """

    name: str
    rope_type: str  # 'normal' rotates adjacent pairs, 'neox' rotates halves
    tied_embeddings: bool  # no output.weight: token_embd.weight is the output head
    attn_scale: float  # multiplies q.k before the softmax
    layer_sliding: tuple[bool, ...]  # per layer: sliding-window (local) attention?
    sliding_window: int | None = None  # key visible iff pos_q - pos_k < sliding_window
    rope_base_local: float | None = None  # rope base of sliding layers, when it differs
    embed_scale: float = 1.0  # multiplies the token embeddings
    has_qkv_bias: bool = False
    has_qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE
    has_post_norms: bool = False  # RMSNorm after attention and after the FFN
    activation: str = "silu"  # of the gate in the gated FFN
    file_type: int | None = None  # general.file_type (llama.cpp's LLAMA_FTYPE)
    tensor_types: tuple[tuple[str, int], ...] = ()  # (type name, tensor count), most first

    def __post_init__(self) -> None:
        for field_name in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff"):
            _check_positive_int(self, field_name)
        for field_name in ("n_vocab", "context_length", "n_rot"):
            _check_positive_int(self, field_name)
        if self.n_head % self.n_head_kv:
            raise ValueError(
                f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}"
            )
        if self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ValueError(
                f"n_rot {self.n_rot} must be even and at most head_dim {self.head_dim}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        for field_name in ("norm_eps", "rope_base", "embed_scale", "attn_scale"):
            _check_positive_float(self, field_name)
        if self.rope_base_local is not None:
            _check_positive_float(self, "rope_base_local")
        self._check_sliding()

    def _check_sliding(self) -> None:
        if not isinstance(self.layer_sliding, tuple) or len(self.layer_sliding) != self.n_layer:
            raise ValueError(f"layer_sliding must be a tuple of {self.n_layer} bools")
        if any(type(s) is not bool for s in self.layer_sliding):
            raise ValueError("layer_sliding must hold bools")
        if any(self.layer_sliding):
            if self.sliding_window is None:
                raise ValueError("sliding layers need a sliding_window")
            _check_positive_int(self, "sliding_window")
        elif self.sliding_window is not None:
            raise ValueError("sliding_window is set but no layer slides")

    @property
    def n_embd_q(self) -> int:
        """Width of the concatenated query heads (and of attn_output's input)."""
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        """Width of K (and V) for one token: what the KV cache stores per layer."""
        return self.n_head_kv * self.head_dim

    @property
    def n_gqa(self) -> int:
        """Query heads sharing one KV head."""
        return self.n_head // self.n_head_kv

    @property
    def tensor_type_counts(self) -> dict[str, int]:
        return dict(self.tensor_types)

    def window_for(self, layer: int) -> int:
        """The layer's sliding window, 0 for full attention."""
        if self.layer_sliding[layer] and self.sliding_window is not None:
            return self.sliding_window
        return 0

    def rope_base_for(self, layer: int) -> float:
        if self.layer_sliding[layer] and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base


def _check_positive_int(config: ModelConfig, field_name: str) -> None:
    value = getattr(config, field_name)
    if type(value) is not int or value <= 0:
        raise ValueError(f"{field_name} must be a positive int, got {value!r}")


def _check_positive_float(config: ModelConfig, field_name: str) -> None:
    value = getattr(config, field_name)
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field_name} must be a positive finite number, got {value!r}")


# -- helpers for models/<arch>.py ---------------------------------------------------------------


def read_hparams(gguf: GGUFFile, arch: str, *, rope_base_default: float = 10000.0) -> HParams:
    """Read and sanity-check the common `<arch>.*` keys (the ones llama.cpp also reads)."""
    key = f"{arch}."
    n_embd = _positive(gguf, key + "embedding_length")
    n_head = _positive(gguf, key + "attention.head_count")
    n_head_kv = _positive(gguf, key + "attention.head_count_kv", default=n_head)
    if n_embd % n_head and key + "attention.key_length" not in gguf.metadata:
        raise GGUFError(gguf.path, f"embedding length {n_embd} not divisible by {n_head} heads")
    head_dim = _positive(gguf, key + "attention.key_length", default=n_embd // n_head)
    value_dim = _positive(gguf, key + "attention.value_length", default=head_dim)
    if value_dim != head_dim:
        raise GGUFError(gguf.path, f"key length {head_dim} != value length {value_dim}")
    _reject_rope_scaling(gguf, arch)
    n_layer = _positive(gguf, key + "block_count")
    # Every layer has tensors: a larger count is corrupt (and must not size any loop).
    if n_layer > len(gguf.tensors):
        raise GGUFError(
            gguf.path, f"block count {n_layer} exceeds the file's {len(gguf.tensors)} tensors"
        )
    return HParams(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=_positive(gguf, key + "feed_forward_length"),
        n_vocab=vocab_size(gguf, arch),
        context_length=_positive(gguf, key + "context_length"),
        norm_eps=float(gguf.require(key + "attention.layer_norm_rms_epsilon", float)),
        rope_base=_float(gguf, key + "rope.freq_base", rope_base_default),
        n_rot=_positive(gguf, key + "rope.dimension_count", default=head_dim),
    )


def vocab_size(gguf: GGUFFile, arch: str) -> int:
    """Vocabulary size: the tokenizer's token list, else `<arch>.vocab_size`, else the embedding."""
    tokens = gguf.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GGUFArray):
        return len(tokens)
    if f"{arch}.vocab_size" in gguf.metadata:
        return _positive(gguf, f"{arch}.vocab_size")
    embd = gguf.tensor_info("token_embd.weight")
    return embd.shape[1] if len(embd.shape) == 2 else 0


def standard_tensor_shapes(hp: HParams, gguf: GGUFFile) -> dict[str, tuple[int, ...]]:
    """Expected GGUF shapes (row length first) of a llama-style decoder's tensors."""
    q, kv, d, ff = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_embd, hp.n_ff
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (d, hp.n_vocab),
        "output_norm.weight": (d,),
    }
    if "output.weight" in gguf.tensors:
        shapes["output.weight"] = (d, hp.n_vocab)
    per_layer = {
        "attn_norm.weight": (d,),
        "attn_q.weight": (d, q),
        "attn_k.weight": (d, kv),
        "attn_v.weight": (d, kv),
        "attn_output.weight": (q, d),
        "ffn_norm.weight": (d,),
        "ffn_gate.weight": (d, ff),
        "ffn_up.weight": (d, ff),
        "ffn_down.weight": (ff, d),
    }
    shapes.update(layer_tensor_shapes(hp, per_layer))
    return shapes


def layer_tensor_shapes(
    hp: HParams, per_layer: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """`blk.{i}.<name>` for every layer, in layer order."""
    return {
        f"blk.{i}.{name}": shape for i in range(hp.n_layer) for name, shape in per_layer.items()
    }


def check_tensors(gguf: GGUFFile, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Every expected tensor exists with exactly this shape (GGUF order)."""
    for name, shape in expected.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise GGUFError(gguf.path, f"missing tensor {name!r}")
        if info.shape != shape:
            raise GGUFError(
                gguf.path,
                f"tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}",
            )


def build_config(gguf: GGUFFile, hp: HParams, **arch_fields: Any) -> ModelConfig:
    """ModelConfig from the common hparams plus the architecture's own fields.

    Defaults: no sliding layers, attention scale 1/sqrt(head_dim). A value that fails the
    config's own checks is the file's fault, so it is reported as a GGUFError.
    """
    fields: dict[str, Any] = {f.name: getattr(hp, f.name) for f in dataclasses.fields(HParams)}
    fields |= {
        "name": _name(gguf),
        "tied_embeddings": "output.weight" not in gguf.tensors,
        "attn_scale": 1.0 / math.sqrt(hp.head_dim),
        "layer_sliding": (False,) * hp.n_layer,
        "file_type": _file_type(gguf),
        "tensor_types": tensor_type_counts(gguf),
    }
    fields.update(arch_fields)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise GGUFError(gguf.path, f"invalid model config: {e}") from None


def tensor_type_counts(gguf: GGUFFile) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for info in gguf.tensors.values():
        name = type_name(info.ggml_type)
        counts[name] = counts.get(name, 0) + 1
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _positive(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    if default is not None and key not in gguf.metadata:
        return default
    value: int = gguf.require(key, int)
    if value <= 0:
        raise GGUFError(gguf.path, f"key {key!r} must be positive, got {value}")
    return value


def _float(gguf: GGUFFile, key: str, default: float) -> float:
    if key not in gguf.metadata:
        return default
    return float(gguf.require(key, float))


def _name(gguf: GGUFFile) -> str:
    name = gguf.get("general.name")
    return name if isinstance(name, str) and name else gguf.path.stem


def _file_type(gguf: GGUFFile) -> int | None:
    value = gguf.get("general.file_type")
    return value if type(value) is int else None


def _reject_rope_scaling(gguf: GGUFFile, arch: str) -> None:
    # Scaled RoPE changes every position's angles; running without it would be silently wrong.
    kind = gguf.get(f"{arch}.rope.scaling.type", "none")
    if kind != "none":
        raise GGUFError(gguf.path, f"rope scaling {kind!r} is not supported")
    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(gguf.path, "rope frequency factors (rope_freqs.weight) are not supported")
