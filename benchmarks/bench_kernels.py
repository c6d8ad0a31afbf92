"""Matmul kernel speed on Qwen2.5-0.5B shapes, against numpy float32 BLAS on the same weights.

    python benchmarks/bench_kernels.py [--threads N] [--quick] [--no-compile] [--only NAME]

Weights are random bytes of the real type with small finite f16 scales. Columns:
- one row, hot: the same matrix again and again (it stays in the 32 MB L3): kernel speed;
- one row, cold: cycling through copies totalling > 3x L3, as in a decode step where every
  weight comes from memory: the GB/s of packed weight read is the figure to compare with the
  machine's bandwidth;
- M rows: int8 path (VNNI where the CPU has it), the same path's portable code (what a CPU
  without VNNI runs), and the float (dequantized tile) path, Gmac/s; numpy BLAS on a
  dequantized float32 matrix for comparison (it uses its own thread pool).
- packed MB against the GGUF file's MB of the same rows (the compact tiles' padding and
  scale bytes; decode reads every packed byte once);
- decode step: every matmul of one Qwen2.5-0.5B token (24 layers + head, packed vs file MB),
  separate and with q|k|v and gate|up concatenated; then the fused step for 8 sessions at once
  (8 rows per matmul), against 8 times the one-session step.
Compile time (first call, empty cache) and warm load (cache filled) are measured in fresh
interpreters. Figures are noisy on a shared machine: compare runs taken side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from llmapp.kernels_cpu import matmul as mm
from llmapp.kernels_cpu import threads

CASES = [
    ("attn_q/o Q5_0", mm.Q5_0, 896, 896),
    ("ffn_up Q5_0", mm.Q5_0, 896, 4864),
    ("ffn_up Q8_0", mm.Q8_0, 896, 4864),
    ("ffn_down Q4_K", mm.Q4_K, 4864, 896),
    ("ffn_down Q6_K", mm.Q6_K, 4864, 896),
    ("output Q8_0", mm.Q8_0, 896, 151936),
]
ROWS = (2, 4, 8, 16, 32, 128, 512)
COLD_BYTES = 100 << 20


def random_raw(ggml_type: int, n_rows: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Random blocks of a quantized type with small finite f16 scale fields."""
    rng = np.random.default_rng(seed)
    spec = mm.QUANT_SPECS[ggml_type]
    nb = row_len // spec.block
    raw = rng.integers(0, 256, size=(n_rows, nb, spec.nbytes), dtype=np.uint8)
    for off in spec.halves:
        half = (rng.random((n_rows, nb), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
        raw[:, :, off : off + 2] = half.view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, nb * spec.nbytes)


def best_time(fn: Callable[[], object], min_total: float = 0.3) -> float:
    """Best of 5 averaged batches, each long enough to be measured."""
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-7)
    reps = max(1, int(min_total / 5 / once))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def copy_weight(w: mm.PackedWeight) -> mm.PackedWeight:
    """A copy of w's arrays (another place in memory: read from RAM, not from the cache)."""
    arrays = ("lo", "hi", "d", "dm", "sub", "mins", "wf")
    return w._replace(**{f: getattr(w, f).copy() for f in arrays})


def one_row(w: mm.PackedWeight, copies: list[mm.PackedWeight]) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, w.row_len), dtype=np.float32)
    out = np.empty((1, w.n_rows), np.float32)
    hot = best_time(lambda: mm.matmul(x, w, out))

    def cycle() -> None:
        for c in copies:
            mm.matmul(x, c, out)

    cold = best_time(cycle) / len(copies)
    return hot, cold


