"""Speed and memory against llama.cpp, side by side in one run (the README's benchmark table).

For each model: prefill and decode tokens/s for us and for llama.cpp (llama-cpp-python, same
thread count, medians); the bytes one decode step reads (packed weights with the output head,
plus the K/V at the benchmark's mean decode context) and decode as a fraction of the
memory-bandwidth limit (measured read bandwidth / those bytes); the peak resident memory of a
whole `llmapp run MODEL hi --max-tokens 32 --ctx-size 2048` process (load included, as
`/usr/bin/time -f %M` reports it) against the budget 1.1 x file + KV cache + 200 MB and against
llama.cpp's peak for the same run; where that memory goes (--breakdown); warm start to the
first token of a 16-token prompt, and the first-ever compile time (an empty Numba cache).

    python benchmarks/bench_speed.py [MODEL ...] [--threads 2] [--repeats 3] [--json]
    python benchmarks/bench_speed.py [MODEL ...] --memory-only [--breakdown]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmapp.runtime.bench import (
    DECODE_PROMPT,
    MB,
    RUN_CTX,
    RUN_TOKENS,
    OurBench,
    PeerBench,
    decode_read_bytes,
    memory_budget,
    our_run_argv,
    peak_rss,
    peer_run_argv,
    run_bench,
)
from llmapp.runtime.core.kv_cache import DEFAULT_CACHE_TYPE, kv_bytes_per_token
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.execution.models import load_config
from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.files.store import resolve_model

MODELS = ["smollm2:135m", "gemma3:270m", "qwen2.5-coder:0.5b"]
PROMPT_16 = "Write a short poem about the sea, the wind, and the light of early morning."
N_GEN = 64
# Where a run's memory goes: the same load and generation as `llmapp run`, in stages.
BREAKDOWN_SCRIPT = """
import json, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
stages = {"python": status()}
import numpy, numba, llvmlite
stages["numpy+numba+llvmlite"] = status()
from llmapp.runtime.bench import decode_read_bytes
from llmapp.runtime.core.engine import Engine, EngineOptions
from llmapp.runtime.core.sampling import SamplingParams
from llmapp.runtime.execution.model_runner import RunnerOptions
stages["llmapp imports"] = status()
path, ctx, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
opts = EngineOptions(runner=RunnerOptions(ctx_size=ctx, n_threads=threads))
with Engine(path, opts) as engine:
    runner = engine.runner
    stages["loaded (runner + tokenizer)"] = status()
    loaded_map = runner.gguf.resident_bytes()
    engine.generate("hi", SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    stages["generated"] = status()
    parts = {
        "packed_weights": decode_read_bytes(runner, 0)["weights"],
        "kv_allocated": runner.kv_bytes,
        "map_resident_after_load": loaded_map,
        "map_resident_after_generate": runner.gguf.resident_bytes(),
        "torch_imported": "torch" in sys.modules,
    }
print(json.dumps({"stages": stages, "parts": parts}))
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


def peak_memory(model: str, path: Path, threads: int, kv_bytes: int) -> dict[str, Any]:
    """Peak RSS of a whole `llmapp run` and of llama.cpp's same run (when installed), MB."""
    ours = peak_rss(our_run_argv(model, threads))
    out: dict[str, Any] = {
        "run_peak_rss_mb": ours / MB,
        "run_kv_mb": kv_bytes / MB,
        "budget_mb": memory_budget(path.stat().st_size, kv_bytes) / MB,
        "file_mb": path.stat().st_size / MB,
    }
    out["run_peak_over_budget"] = out["run_peak_rss_mb"] / out["budget_mb"]
    if importlib.util.find_spec("llama_cpp") is not None:
        peer = peak_rss(peer_run_argv(path, threads))
        out["peer_run_peak_rss_mb"] = peer / MB
        out["run_peak_vs_peer"] = ours / peer
    return out


def breakdown(path: Path, threads: int) -> dict[str, Any]:
    """Resident memory of a run by stage and by part (BREAKDOWN_SCRIPT), bytes."""
    argv = [sys.executable, "-c", BREAKDOWN_SCRIPT, str(path), str(RUN_CTX), str(threads)]
    out = subprocess.run(argv + [str(RUN_TOKENS)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_kv_bytes(path: Path) -> int:
    """The KV cache a RUN_CTX run allocates (the default cache type), from the config alone."""
    with GGUFFile(path) as gguf:
        cfg = load_config(gguf)
    per_token = kv_bytes_per_token(cfg.n_layer, cfg.n_head_kv, cfg.head_dim, DEFAULT_CACHE_TYPE)
    return per_token * RUN_CTX


def memory_row(model: str, threads: int, with_breakdown: bool) -> dict[str, Any]:
    path = resolve_model(model)
    row: dict[str, Any] = {"model": model}
    row.update(peak_memory(model, path, threads, run_kv_bytes(path)))
    if with_breakdown:
        row["breakdown"] = breakdown(path, threads)
    return row


def bench_model(
    model: str, threads: int, repeats: int, bandwidth: float, with_breakdown: bool
) -> dict[str, Any]:
    path = resolve_model(model)
    runner = ModelRunner(path, RunnerOptions(ctx_size=1024, n_threads=threads))
    ours = run_bench(OurBench(runner), [128, 512], N_GEN, repeats)
    # Decode runs from position DECODE_PROMPT to DECODE_PROMPT + N_GEN: its mean context.
    read = decode_read_bytes(runner, DECODE_PROMPT + N_GEN // 2)
    del runner
    peer = run_bench(PeerBench(path, threads, 1024), [128, 512], N_GEN, repeats)
    limit = bandwidth * 1e9 / read["total"]
    return {
        "model": model,
        "ours": ours.as_dict(),
        "peer": peer.as_dict(),
        "decode_ratio": ours.decode_tps / peer.decode_tps,
        "prefill_512_ratio": ours.prefill_tps["512"] / peer.prefill_tps["512"],
        "prefill_128_ratio": ours.prefill_tps["128"] / peer.prefill_tps["128"],
        "read_mb_per_token": read["total"] / MB,
        "read_weights_mb_per_token": read["weights"] / MB,
        "read_kv_mb_per_token": read["kv"] / MB,
        "bandwidth_limit_tps": limit,
        "decode_fraction_of_limit": ours.decode_tps / limit,
        **memory_row(model, threads, with_breakdown),
        **start_times(model, threads),
    }


def _peer_peak(r: dict[str, Any]) -> str:
    if "peer_run_peak_rss_mb" not in r:
        return "-"
    return f"{r['peer_run_peak_rss_mb']:.0f} ({r['run_peak_vs_peer']:.2f}x)"


def speed_table(rows: list[dict[str, Any]], bandwidth: float, threads: int) -> str:
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {threads} threads, read bandwidth {bandwidth:.1f} GB/s",
        "",
        "| model | decode t/s (llama.cpp) | ratio | prefill 512 t/s (llama.cpp) | ratio "
        "| read per token MB (weights + KV) | decode / bandwidth limit | warm start s "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, p = r["ours"], r["peer"]
        lines.append(
            f"| {r['model']} | {o['decode_tps']:.1f} ({p['decode_tps']:.1f}) "
            f"| {r['decode_ratio']:.2f} | {o['prefill_tps']['512']:.0f} "
            f"({p['prefill_tps']['512']:.0f}) | {r['prefill_512_ratio']:.2f} "
            f"| {r['read_mb_per_token']:.1f} ({r['read_weights_mb_per_token']:.1f} + "
            f"{r['read_kv_mb_per_token']:.1f}) "
            f"| {r['decode_fraction_of_limit']:.2f} of {r['bandwidth_limit_tps']:.0f} t/s "
            f"| {r['warm_start_s']:.2f} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Peak RSS of `llmapp run MODEL hi --max-tokens {RUN_TOKENS} --ctx-size {RUN_CTX}` "
        "(load included); budget = 1.1 x file + KV cache + 200 MB",
        "",
        "| model | file MB | KV MB | peak RSS MB | budget MB | peak / budget "
        "| llama.cpp peak MB (ours / it) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['file_mb']:.0f} | {r['run_kv_mb']:.0f} "
            f"| {r['run_peak_rss_mb']:.0f} | {r['budget_mb']:.0f} "
            f"| {r['run_peak_over_budget']:.2f} | {_peer_peak(r)} |"
        )
    for r in rows:
        if "breakdown" in r:
            lines += ["", *breakdown_lines(r["model"], r["breakdown"])]
    return "\n".join(lines)


def breakdown_lines(model: str, b: dict[str, Any]) -> list[str]:
    lines = [f"{model}: stage: RSS (peak so far; anon + file) MB"]
    for stage, s in b["stages"].items():
        lines.append(
            f"  {stage:28s} {s['VmRSS'] / MB:7.1f} ({s['VmHWM'] / MB:7.1f}; "
            f"{s['RssAnon'] / MB:7.1f} + {s['RssFile'] / MB:6.1f})"
        )
    parts = b["parts"]
    lines.append(
        "  parts: packed weights {:.1f}, KV allocated {:.1f}, map resident after load {:.1f} / "
        "after generating {:.1f} MB; torch imported: {}".format(
            parts["packed_weights"] / MB,
            parts["kv_allocated"] / MB,
            (parts["map_resident_after_load"] or 0) / MB,
            (parts["map_resident_after_generate"] or 0) / MB,
            parts["torch_imported"],
        )
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the peak RSS figures")
    parser.add_argument("--breakdown", action="store_true", help="where a run's memory goes")
    args = parser.parse_args()
    if args.memory_only:
        rows = [memory_row(m, args.threads, args.breakdown) for m in args.models]
        print(json.dumps({"models": rows}) if args.json else memory_table(rows))
        return
    bandwidth = read_bandwidth(args.threads)
    rows = [
        bench_model(m, args.threads, args.repeats, bandwidth, args.breakdown) for m in args.models
    ]
    if args.json:
        print(json.dumps({"threads": args.threads, "bandwidth_gbs": bandwidth, "models": rows}))
    else:
        print(speed_table(rows, bandwidth, args.threads))
        print()
        print(memory_table(rows))


if __name__ == "__main__":
    main()
