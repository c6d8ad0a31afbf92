"""Benchmark scripts as modules, for tests that share their helpers (benchmarks/ is no package).

A module of its own, not conftest.py: several conftest files share that module name, so an
import from one of them can find another.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_benchmark(name: str) -> ModuleType:
    """A script under benchmarks/ as a module (tests share its helpers; it is no package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
