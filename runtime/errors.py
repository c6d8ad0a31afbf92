"""Errors llmapp reports to users: one line naming what is wrong, never a traceback."""

from __future__ import annotations

from pathlib import Path


class LlmappError(Exception):
    """Base of every error a front end shows as one line and a non-zero exit."""


class GGUFError(LlmappError):
    """A GGUF file is unreadable or holds something we cannot run."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ModelNotFoundError(LlmappError):
    """A model name is neither a catalog entry nor an existing file."""


class StoreError(LlmappError):
    """Pulling, verifying or placing a model in the store failed."""


class TokenizerError(LlmappError):
    """The tokenizer metadata is missing or inconsistent."""


class TemplateError(LlmappError):
    """A chat template failed to render (or tried something the sandbox forbids)."""
