"""Session fixtures: real models come through the store, exactly as a user's would."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def load_benchmark(name: str) -> ModuleType:
    """A script under benchmarks/ as a module (tests share its helpers; it is no package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _real_model(name: str) -> Path:
    from llmapp.runtime.store import resolve_model

    return resolve_model(name)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _real_model("smollm2:135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _real_model("gemma3:270m")


@pytest.fixture(scope="session")
def qwen2_path() -> Path:
    return _real_model("qwen2.5-coder:0.5b")


@pytest.fixture(scope="session", params=["smollm2:135m", "gemma3:270m", "qwen2.5-coder:0.5b"])
def real_model_path(request: pytest.FixtureRequest) -> Path:
    return _real_model(request.param)
