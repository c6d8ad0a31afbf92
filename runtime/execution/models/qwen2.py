"""Qwen2 architecture (Qwen2.5 and Qwen2.5-Coder)."""

from __future__ import annotations

from llmapp.runtime.execution.config import (
    ModelConfig,
    build_config,
    check_tensors,
    layer_tensor_shapes,
    read_hparams,
    standard_tensor_shapes,
)
from llmapp.runtime.execution.models.llama import forward
from llmapp.runtime.files.gguf_file import GGUFFile

__all__ = ["ARCH", "config_from_gguf", "forward"]  # forward: llama's, biases come with the weights

# -- config ----------------------------------------------------------------------------------

ARCH = "qwen2"


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    hp = read_hparams(gguf, ARCH)
    shapes = standard_tensor_shapes(hp, gguf)
    # Q, K and V projections carry F32 biases; the output projection has none.
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    biases = {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
    shapes.update(layer_tensor_shapes(hp, biases))
    check_tensors(gguf, shapes)
    return build_config(gguf, hp, rope_type="neox", has_qkv_bias=True)
