"""Llama architecture (SmolLM2 and friends)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.config import (
    ModelConfig,
    build_config,
    check_tensors,
    read_hparams,
    standard_tensor_shapes,
)
from llmapp.runtime.files.gguf_file import GGUFFile

if TYPE_CHECKING:  # the forward pass needs no import at config time
    from numpy import ndarray as Array

    from llmapp.runtime.core.batch import ForwardBatch
    from llmapp.runtime.execution.backend import Backend, LayerBackends
    from llmapp.runtime.execution.weights import (
        AttentionWeights,
        FFNWeights,
        Linear,
        Projection,
        Weights,
    )

# -- config ----------------------------------------------------------------------------------

ARCH = "llama"


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    # Mixture-of-experts llama files (Mixtral) share the arch name but not the FFN.
    if gguf.get(f"{ARCH}.expert_count", 0):
        raise GGUFError(gguf.path, "mixture-of-experts llama models are not supported")
    hp = read_hparams(gguf, ARCH)
    check_tensors(gguf, standard_tensor_shapes(hp, gguf))
    # The converter permutes Q/K rows for llama, so RoPE rotates adjacent pairs.
    return build_config(gguf, hp, rope_type="normal")


# ---- forward -------------------------------------------------------------------------------
# One pre-norm decoder pass for every architecture here; what differs is config data: the
# embedding scale, q/k biases and head norms, post-attention and post-FFN norms (Gemma 3), the
# gate's activation, and per-layer sliding windows with their own RoPE base. Each residual add
# is fused with the norm that follows it (one backend call instead of two).


def linear(be: Backend, x: Array, lin: Linear) -> Array:
    out = be.matmul(x, lin.weight)
    if lin.bias is not None:
        be.add_(out, lin.bias)
    return out


def projections(be: Backend, x: Array, proj: Projection, contiguous: bool = True) -> list[Array]:
    """The outputs of a projection's parts, [T, width] each.

    With several rows, a fused output's parts are column views; contiguous=False hands them
    out as they are (to kernels that take strided rows, such as the gated activations)
    instead of copying each.
    """
    if proj.fused:
        return be.split(linear(be, x, proj.linears[0]), proj.widths, contiguous)
    return [linear(be, x, lin) for lin in proj.linears]


def attention_block(
    cfg: ModelConfig,
    be: Backend,
    attn: AttentionWeights,
    h: Array,
    batch: ForwardBatch,
    kv: Any,
    layer: int,
) -> Array:
    """Q/K/V projections, RoPE, paged attention and the output projection. h: [T, n_embd]."""
    t = h.shape[0]
    q2, k2, v2 = projections(be, h, attn.qkv)
    q = be.view(q2, (t, cfg.n_head, cfg.head_dim))
    k = be.view(k2, (t, cfg.n_head_kv, cfg.head_dim))
    v = be.view(v2, (t, cfg.n_head_kv, cfg.head_dim))
    if cfg.has_qk_norm:
        q = be.head_rms_norm(q, attn.q_norm, cfg.norm_eps)
        k = be.head_rms_norm(k, attn.k_norm, cfg.norm_eps)
    neox = cfg.rope_type == "neox"
    base = cfg.rope_base_for(layer)
    be.rope_qk(q, k, batch.positions, base, cfg.n_rot, neox)
    be.write_kv(kv, k, v, batch.slot_mapping)
    out = be.attention(q, kv, batch, cfg.attn_scale, cfg.window_for(layer))
    return linear(be, be.view(out, (t, cfg.n_embd_q)), attn.output)


def ffn_block(cfg: ModelConfig, be: Backend, ffn: FFNWeights, h: Array) -> Array:
    """The gated FFN: down(act(gate) * up). h: [T, n_embd]."""
    gate, up = projections(be, h, ffn.gate_up, contiguous=False)
    if cfg.activation == "gelu_tanh":
        act = be.gelu_tanh_mul(gate, up)
    else:
        act = be.swiglu(gate, up)
    return linear(be, act, ffn.down)


def forward(
    cfg: ModelConfig,
    weights: Weights,
    batch: ForwardBatch,
    kv_layers: list[Any],
    backends: LayerBackends,
) -> Array:
    """Logits [len(batch.logits_rows), n_vocab] for a batch of sequences.

    x is the residual stream [T, n_embd]; h the normed input of the next block, made by the
    residual add before it where the next block runs on the same backend.
    """
    from llmapp.runtime.execution.backend import move

    be = backends.embed
    emb = weights.token_embd
    x = be.embed(emb.data, emb.ggml_type, emb.row_len, batch.token_ids)  # [T, n_embd]
    if cfg.embed_scale != 1.0:
        be.scale_(x, cfg.embed_scale)
    h: Array | None = None
    n_layer = len(weights.layers)
    for il, layer in enumerate(weights.layers):
        if h is None:
            x, be = move(x, be, backends.layers[il]), backends.layers[il]
            h = be.rms_norm(x, layer.attn.norm, cfg.norm_eps)
        a = attention_block(cfg, be, layer.attn, h, batch, kv_layers[il], il)
        h = be.add_rms_norm(x, a, layer.ffn.norm, cfg.norm_eps, layer.attn.post_norm)
        f = ffn_block(cfg, be, layer.ffn, h)
        if il + 1 < n_layer:
            next_be, next_norm = backends.layers[il + 1], weights.layers[il + 1].attn.norm
        else:
            next_be, next_norm = backends.head, weights.output_norm
        if next_be is be:
            h = be.add_rms_norm(x, f, next_norm, cfg.norm_eps, layer.ffn.post_norm)
        else:
            post = layer.ffn.post_norm
            be.add_(x, f if post is None else be.rms_norm(f, post, cfg.norm_eps))
            h = None
    head = backends.head
    if h is None:  # the stream crosses to the head's backend: only the rows it needs
        rows = move(be.rows(x, batch.logits_rows), be, head)
        h = head.rms_norm(rows, weights.output_norm, cfg.norm_eps)
    else:
        h = head.rows(h, batch.logits_rows)
    return head.to_host(head.matmul(h, weights.output))
