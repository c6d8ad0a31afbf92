"""Llama architecture (SmolLM2 and friends)."""

from __future__ import annotations

from itertools import accumulate
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
    from llmapp.runtime.execution.weights import Weights

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


def _project(be: Backend, h: Array, layer: dict[str, Any], name: str) -> Array:
    out = be.matmul(h, layer[name])
    bias = layer.get(name + ".bias")
    if bias is not None:
        out += bias
    return out


def projections(
    be: Backend, h: Array, layer: dict[str, Any], fused: str, contiguous: bool = True
) -> list[Array]:
    """Outputs of the matrices fused under `fused` (or of its parts, when not fused).

    With several rows, a fused output's parts are column views; contiguous=False hands them
    out as they are (to kernels that take strided rows, such as the gated activations)
    instead of copying each.
    """
    if fused not in layer:
        from llmapp.runtime.execution import weights as w

        return [_project(be, h, layer, name) for name in w.FUSIONS[fused]]
    from numpy import split  # not at the top: reading a config must stay light

    out = _project(be, h, layer, fused)
    bounds = list(accumulate(layer[fused + ".splits"]))[:-1]
    parts = split(out, bounds, axis=1)
    return [p if p.flags.c_contiguous or not contiguous else p.copy() for p in parts]


def attention_block(
    cfg: ModelConfig,
    be: Backend,
    layer: dict[str, Any],
    h: Array,
    batch: ForwardBatch,
    kv: Any,
    rope_base: float,
    window: int,
) -> Array:
    """Q/K/V projections, RoPE, paged attention and the output projection. h: [T, n_embd]."""
    t = h.shape[0]
    q2, k2, v2 = projections(be, h, layer, "attn_qkv")
    q = q2.reshape(t, cfg.n_head, cfg.head_dim)
    k = k2.reshape(t, cfg.n_head_kv, cfg.head_dim)
    v = v2.reshape(t, cfg.n_head_kv, cfg.head_dim)
    if "attn_q_norm" in layer:
        q = be.head_rms_norm(q, layer["attn_q_norm"], cfg.norm_eps)
        k = be.head_rms_norm(k, layer["attn_k_norm"], cfg.norm_eps)
    neox = cfg.rope_type == "neox"
    be.rope(q, batch.positions, rope_base, cfg.n_rot, neox)
    be.rope(k, batch.positions, rope_base, cfg.n_rot, neox)
    be.write_kv(kv, k, v, batch.slot_mapping)
    attn = be.attention(q, kv, batch, cfg.attn_scale, window)
    return be.matmul(attn.reshape(t, cfg.n_head * cfg.head_dim), layer["attn_output"])


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
    for il, layer in enumerate(weights.layers):
        x, be = move(x, be, backends.layers[il]), backends.layers[il]
        h = be.rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        x += attention_block(cfg, be, layer, h, batch, kv_layers[il], cfg.rope_base, 0)
        h = be.rms_norm(x, layer["ffn_norm"], cfg.norm_eps)
        act = be.swiglu(*projections(be, h, layer, "ffn_gate_up", contiguous=False))
        x += be.matmul(act, layer["ffn_down"])
    return output_head(cfg, weights, x[batch.logits_rows], be, backends.head)


def output_head(cfg: ModelConfig, weights: Weights, x: Array, src: Backend, be: Backend) -> Array:
    """Logits as a host array; x [R, n_embd] arrives from the last block's backend `src`."""
    from llmapp.runtime.execution.backend import move

    h = be.rms_norm(move(x, src, be), weights.output_norm, cfg.norm_eps)
    return be.to_host(be.matmul(h, weights.output))
