"""Typed model configs: the three architectures on tiny synthetic files, every config error,
ModelConfig's own checks, and the expected values of the three real models."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import pytest
from test_gguf_file import write_tiny_model

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.config import ModelConfig
from llmapp.runtime.execution.models import ARCHITECTURES, load_config, read_config
from llmapp.runtime.files.gguf_file import GGUFFile

VT = gguf.GGUFValueType


def config_of(path: Path) -> ModelConfig:
    with GGUFFile(path) as g:
        return load_config(g)


def config_error(path: Path) -> str:
    with pytest.raises(GGUFError) as info:
        read_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def test_registry() -> None:
    assert sorted(ARCHITECTURES) == ["gemma3", "llama", "qwen2"]
    for arch, module in ARCHITECTURES.items():
        assert module.ARCH == arch and callable(module.config_from_gguf)


def test_tiny_llama(tmp_path: Path) -> None:
    c = config_of(write_tiny_model(tmp_path / "llama.gguf"))
    assert (c.arch, c.name) == ("llama", "Tiny Test Model")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff) == (2, 32, 4, 2, 8, 64)
    assert (c.n_vocab, c.context_length, c.n_rot) == (16, 256, 8)
    assert c.rope_type == "normal" and c.rope_base == 10000.0 and c.rope_base_local is None
    assert c.norm_eps == pytest.approx(1e-5)
    assert c.tied_embeddings and not c.has_qkv_bias and not c.has_qk_norm
    assert c.layer_sliding == (False, False) and c.sliding_window is None
    assert c.attn_scale == 1 / math.sqrt(8) and c.embed_scale == 1.0
    assert c.activation == "silu" and c.file_type == 7
    assert sum(c.tensor_type_counts.values()) == 2 + 2 * 9
    assert c.tensor_type_counts["F32"] == 1 + 2 * 2 + 1  # output_norm, 4 norms, 1 weight
    assert (c.n_embd_q, c.n_embd_kv, c.n_gqa) == (32, 16, 2)
    hash(c)  # frozen and hashable


def test_untied_output(tmp_path: Path) -> None:
    assert not config_of(write_tiny_model(tmp_path / "m.gguf", tied=False)).tied_embeddings


def test_tiny_qwen2(tmp_path: Path) -> None:
    c = config_of(write_tiny_model(tmp_path / "q.gguf", arch="qwen2"))
    assert c.arch == "qwen2" and c.rope_type == "neox" and c.has_qkv_bias


def test_qwen2_needs_its_biases(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "q.gguf", arch="qwen2", omit_tensors=["blk.1.attn_k.bias"])
    assert "missing tensor 'blk.1.attn_k.bias'" in config_error(path)


def test_tiny_gemma3(tmp_path: Path) -> None:
    sliding = {"gemma3.attention.sliding_window": (16, VT.UINT32)}
    path = write_tiny_model(
        tmp_path / "g.gguf", arch="gemma3", n_layer=7, n_head_kv=1, head_dim=16, extra_kv=sliding
    )
    c = config_of(path)
    assert c.head_dim == 16 and c.n_embd_q == 64 and c.n_rot == 16
    assert c.layer_sliding == (True,) * 5 + (False, True)
    assert c.sliding_window == 16
    assert c.rope_base == 10000.0 and c.rope_base_local == 10000.0
    assert [c.rope_base_for(i) for i in (0, 5)] == [10000.0, 10000.0]
    assert c.embed_scale == math.sqrt(32) and c.attn_scale == 1 / 4
    assert c.has_qk_norm and c.has_post_norms and c.activation == "gelu_tanh"
    assert c.rope_type == "neox" and c.tied_embeddings


def test_gemma3_pattern_and_scale_from_metadata(tmp_path: Path) -> None:
    extra = {
        "gemma3.attention.sliding_window": (16, VT.UINT32),
        "gemma3.attention.sliding_window_pattern": (2, VT.UINT32),
        "gemma3.attention.scale": (0.5, VT.FLOAT32),
        "gemma3.rope.freq_base": (1e6, VT.FLOAT32),
    }
    c = config_of(write_tiny_model(tmp_path / "g.gguf", arch="gemma3", n_layer=4, extra_kv=extra))
    assert c.layer_sliding == (True, False, True, False)
    assert c.attn_scale == 0.5
    assert c.rope_base_for(0) == 10000.0 and c.rope_base_for(1) == 1e6


def test_gemma3_needs_its_norms(tmp_path: Path) -> None:
    sliding = {"gemma3.attention.sliding_window": (16, VT.UINT32)}
    path = write_tiny_model(
        tmp_path / "g.gguf",
        arch="gemma3",
        extra_kv=sliding,
        omit_tensors=["blk.0.post_ffw_norm.weight"],
    )
    assert "missing tensor 'blk.0.post_ffw_norm.weight'" in config_error(path)


def test_gemma3_needs_a_sliding_window(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "g.gguf", arch="gemma3")
    assert "missing required key 'gemma3.attention.sliding_window'" in config_error(path)


# -- errors ------------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", arch="mamba")
    assert "unsupported architecture 'mamba' (supported: gemma3, llama, qwen2)" in config_error(
        path
    )


@pytest.mark.parametrize(
    "key",
    [
        "llama.block_count",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",
    ],
)
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", omit_keys=[key])
    assert f"missing required key '{key}'" in config_error(path)


def test_optional_keys_have_defaults(tmp_path: Path) -> None:
    omit = ["llama.attention.head_count_kv", "llama.rope.freq_base", "general.name"]
    path = write_tiny_model(tmp_path / "m.gguf", n_head_kv=4, omit_keys=omit)
    c = config_of(path)
    assert c.n_head_kv == 4 and c.rope_base == 10000.0 and c.name == "m"


def test_vocab_size_without_tokenizer(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", omit_keys=["tokenizer.ggml.tokens"])
    assert config_of(path).n_vocab == 16


def test_key_of_wrong_type(tmp_path: Path) -> None:
    extra = {"llama.block_count": ("two", VT.STRING)}
    path = write_tiny_model(tmp_path / "m.gguf", extra_kv=extra)
    assert "key 'llama.block_count' has type STRING, expected int" in config_error(path)


def test_missing_tensor(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", omit_tensors=["blk.1.ffn_up.weight"])
    assert "missing tensor 'blk.1.ffn_up.weight'" in config_error(path)


def test_tensor_of_wrong_shape(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", shape_overrides={"blk.0.attn_k.weight": (32, 32)})
    assert "tensor 'blk.0.attn_k.weight' has shape [32, 32], expected [32, 16]" in config_error(
        path
    )


def test_more_layers_than_tensors(tmp_path: Path) -> None:
    extra = {"llama.block_count": (2**31, VT.UINT32)}
    path = write_tiny_model(tmp_path / "m.gguf", extra_kv=extra)
    assert "block count 2147483648 exceeds the file's 20 tensors" in config_error(path)
    extra = {"llama.block_count": (3, VT.UINT32)}
    path = write_tiny_model(tmp_path / "m3.gguf", extra_kv=extra)
    assert "missing tensor 'blk.2.attn_norm.weight'" in config_error(path)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"llama.attention.head_count": (0, VT.UINT32)}, "must be positive"),
        ({"llama.rope.freq_base": (float("nan"), VT.FLOAT32)}, "rope_base"),
        ({"llama.attention.layer_norm_rms_epsilon": (-1.0, VT.FLOAT32)}, "norm_eps"),
        ({"llama.rope.dimension_count": (7, VT.UINT32)}, "n_rot 7"),
        ({"llama.rope.scaling.type": ("yarn", VT.STRING)}, "rope scaling 'yarn'"),
        ({"llama.expert_count": (8, VT.UINT32)}, "mixture-of-experts"),
        ({"llama.attention.value_length": (4, VT.UINT32)}, "value length"),
    ],
)
def test_invalid_hyperparameters(tmp_path: Path, extra: dict[str, Any], fragment: str) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", extra_kv=extra)
    assert fragment in config_error(path)


def test_heads_not_grouped_evenly(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", n_head_kv=3)
    assert "invalid model config: n_head 4 is not a multiple of n_head_kv 3" in config_error(path)


# -- ModelConfig checks itself -------------------------------------------------------------


@pytest.fixture
def base_config(tmp_path: Path) -> ModelConfig:
    return config_of(write_tiny_model(tmp_path / "m.gguf"))


@pytest.mark.parametrize(
    "change",
    [
        {"n_layer": 0},
        {"n_head": 3},
        {"n_embd": True},
        {"head_dim": 2.0},
        {"rope_type": "glm"},
        {"activation": "relu"},
        {"attn_scale": 0.0},
        {"norm_eps": float("inf")},
        {"rope_base_local": -1.0},
        {"layer_sliding": (False,)},
        {"layer_sliding": [False, False]},
        {"layer_sliding": (True, False)},  # sliding without a window
        {"sliding_window": 16},  # a window but nothing slides
        {"layer_sliding": (True, False), "sliding_window": 0},
        {"n_rot": 9},
    ],
)
def test_model_config_rejects(base_config: ModelConfig, change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(base_config, **change)


def test_model_config_is_frozen(base_config: ModelConfig) -> None:
    with pytest.raises(AttributeError):
        base_config.n_layer = 3  # type: ignore[misc]


def test_opening_and_config_stay_light() -> None:
    # `llmapp show` and the store open files without the kernels, torch or the oracle loading.
    code = (
        "import sys\n"
        "from llmapp.runtime.execution.models import load_config\n"
        "from llmapp.runtime.files.gguf_file import GGUFFile\n"
        "print(sorted(m for m in ('numba', 'gguf', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the real models ------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_config(smollm2_path: Path) -> None:
    c = read_config(smollm2_path)
    assert c.arch == "llama" and c.rope_type == "normal" and c.tied_embeddings
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.n_ff, c.n_vocab, c.context_length, c.rope_base) == (1536, 49152, 8192, 100000.0)
    assert not c.has_qkv_bias and not any(c.layer_sliding)
    assert c.tensor_type_counts == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


@pytest.mark.real_model
def test_qwen2_config(qwen2_path: Path) -> None:
    c = read_config(qwen2_path)
    assert c.arch == "qwen2" and c.rope_type == "neox" and c.has_qkv_bias
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == (24, 896, 14, 2, 64)
    assert (c.n_ff, c.n_vocab, c.context_length, c.rope_base) == (4864, 151936, 32768, 1e6)
    assert not c.tied_embeddings and c.file_type == 15
    assert c.tensor_type_counts == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q4_K": 12, "Q6_K": 12}


@pytest.mark.real_model
def test_gemma3_config(gemma3_path: Path) -> None:
    c = read_config(gemma3_path)
    assert c.arch == "gemma3" and c.rope_type == "neox" and c.tied_embeddings
    assert (c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim) == (18, 640, 4, 1, 256)
    assert (c.n_ff, c.n_vocab, c.context_length, c.n_rot) == (2048, 262144, 32768, 256)
    assert c.sliding_window == 512
    assert c.layer_sliding == tuple(il % 6 < 5 for il in range(18))
    assert c.rope_base_local == 10000.0 and c.rope_base == 1e6
    assert c.rope_base_for(0) == 10000.0 and c.rope_base_for(5) == 1e6
    assert c.embed_scale == pytest.approx(math.sqrt(640)) and c.attn_scale == 1 / 16
    assert c.has_qk_norm and c.has_post_norms and c.activation == "gelu_tanh"
