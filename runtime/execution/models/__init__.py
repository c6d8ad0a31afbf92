"""One module per architecture, registered by its `general.architecture` name.

`load_config` picks the module by the file's architecture (config.py holds only the types and
the shared readers, so nothing imports upward). Each module exports `ARCH` and
`config_from_gguf(gguf) -> ModelConfig` (its forward pass sits below the config code).
Opening a file imports every module listed here, so they must not import kernels or other
heavy packages at module level.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.config import ModelConfig
from llmapp.runtime.execution.models import gemma3, llama, qwen2
from llmapp.runtime.files.gguf_file import GGUFFile

ARCHITECTURES: dict[str, ModuleType] = {m.ARCH: m for m in (llama, qwen2, gemma3)}


def load_config(gguf: GGUFFile) -> ModelConfig:
    """The checked config of an opened GGUF file; GGUFError when it is not a model we run."""
    arch = gguf.require("general.architecture", str)
    module = ARCHITECTURES.get(arch)
    if module is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise GGUFError(gguf.path, f"unsupported architecture {arch!r} (supported: {supported})")
    config: ModelConfig = module.config_from_gguf(gguf)
    return config


def read_config(path: str | Path) -> ModelConfig:
    """Open, read the config, close: for callers that need only the metadata."""
    with GGUFFile(path) as gguf:
        return load_config(gguf)
