"""The runtime's public API: `from llmapp.runtime import Engine, EngineOptions, SamplingParams`.

Names are resolved on first use (a module __getattr__), so importing a light submodule such
as llmapp.runtime.files.gguf_file does not pull in numpy, numba or the kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmapp.runtime.core.engine import (
        Delta,
        Engine,
        EngineOptions,
        RequestError,
        RequestStream,
        Timings,
        TokenLogprob,
        Usage,
    )
    from llmapp.runtime.core.sampling import SamplingParams
    from llmapp.runtime.execution.model_runner import RunnerOptions

_EXPORTS = {
    "Delta": "llmapp.runtime.core.engine",
    "Engine": "llmapp.runtime.core.engine",
    "EngineOptions": "llmapp.runtime.core.engine",
    "RequestError": "llmapp.runtime.core.engine",
    "RequestStream": "llmapp.runtime.core.engine",
    "Timings": "llmapp.runtime.core.engine",
    "TokenLogprob": "llmapp.runtime.core.engine",
    "Usage": "llmapp.runtime.core.engine",
    "RunnerOptions": "llmapp.runtime.execution.model_runner",
    "SamplingParams": "llmapp.runtime.core.sampling",
}

__all__ = [
    "Delta",
    "Engine",
    "EngineOptions",
    "RequestError",
    "RequestStream",
    "RunnerOptions",
    "SamplingParams",
    "Timings",
    "TokenLogprob",
    "Usage",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # AttributeError lets `from llmapp.runtime import core` fall back to the subpackage.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
