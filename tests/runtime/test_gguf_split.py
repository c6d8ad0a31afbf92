"""Split models (llama.cpp's gguf-split: NAME-0000k-of-0000N.gguf) open and run as one file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_model import write_chat_model

from llmapp.runtime import Engine, EngineOptions, RunnerOptions, SamplingParams
from llmapp.runtime.errors import GGUFError
from llmapp.runtime.files.gguf_file import GGUFFile


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("split")
    whole = write_chat_model(root / "tiny.gguf")
    (root / "parts").mkdir()
    first = write_chat_model(root / "parts" / "tiny.gguf", split_max_tensors=7)
    return whole, first


def test_the_files_read_as_one(models: tuple[Path, Path]) -> None:
    whole, first = models
    assert first.name == "tiny-00001-of-00003.gguf"
    with GGUFFile(whole) as one, GGUFFile(first) as split:
        assert len(split.files) == 3 and split.files[0] == first
        assert split.tensors.keys() == one.tensors.keys()
        assert {t.shard for t in split.tensors.values()} == {0, 1, 2}
        for name in one.tensors:
            assert np.array_equal(split.tensor_data(name), one.tensor_data(name)), name
        assert (
            split.metadata["tokenizer.ggml.tokens"][:5] == one.metadata["tokenizer.ggml.tokens"][:5]
        )


def test_a_split_model_generates_what_the_whole_file_does(models: tuple[Path, Path]) -> None:
    params = SamplingParams(temperature=0, max_tokens=12)
    opts = EngineOptions(runner=RunnerOptions(ctx_size=256, n_threads=1))
    outputs = []
    for path in models:
        with Engine(path, opts) as engine:
            outputs.append(engine.generate("hello world", params)[1])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 12


def test_missing_or_wrong_shards_are_named(models: tuple[Path, Path], tmp_path: Path) -> None:
    _, first = models
    for part in first.parent.glob("*.gguf"):
        shutil.copy(part, tmp_path / part.name)
    (tmp_path / "tiny-00002-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match="tiny-00002-of-00003.gguf: no such file"):
        GGUFFile(tmp_path / first.name)
    shutil.copy(tmp_path / "tiny-00003-of-00003.gguf", tmp_path / "tiny-00002-of-00003.gguf")
    with pytest.raises(GGUFError, match="split.no is 2, expected 1"):
        GGUFFile(tmp_path / first.name)
    with pytest.raises(GGUFError, match="not the first file"):
        GGUFFile(tmp_path / "tiny-00003-of-00003.gguf")
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(first, renamed)
    with pytest.raises(GGUFError, match="needs the name"):
        GGUFFile(renamed)
