"""Gemma 3 architecture (text decoder)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

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
from llmapp.runtime.execution.models.llama import attention_block, output_head, projections
from llmapp.runtime.files.gguf_file import GGUFArray, GGUFFile

if TYPE_CHECKING:
    from numpy import ndarray as Array

    from llmapp.runtime.core.batch import ForwardBatch
    from llmapp.runtime.execution.backend import LayerBackends
    from llmapp.runtime.execution.weights import Weights

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


# ---- forward -------------------------------------------------------------------------------
# Quirks live here: scaled input embeddings, q/k head norms, post-attention and post-FFN
# norms before each residual add, GELU-tanh gating, and per-layer sliding windows with their
# own RoPE base. The GGUF norm weights already include Gemma's +1.


def forward(
    cfg: ModelConfig,
    weights: Weights,
    batch: ForwardBatch,
    kv_layers: list[Any],
    backends: LayerBackends,
) -> Array:
    """Logits [len(batch.logits_rows), n_vocab] for a batch of sequences."""
    from llmapp.runtime.execution.backend import move

    be = backends.embed
    emb = weights.token_embd
    x = be.embed(emb.data, emb.ggml_type, emb.row_len, batch.token_ids)  # [T, n_embd]
    x *= x.dtype.type(cfg.embed_scale)  # the embedding is always the CPU's numpy array
    for il, layer in enumerate(weights.layers):
        x, be = move(x, be, backends.layers[il]), backends.layers[il]
        base = cfg.rope_base_for(il)
        window = (cfg.sliding_window or 0) if cfg.layer_sliding[il] else 0
        h = be.rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        a = attention_block(cfg, be, layer, h, batch, kv_layers[il], base, window)
        x += be.rms_norm(a, layer["post_attention_norm"], cfg.norm_eps)
        h = be.rms_norm(x, layer["ffn_norm"], cfg.norm_eps)
        act = be.gelu_tanh_mul(*projections(be, h, layer, "ffn_gate_up", contiguous=False))
        x += be.rms_norm(be.matmul(act, layer["ffn_down"]), layer["post_ffw_norm"], cfg.norm_eps)
    return output_head(cfg, weights, x[batch.logits_rows], be, backends.head)