def many_rows(w: mm.PackedWeight, wf: np.ndarray, m_rows: int) -> tuple[float, ...]:
    """Seconds for (int8, int8 portable code, float tile, numpy BLAS)."""
    x = np.random.default_rng(2).standard_normal((m_rows, w.row_len), dtype=np.float32)
    out = np.empty((m_rows, w.n_rows), np.float32)
    t_int = best_time(lambda: mm.matmul(x, w, out, path="int"), 0.2)
    vnni, mm.USE_VNNI = mm.USE_VNNI, False
    try:
        t_portable = best_time(lambda: mm.matmul(x, w, out, path="int"), 0.2)
    finally:
        mm.USE_VNNI = vnni
    t_float = best_time(lambda: mm.matmul(x, w, out, path="float"), 0.2)
    t_blas = best_time(lambda: np.matmul(x, wf.T, out=out), 0.2)
    return t_int, t_portable, t_float, t_blas


def bench_case(name: str, ggml_type: int, k: int, n: int, rows: tuple[int, ...]) -> None:
    raw = random_raw(ggml_type, n, k)
    t = time.perf_counter()
    w = mm.pack_weight(raw, ggml_type, k)
    pack_s = time.perf_counter() - t
    n_copies = max(1, -(-COLD_BYTES // w.nbytes))
    copies = [w] if n_copies == 1 else [copy_weight(w) for _ in range(n_copies)]
    hot, cold = one_row(w, copies)
    macs = n * k
    print(
        f"{name:15} {n:>6}x{k:<5} pack {pack_s * 1e3:6.1f} ms  packed {w.nbytes / 1e6:6.2f} MB"
        f" / gguf {raw.nbytes / 1e6:6.2f} MB = {w.nbytes / raw.nbytes:4.2f}x"
        f" | 1 row hot {hot * 1e6:7.1f} us {macs / hot / 1e9:5.1f} Gmac/s"
        f" | cold {cold * 1e6:7.1f} us {w.nbytes / cold / 1e9:5.1f} GB/s"
    )
    del copies
    wf = mm.unpack_weight(w)
    for m_rows in rows:
        times = many_rows(w, wf, m_rows)
        g = m_rows * macs / 1e9
        rates = "  ".join(f"{g / t:5.0f}" for t in times)
        ms = " / ".join(f"{t * 1e3:.3f}" for t in times)
        print(f"{'':15} M={m_rows:<4} {rates} Gmac/s  ({ms} ms; x{times[0] / hot:.1f} one row)")


def qwen_layer_raws(layer: int) -> dict[str, tuple[np.ndarray, int, int]]:
    """One Qwen2.5-0.5B layer's raw rows with the file's types (K=896 rows cannot hold
    K-quants): name -> (raw, type, row length)."""
    down = mm.Q6_K if layer % 3 == 0 else mm.Q4_K
    shapes = {
        "q": (mm.Q5_0, 896, 896),
        "k": (mm.Q5_0, 896, 128),
        "v": (mm.Q8_0, 896, 128),
        "o": (mm.Q5_0, 896, 896),
        "gate": (mm.Q5_0, 896, 4864),
        "up": (mm.Q5_0, 896, 4864),
        "down": (down, 4864, 896),
    }
    return {
        name: (random_raw(kind, n, k, seed=layer), kind, k) for name, (kind, k, n) in shapes.items()
    }


def decode_step(n_layers: int = 24) -> None:
    """All matmuls of one Qwen2.5-0.5B decode step, every weight read from memory once."""
    raws = [qwen_layer_raws(i) for i in range(n_layers)]
    layers = [{name: mm.pack_weight(*part) for name, part in r.items()} for r in raws]
    head_raw = random_raw(mm.Q8_0, 151936, 896)
    file_bytes = head_raw.nbytes + sum(p[0].nbytes for r in raws for p in r.values())
    head = mm.pack_weight(head_raw, mm.Q8_0, 896)
    del head_raw
    fused = []
    for r, w in zip(raws, layers, strict=True):
        qkv = mm.pack_weights([r["q"], r["k"], r["v"]])
        fused.append((qkv, w["o"], mm.pack_weights([r["gate"], r["up"]]), w["down"]))
    del raws  # ~400 MB of raw rows: not kept alive through the timings
    x8 = np.random.default_rng(3).standard_normal((8, 896), dtype=np.float32)
    h8 = np.random.default_rng(4).standard_normal((8, 4864), dtype=np.float32)
    x, h = x8[:1], h8[:1]

    def separate() -> None:
        for w in layers:
            for name in ("q", "k", "v", "o", "gate", "up"):
                mm.matmul(x, w[name])
            mm.matmul(h, w["down"])
        mm.matmul(x, head)

    def grouped(x: np.ndarray = x, h: np.ndarray = h) -> None:
        for qkv, o, gate_up, down in fused:
            mm.matmul(x, qkv)
            mm.matmul(x, o)
            mm.matmul(x, gate_up)
            mm.matmul(h, down)
        mm.matmul(x, head)

    n_bytes = head.nbytes + sum(p.nbytes for w in layers for p in w.values())
    fused_bytes = head.nbytes + sum(p.nbytes for f in fused for p in f)
    print(
        f"decode step weights: packed {n_bytes / 1e6:.0f} MB (fused {fused_bytes / 1e6:.0f} MB),"
        f" gguf {file_bytes / 1e6:.0f} MB: {n_bytes / file_bytes:.3f}x the file"
    )
    runs = [("separate", separate, 7 * n_layers + 1)]
    runs.append(("q|k|v, gate|up fused", grouped, 4 * n_layers + 1))
    step = {}
    for name, fn, calls in runs:
        step[name] = best_time(fn, 2.0)
        print(
            f"decode step, {name:21} {calls:3} calls: {step[name] * 1e3:6.2f} ms"
            f"  ({n_bytes / step[name] / 1e9:4.1f} GB/s of {n_bytes / 1e6:.0f} MB packed weights)"
        )
    one = step["q|k|v, gate|up fused"]
    t8 = best_time(lambda: grouped(x8, h8), 2.0)
    print(
        f"decode step, 8 sessions, fused:       {t8 * 1e3:6.2f} ms"
        f"  ({t8 / one:.2f}x one session's fused step: {8 * one / t8:.2f}x the tokens per second)"
    )


_COMPILE_PROBE = """
import time
t = time.perf_counter()
import numpy as np
from llmapp.kernels_cpu import matmul as mm
rng = np.random.default_rng(0)
for kind in (mm.Q4_0, mm.Q4_K, mm.Q6_K):
    spec = mm.QUANT_SPECS[kind]
    raw = rng.integers(0, 256, size=(64, spec.nbytes), dtype=np.uint8)
    for off in spec.halves:
        raw[:, off:off + 2] = np.full((64, 1), 0.01, np.float16).view(np.uint8)
    w = mm.pack_weight(raw, kind, spec.block)
    for m in (1, 32):
        mm.matmul(np.ones((m, spec.block), np.float32), w)
print(time.perf_counter() - t)
"""


def compile_times() -> tuple[float, float]:
    """Seconds for (a run with an empty cache, a run with it filled), each a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            res = subprocess.run(
                [sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True, text=True
            )
            runs.append(float(res.stdout.strip().splitlines()[-1]))
    return runs[0], runs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="default: physical cores")
    parser.add_argument("--quick", action="store_true", help="M=8 and 128 only, no output head")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-time probe")
    parser.add_argument("--only", default="", help="cases whose name contains this ('decode')")
    args = parser.parse_args()
    n_threads = threads.set_num_threads(args.threads or None)
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "its default")
    print(f"threads {n_threads}; numpy BLAS threads {blas}")
    rows = (8, 128) if args.quick else ROWS
    print("(M rows columns: int8, int8 portable, float tile, numpy BLAS)")
    for name, kind, k, n in CASES:
        if (args.quick and n > 100_000) or args.only not in name:
            continue
        bench_case(name, kind, k, n, rows if n < 100_000 else (8,))
    if not args.quick and args.only in ("", "decode"):
        decode_step()
    print(f"threading layer {threads.threading_layer()}")
    if not args.no_compile:
        cold, warm = compile_times()
        print(f"compile + first calls, empty cache: {cold:.1f} s; warm (cached) load: {warm:.2f} s")


if __name__ == "__main__":
    main()
