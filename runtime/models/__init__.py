"""One module per architecture, registered by its `general.architecture` name.

Each module exports `ARCH` and `config_from_gguf(gguf) -> ModelConfig` (its forward pass sits
below the config code). Opening a file imports every module listed here, so they must not
import kernels or other heavy packages at module level.
"""

from __future__ import annotations

from types import ModuleType

from . import gemma3, llama, qwen2

ARCHITECTURES: dict[str, ModuleType] = {m.ARCH: m for m in (llama, qwen2, gemma3)}
