"""Session fixtures: real models come through the store, exactly as a user's would."""

from __future__ import annotations

from pathlib import Path

import pytest


def _real_model(name: str) -> Path:
    from llmapp.runtime.files.store import resolve_model

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
