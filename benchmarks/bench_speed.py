"""Speed and memory against llama.cpp, side by side in one run (the README's benchmark table).

For each model: prefill and decode tokens/s for us and for llama.cpp (llama-cpp-python, same
thread count, medians), decode as a fraction of the memory-bandwidth limit (packed bytes read
per token / measured read bandwidth), resident memory while generating against the budget
1.5 x file + KV cache + 250 MB, warm start to the first token of a 16-token prompt, and the
first-ever compile time (an empty Numba cache).

    python benchmarks/bench_speed.py [MODEL ...] [--threads 2] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmapp.runtime.bench import OurBench, PeerBench, run_bench
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.files.store import resolve_model

MODELS = ["smollm2:135m", "gemma3:270m", "qwen2.5-coder:0.5b"]
PROMPT_16 = "Write a short poem about the sea, the wind, and the light of early morning."
GEN_SCRIPT = """
import sys
from llmapp.runtime.core.engine import Engine, EngineOptions
from llmapp.runtime.execution.model_runner import RunnerOptions
from llmapp.runtime.core.sampling import SamplingParams
opts = EngineOptions(runner=RunnerOptions(ctx_size=int(sys.argv[2]), n_threads=int(sys.argv[3])))
with Engine(sys.argv[1], opts) as e:
    e.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
    kv = e.runner.kv_bytes
for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):  # resident while generating (the load-time peak is gone)
        print(int(line.split()[1]) * 1024, kv)
"""


def read_bandwidth(n_threads: int) -> float:
    """GB/s of a parallel streaming read over 1 GiB (best of 5)."""
    import numba

    from llmapp.kernels_cpu import threads

    threads.set_num_threads(n_threads)

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def total(a: np.ndarray) -> float:
        s = 0.0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    data = np.ones(1 << 27, dtype=np.float64)  # 1 GiB
    total(data[:1024])
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        total(data)
        best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def packed_bytes_per_token(runner: ModelRunner) -> int:
    """Bytes of weights one decode step reads: every packed matrix and the output head."""
    n = 0
    for layer in runner.weights.layers:
        for value in layer.tensors():
            n += int(getattr(value, "nbytes", 0))
    return n + int(runner.weights.output.nbytes)


def subprocess_seconds(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def start_times(model: str, threads: int) -> dict[str, float]:
    argv = [sys.executable, "-m", "llmapp.app.cli", "run", model, PROMPT_16, "--raw"]
    argv += ["--max-tokens", "1", "--threads", str(threads), "--ctx-size", "512"]
    warm = min(subprocess_seconds(argv) for _ in range(3))
    with tempfile.TemporaryDirectory() as cache:
        cold = subprocess_seconds(argv, {**os.environ, "NUMBA_CACHE_DIR": cache})
    return {"warm_start_s": warm, "first_run_s": cold, "compile_s": cold - warm}


def memory(path: Path, threads: int) -> dict[str, float]:
    ctx = 4096
    out = subprocess.run(
        [sys.executable, "-c", GEN_SCRIPT, str(path), str(ctx), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    peak, kv = int(out[0]), int(out[1])
    budget = 1.5 * path.stat().st_size + kv + 250e6
    return {"peak_rss_mb": peak / 1e6, "budget_mb": budget / 1e6, "kv_mb": kv / 1e6}


def bench_model(model: str, threads: int, repeats: int, bandwidth: float) -> dict[str, Any]:
    path = resolve_model(model)
    runner = ModelRunner(path, RunnerOptions(ctx_size=1024, n_threads=threads))
    ours = run_bench(OurBench(runner), [128, 512], 64, repeats)
    bytes_per_token = packed_bytes_per_token(runner)
    del runner
    peer = run_bench(PeerBench(path, threads, 1024), [128, 512], 64, repeats)
    limit = bandwidth * 1e9 / bytes_per_token
    return {
        "model": model,
        "ours": ours.as_dict(),
        "peer": peer.as_dict(),
        "decode_ratio": ours.decode_tps / peer.decode_tps,
        "prefill_512_ratio": ours.prefill_tps["512"] / peer.prefill_tps["512"],
        "prefill_128_ratio": ours.prefill_tps["128"] / peer.prefill_tps["128"],
        "packed_mb_per_token": bytes_per_token / 1e6,
        "bandwidth_limit_tps": limit,
        "decode_fraction_of_limit": ours.decode_tps / limit,
        **memory(path, threads),
        **start_times(model, threads),
    }


def table(rows: list[dict[str, Any]], bandwidth: float, threads: int) -> str:
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {threads} threads, read bandwidth {bandwidth:.0f} GB/s",
        "",
        "| model | decode t/s (llama.cpp) | ratio | prefill 512 t/s (llama.cpp) | ratio "
        "| decode / bandwidth limit | peak RSS / budget MB | warm start s | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, p = r["ours"], r["peer"]
        lines.append(
            f"| {r['model']} | {o['decode_tps']:.1f} ({p['decode_tps']:.1f}) "
            f"| {r['decode_ratio']:.2f} | {o['prefill_tps']['512']:.0f} "
            f"({p['prefill_tps']['512']:.0f}) | {r['prefill_512_ratio']:.2f} "
            f"| {r['decode_fraction_of_limit']:.2f} of {r['bandwidth_limit_tps']:.0f} t/s "
            f"| {r['peak_rss_mb']:.0f} / {r['budget_mb']:.0f} | {r['warm_start_s']:.2f} "
            f"| {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bandwidth = read_bandwidth(args.threads)
    rows = [bench_model(m, args.threads, args.repeats, bandwidth) for m in args.models]
    if args.json:
        print(json.dumps({"threads": args.threads, "bandwidth_gbs": bandwidth, "models": rows}))
    else:
        print(table(rows, bandwidth, args.threads))


if __name__ == "__main__":
    main()
