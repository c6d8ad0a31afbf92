"""Loading keeps the file's map out of resident memory: once the weights are packed, the pages of
the GGUF map are dropped (per block while loading, the embedding's after every step), and the
CPU path never imports torch. Memory itself is measured by benchmarks/bench_speed.py; these are
cheap guards that the releases happen at all."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_model import write_chat_model

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.files.gguf_file import GGUFFile

MB = 1 << 20

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="resident pages are read from /proc"
)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~20 MB of float32 weights: big enough that a map left resident shows."""
    path = tmp_path_factory.mktemp("wide") / "wide.gguf"
    return write_chat_model(path, n_layer=2, n_embd=512, n_ff=1024)


def test_release_pages_drops_a_tensor_or_the_whole_map(wide_model: Path) -> None:
    with GGUFFile(wide_model) as g:
        names = [n for n, t in g.tensors.items() if len(t.shape) == 2]
        for name in names:
            int(g.tensor_data(name).sum())  # fault every page in
        everything = g.resident_bytes()
        assert everything is not None and everything > 16 * MB
        biggest = max(names, key=lambda n: g.tensors[n].n_bytes)
        g.release_pages([biggest])
        after_one = g.resident_bytes()
        assert after_one is not None
        assert after_one <= everything - g.tensors[biggest].n_bytes + 8192
        g.release_pages()
        assert g.resident_bytes() == 0
        # The map stays valid: a dropped page reads back the same bytes.
        assert int(g.tensor_data(biggest).sum()) > 0


def test_releasing_pages_drops_what_a_long_read_touched(wide_model: Path) -> None:
    with GGUFFile(wide_model) as g:
        names = [n for n, t in g.tensors.items() if len(t.shape) == 2]
        with g.releasing_pages(every_s=0.01):
            for name in names:
                int(g.tensor_data(name).sum())
            time.sleep(0.1)  # the releasing thread has run since the last read
            resident = g.resident_bytes()
            assert resident is not None and resident < MB
        assert g.resident_bytes() == 0


def test_release_pages_after_close_is_a_no_op(wide_model: Path) -> None:
    g = GGUFFile(wide_model)
    g.close()
    g.release_pages()
    g.release_pages(["token_embd.weight"])


def test_loaded_runner_keeps_little_of_the_map_resident(wide_model: Path) -> None:
    runner = ModelRunner(wide_model, RunnerOptions(ctx_size=64, n_threads=1))
    file_bytes = wide_model.stat().st_size
    assert file_bytes > 16 * MB
    resident = runner.gguf.resident_bytes()
    assert resident is not None and resident < MB
    ids = [5, 300, 301, 302]
    logits = runner.forward(build_batch([(ids, 0, [0, 1, 2, 3], 1)], runner.block_size))
    assert np.isfinite(logits).all()
    resident = runner.gguf.resident_bytes()
    assert resident is not None and resident < MB  # the looked-up rows were dropped again


def test_the_cpu_path_never_imports_torch(wide_model: Path) -> None:
    script = (
        "import sys\n"
        "from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions\n"
        f"ModelRunner({str(wide_model)!r}, RunnerOptions(ctx_size=64, n_threads=1))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.real_model
def test_real_model_map_is_released_after_load(real_model_path: Path) -> None:
    runner = ModelRunner(real_model_path, RunnerOptions(ctx_size=256, n_threads=2))
    ids = list(range(100, 164))
    runner.forward(build_batch([(ids, 0, [0, 1, 2, 3], 1)], runner.block_size))
    resident = runner.gguf.resident_bytes()
    assert resident is not None and resident < 4 * MB


def test_the_heap_policy_is_harmless_to_set_again() -> None:
    # The CLI sets it once per process and a model's load settles it; its effect on peak RSS
    # is measured by benchmarks/bench_speed.py --memory-only. Either call again is harmless.
    import numpy as np

    from llmapp.runtime.execution.heap import return_large_allocations, settle_after_load

    return_large_allocations()
    return_large_allocations()
    assert float(np.ones(4 << 20, np.float32).sum()) == 4 << 20  # 16 MiB, mapped and freed
    settle_after_load()
    settle_after_load()
    assert float(np.ones(4 << 20, np.float32).sum()) == 4 << 20
