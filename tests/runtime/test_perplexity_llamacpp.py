"""`llmapp perplexity` lands within 1% of llama.cpp's figure on the same text, computed live.

llama.cpp's side follows its perplexity tool (tools/perplexity): BOS-aware tokenization of the
whole text, chunks of ctx tokens each evaluated from an empty cache with its first token set
to BOS when the model adds one, and the second half of each chunk scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmapp.app.cli import main
from llmapp.runtime.perplexity import log_softmax_at

pytestmark = [pytest.mark.real_model, pytest.mark.peer]

TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")
CTX = 256
CHUNKS = 6


def peer_perplexity(path: Path, text: str) -> float:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm: Any = llama_cpp.Llama(
        model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=2, verbose=False
    )
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    add_bos = llm._model.add_bos_token()
    first = CTX // 2
    nll, count = 0.0, 0
    for i in range(min(CHUNKS, len(tokens) // CTX)):
        chunk = tokens[i * CTX : (i + 1) * CTX]
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[first : CTX - 1], dtype=np.float32)
        targets = np.asarray(chunk[first + 1 :], dtype=np.int64)
        nll -= float(log_softmax_at(logits, targets).sum())
        count += len(targets)
    return float(np.exp(nll / count))


@pytest.fixture(scope="module")
def text() -> str:
    if not TEXT_FILE.exists():
        pytest.skip(f"{TEXT_FILE} is not on this machine")
    return TEXT_FILE.read_text()


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path", "qwen2_path"])
def test_perplexity_within_one_percent(
    fixture: str, text: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    path: Path = request.getfixturevalue(fixture)
    argv = ["perplexity", str(path), str(TEXT_FILE), "--ctx", str(CTX)]
    assert main([*argv, "--chunks", str(CHUNKS), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert set(ours) == {"ppl", "tokens", "chunks"}
    assert ours["chunks"] == CHUNKS
    peer = peer_perplexity(path, text)
    assert abs(ours["ppl"] / peer - 1) < 0.01, (ours["ppl"], peer)
