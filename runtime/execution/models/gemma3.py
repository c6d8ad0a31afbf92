"""Gemma 3 architecture (text decoder)."""

from __future__ import annotations

import math

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.config import (
    HParams,
    ModelConfig,
    build_config,
    check_tensors,
    layer_tensor_shapes,
    read_hparams,
    standard_tensor_shapes,
)
from llmapp.runtime.execution.models.llama import forward
from llmapp.runtime.files.gguf_file import GGUFArray, GGUFFile

# The forward pass is llama's: this file's config turns on the quirks (scaled input
# embeddings, q/k head norms, post-attention and post-FFN norms, GELU-tanh gating, per-layer
# sliding windows with their own RoPE base). The GGUF norm weights already include Gemma's +1.
__all__ = ["ARCH", "config_from_gguf", "forward"]

# -- config ----------------------------------------------------------------------------------

ARCH = "gemma3"
SLIDING_PATTERN = 6  # of every 6 layers, the first 5 use sliding-window attention
LOCAL_ROPE_BASE = 10000.0  # rope base of the sliding layers; the file stores only the global one
N_LAYER_27B = 62  # the 27B model scales attention by n_embd / n_head instead of head_dim


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    hp = read_hparams(gguf, ARCH)
    shapes = standard_tensor_shapes(hp, gguf)
    extra = {
        "attn_q_norm.weight": (hp.head_dim,),
        "attn_k_norm.weight": (hp.head_dim,),
        "post_attention_norm.weight": (hp.n_embd,),
        "post_ffw_norm.weight": (hp.n_embd,),
    }
    shapes.update(layer_tensor_shapes(hp, extra))
    check_tensors(gguf, shapes)
    layer_sliding = _layer_sliding(gguf, hp.n_layer)
    window = gguf.require(f"{ARCH}.attention.sliding_window", int)
    return build_config(
        gguf,
        hp,
        rope_type="neox",
        layer_sliding=layer_sliding,
        sliding_window=window if any(layer_sliding) else None,
        rope_base_local=_local_rope_base(gguf),
        # Norm weights in the GGUF already include Gemma's +1, so only these quirks remain.
        embed_scale=math.sqrt(hp.n_embd),
        attn_scale=_attn_scale(gguf, hp),
        has_qk_norm=True,
        has_post_norms=True,
        activation="gelu_tanh",
    )


def _layer_sliding(gguf: GGUFFile, n_layer: int) -> tuple[bool, ...]:
    """Which layers slide: a per-layer bool array or a period if the file has one, else 5 of 6."""
    pattern = gguf.get(f"{ARCH}.attention.sliding_window_pattern", SLIDING_PATTERN)
    if isinstance(pattern, GGUFArray):
        values = pattern.to_list() if pattern.elem_type != 8 else []
        if len(values) != n_layer:
            raise GGUFError(gguf.path, f"sliding window pattern has {len(values)} entries")
        return tuple(bool(v) for v in values)
    if type(pattern) is not int or pattern <= 0:
        raise GGUFError(gguf.path, f"bad sliding window pattern {pattern!r}")
    return tuple(il % pattern < pattern - 1 for il in range(n_layer))


def _local_rope_base(gguf: GGUFFile) -> float:
    value = gguf.get(f"{ARCH}.rope.freq_base_swa", LOCAL_ROPE_BASE)
    if type(value) not in (int, float):
        raise GGUFError(gguf.path, f"{ARCH}.rope.freq_base_swa is not a number")
    return float(value)


def _attn_scale(gguf: GGUFFile, hp: HParams) -> float:
    if f"{ARCH}.attention.scale" in gguf.metadata:
        return float(gguf.require(f"{ARCH}.attention.scale", float))
    if hp.n_layer == N_LAYER_27B:
        return 1.0 / math.sqrt(hp.n_embd / hp.n_head)
    return 1.0 / math.sqrt(hp.head_dim)
