"""Prefill and decode tokens/s by number of offloaded layers (--n-gpu-layers), on whatever
device is present: CUDA when torch sees one, else torch's CPU device standing in for a GPU
(LLMAPP_DEVICE=cpu; those figures measure the code path, not a GPU). Beside each row, llama.cpp
with the same n_gpu_layers where its build offloads to a GPU.

    python benchmarks/bench_offload.py [MODEL] [--layers 0,1,8,all] [-p 64] [-n 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from llmapp.runtime.bench import DECODE_PROMPT, OurBench, random_tokens, run_bench
from llmapp.runtime.execution.backend import make_backend
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.execution.placement import parse_n_gpu_layers
from llmapp.runtime.files.store import resolve_model


def pick_device(threads: int) -> str:
    make_backend("cpu", threads)  # kernels_cpu's OpenMP settings before torch loads its own
    import torch

    if os.environ.get("LLMAPP_DEVICE"):
        return os.environ["LLMAPP_DEVICE"]
    if torch.cuda.is_available():
        return "cuda:0"
    os.environ["LLMAPP_DEVICE"] = "cpu"
    return "cpu"


def ours(path: Any, ngl: Any, args: argparse.Namespace) -> dict[str, Any]:
    ctx = max(args.prompt, DECODE_PROMPT + args.n_gen) + 32
    options = RunnerOptions(ctx_size=ctx, n_threads=args.threads, n_gpu_layers=ngl)
    runner = ModelRunner(path, options)
    runner.bind_thread()
    result = run_bench(OurBench(runner), [args.prompt], args.n_gen, args.repeats)
    offload = runner.offload
    return {
        "layers": offload.layers if offload else 0,
        "of": runner.config.n_layer + 1,
        "prefill_tps": round(result.prefill_tps[str(args.prompt)], 2),
        "decode_tps": round(result.decode_tps, 2),
    }


def peer(path: Any, layers: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """llama.cpp with n_gpu_layers, or None where its build does not offload to a GPU."""
    try:
        import llama_cpp
    except ImportError:
        return None
    if not llama_cpp.llama_supports_gpu_offload():
        return None
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(args.prompt, DECODE_PROMPT + args.n_gen) + 32,
        n_threads=args.threads,
        n_gpu_layers=layers,
        verbose=False,
    )
    ids = random_tokens(args.prompt, llm.n_vocab())
    llm.eval(ids)  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = args.prompt / (time.perf_counter() - start)
    llm.reset()
    llm.eval(random_tokens(DECODE_PROMPT, llm.n_vocab()))
    start = time.perf_counter()
    for _ in range(args.n_gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = args.n_gen / (time.perf_counter() - start)
    return {"prefill_tps": round(prefill, 2), "decode_tps": round(decode, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2:135m")
    ap.add_argument("--layers", default="0,1,8,all", help="--n-gpu-layers values, comma separated")
    ap.add_argument("-p", "--prompt", type=int, default=64, help="prefill length")
    ap.add_argument("-n", "--n-gen", type=int, default=16, help="decode tokens")
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = pick_device(args.threads)
    path = resolve_model(args.model)
    rows = []
    for text in args.layers.split(","):
        row = ours(path, parse_n_gpu_layers(text), args)
        row["peer"] = peer(path, row["layers"], args) if device.startswith("cuda") else None
        rows.append(row)
        if not args.json:
            peer_text = ""
            if row["peer"]:
                peer_text = (
                    f"   llama.cpp {row['peer']['prefill_tps']:8.1f} / "
                    f"{row['peer']['decode_tps']:7.1f}"
                )
            print(
                f"{row['layers']:>3}/{row['of']} layers on {device}: prefill "
                f"{row['prefill_tps']:8.1f} t/s, decode {row['decode_tps']:7.1f} t/s{peer_text}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"model": args.model, "device": device, "rows": rows}))


if __name__ == "__main__":
    main()
