"""The forward pass against llama.cpp itself, live, on the real models.

Teacher-forced on llama.cpp's own greedy continuations: our argmax must equal llama.cpp's at
>= 99% of the "clear" positions (llama.cpp's top-1 logit beats its top-2 by >= 0.5), our
logits must be close in value too (median over positions of max |ours - llama.cpp| below half
a standard deviation of llama.cpp's logits; measured 0.13-0.33), and our own greedy
continuation must equal llama.cpp's up to its first position that is not clear. One prompt
runs past 512 tokens: past Gemma 3's sliding window, and into several KV blocks per layer.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.core.kv_cache import KVCacheManager, SequenceBlocks
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions

pytestmark = [pytest.mark.real_model, pytest.mark.peer]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "Water boils at a temperature of",
    "import numpy as np\n\n# compute the mean of a list\n",
    "Translate to French: The weather is nice today and we are going to the beach.\nFrench:",
    "Q: What is 12 times 7?\nA:",
    "<html>\n  <head>\n    <title>",
    "Die Hauptstadt von Deutschland ist",
    # ~800 tokens of English prose and code (the standard library's textwrap module)
    Path(textwrap.__file__).read_text()[:3200],
]
LONG_PAST = 512  # the long prompt's positions past this (Gemma 3's window) are checked alone
N_GEN = 32
CLEAR_MARGIN = 0.5
MAX_MEDIAN_DIFF = 0.5  # in standard deviations of llama.cpp's logits at the position


def margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


class PeerRun:
    """llama.cpp's tokens, greedy continuation and all-position logits for one prompt."""

    def __init__(self, llm: Any, prompt: str) -> None:
        self.prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(self.prompt_ids)
        gen: list[int] = []
        for _ in range(N_GEN):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            gen.append(token)
            llm.eval([token])
        self.gen_ids = gen
        self.ids = self.prompt_ids + gen
        # logits at every position of prompt + continuation (the last one is never needed)
        self.logits = np.array(llm.scores[: len(self.ids) - 1], dtype=np.float32)


def peer_runs(path: Path) -> list[PeerRun]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=1024, logits_all=True, n_threads=2, verbose=False
    )
    return [PeerRun(llm, p) for p in PROMPTS]


def our_logits(runner: ModelRunner, ids: list[int]) -> np.ndarray:
    kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_cache=False)
    seq = SequenceBlocks()
    kv.allocate(seq, len(ids))
    try:
        n = len(ids) - 1
        return runner.forward(build_batch([(ids[:n], 0, seq.block_table, n)], runner.block_size))
    finally:
        kv.free(seq)


def our_greedy(runner: ModelRunner, prompt_ids: list[int], n: int) -> list[int]:
    kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_cache=False)
    seq = SequenceBlocks()
    ids = list(prompt_ids)
    kv.allocate(seq, len(ids) + n)
    done = 0
    try:
        for _ in range(n):
            batch = build_batch([(ids, done, seq.block_table, 1)], runner.block_size)
            logits = runner.forward(batch)
            done = len(ids)
            ids.append(int(np.argmax(logits[0])))
    finally:
        kv.free(seq)
    return ids[len(prompt_ids) :]


def check_against_peer(path: Path) -> None:
    runs = peer_runs(path)
    runner = ModelRunner(path, RunnerOptions(ctx_size=1024))
    clear_total = clear_agree = positions = 0
    for run in runs:
        ours = our_logits(runner, run.ids)
        clear = margins(run.logits) >= CLEAR_MARGIN
        agree = ours.argmax(axis=1) == run.logits.argmax(axis=1)
        clear_total += int(clear.sum())
        clear_agree += int((agree & clear).sum())
        positions += len(clear)
        diff = np.abs(ours - run.logits).max(axis=1) / run.logits.std(axis=1)
        assert np.median(diff) < MAX_MEDIAN_DIFF, f"logits differ for {run.ids[:8]}: {diff}"
        if len(run.ids) > 2 * LONG_PAST:
            late = clear[LONG_PAST:]
            assert late.sum() > 100
            assert (agree[LONG_PAST:] & late).sum() >= 0.99 * late.sum()
        # greedy continuation: identical up to the first position llama.cpp is unsure of
        gen_margins = margins(run.logits[len(run.prompt_ids) - 1 :])
        unclear = np.flatnonzero(gen_margins < CLEAR_MARGIN)
        upto = int(unclear[0]) if len(unclear) else N_GEN
        mine = our_greedy(runner, run.prompt_ids, N_GEN)
        assert mine[:upto] == run.gen_ids[:upto], f"greedy continuation differs for {run.ids[:8]}"
    assert positions > 1000 and clear_total > 0.6 * positions
    assert clear_agree / clear_total >= 0.99, f"{clear_agree}/{clear_total} clear positions agree"


def test_smollm2_matches_llamacpp(smollm2_path: Path) -> None:
    check_against_peer(smollm2_path)


def test_gemma3_matches_llamacpp(gemma3_path: Path) -> None:
    check_against_peer(gemma3_path)


def test_qwen2_matches_llamacpp(qwen2_path: Path) -> None:
    check_against_peer(qwen2_path)


def test_our_q2_k_file_matches_llamacpp(qwen2_path: Path, tmp_path_factory: Any) -> None:
    from llmapp.runtime.files.quantize import quantize_file

    out = tmp_path_factory.mktemp("q2k") / "qwen2.5-coder-0.5b-q2_k.gguf"
    quantize_file(qwen2_path, out, "Q2_K", allow_requantize=True)
    check_against_peer(out)
