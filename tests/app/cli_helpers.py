"""What the CLI's subprocess tests share: how to start `llmapp`, and the files they feed it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import ModuleType

from bench_loader import load_benchmark


def _command() -> list[str]:
    exe = shutil.which("llmapp")
    return [exe] if exe else [sys.executable, "-m", "llmapp.app.cli"]


def bench_quantize() -> ModuleType:
    """benchmarks/bench_quantize.py, which writes synthetic F32 models."""
    return load_benchmark("bench_quantize")


LLMAPP = _command()
README = Path(__file__).resolve().parents[2] / "README.md"
