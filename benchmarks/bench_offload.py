"""Prefill and decode tokens/s by number of offloaded layers (--n-gpu-layers), on whatever
device is present: CUDA when torch sees one, else torch's CPU device standing in for a GPU
(LLMAPP_DEVICE=cpu; those figures measure the code path, not a GPU). Beside each row, llama.cpp
with the same n_gpu_layers where its build offloads to a GPU.

Each row says which matmul paths ran (kernels_gpu.ops.path_counts): on CUDA, decode's rows take
the fused dequantize-GEMV Triton kernel where triton imports ("fused-gemv"), prefill's a float16
GEMM per dequantized tile ("float16-gemm"); on torch's CPU device both are float32 GEMMs unless
--gemm-dtype forces the half-precision path (TRITON_INTERPRET=1 would run the fused kernel
through Triton's interpreter: a correctness tool, far too slow to time).

    python benchmarks/bench_offload.py [MODEL] [--layers 0,1,8,all] [-p 64] [-n 16]
        [--gemm-dtype auto|float16|bfloat16|float32] [--json]
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


def configure_paths(device: str, gemm_dtype: str) -> dict[str, Any]:
    """Set the GEMM dtype for the device (unless auto); what the matmuls will use."""
    import torch

    from llmapp.kernels_gpu import ops

    dev = torch.device(device)
    if gemm_dtype != "auto":
        ops.GEMM_DTYPES[dev.type] = getattr(torch, gemm_dtype)
    fused = ops.fused_usable(dev)
    module = ops.fused_module() if fused else None
    return {
        "gemm_dtype": str(ops.gemm_dtype(dev)).removeprefix("torch."),
        "fused_gemv": fused,
        "triton": module.TRITON_VERSION if module else None,
    }


def path_summary(counts: dict[tuple[str, str], int]) -> str:
    parts = [f"{phase} {path} x{n}" for (path, phase), n in sorted(counts.items(), key=str)]
    return ", ".join(parts) or "none (no layer on the torch device)"


def ours(path: Any, ngl: Any, args: argparse.Namespace) -> dict[str, Any]:
    from llmapp.kernels_gpu import ops

    ops.path_counts.clear()
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
        "paths": {f"{phase} {p}": n for (p, phase), n in sorted(ops.path_counts.items())},
        "path_text": path_summary(ops.path_counts),
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
    ap.add_argument(
        "--gemm-dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="the tiled matmul's GEMM dtype on the torch device (auto: CUDA float16, CPU float32)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = pick_device(args.threads)
    setup = configure_paths(device, args.gemm_dtype)
    path = resolve_model(args.model)
    if not args.json:
        if setup["triton"]:
            fused_text = f"on (triton {setup['triton']})"
        elif device.startswith("cuda"):
            fused_text = "off (triton does not import)"
        else:
            fused_text = "off (the CPU device runs it only interpreted, TRITON_INTERPRET=1)"
        print(
            f"{device}: tiled GEMM in {setup['gemm_dtype']}; decode's fused dequantize-GEMV "
            f"{fused_text}",
            flush=True,
        )
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
            print(f"    matmul paths: {row['path_text']}", flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "device": device, **setup, "rows": rows}))


if __name__ == "__main__":
    main()
