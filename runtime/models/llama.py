"""Llama architecture (SmolLM2 and friends)."""

from __future__ import annotations

from ..config import ModelConfig, build_config, check_tensors, read_hparams, standard_tensor_shapes
from ..errors import GGUFError
from ..gguf_file import GGUFFile

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
