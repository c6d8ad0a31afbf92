"""The runtime's public API: `from llmapp.runtime import Engine, EngineOptions, SamplingParams`.

Names are resolved on first use (a module __getattr__), so importing a light submodule such
as llmapp.runtime.gguf_file does not pull in numpy, numba or the kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmapp.runtime.engine import (
        Delta,
        Engine,
        EngineOptions,
        RequestError,
        RequestStream,
        Timings,
        TokenLogprob,
        Usage,
    )
    from llmapp.runtime.model_runner import RunnerOptions
    from llmapp.runtime.sampling import SamplingParams

_EXPORTS = {
    "Delta": "llmapp.runtime.engine",
    "Engine": "llmapp.runtime.engine",
    "EngineOptions": "llmapp.runtime.engine",
    "RequestError": "llmapp.runtime.engine",
    "RequestStream": "llmapp.runtime.engine",
    "Timings": "llmapp.runtime.engine",
    "TokenLogprob": "llmapp.runtime.engine",
    "Usage": "llmapp.runtime.engine",
    "RunnerOptions": "llmapp.runtime.model_runner",
    "SamplingParams": "llmapp.runtime.sampling",
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
        # AttributeError lets `from llmapp.runtime import store` fall back to the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
