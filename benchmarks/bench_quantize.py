"""Quantizer quality and speed, ours against llama.cpp's, on the same float weights.

For each file type (Q2_K, Q4_K_M, Q6_K, Q8_0) a synthetic F32 llama model (dimensions multiples
of 256, so real K-quants occur) is quantized by `llmapp quantize` and by llama.cpp
(`llama_model_quantize`, through llama-cpp-python). Per tensor: the RMS error of each against the
F32 source, and their ratio (ours / llama.cpp; the goal is <= 1.1 everywhere). With --real, the
same is done on a real model's weights dequantized to F32 (its tensors are already quantized,
so this measures re-quantization of those values, the path `--allow-requantize` takes).

    python benchmarks/bench_quantize.py [--real smollm2:135m] [--types Q4_K_M,Q8_0] [--json]

The helpers here (synthetic model writer, llama.cpp calls) are also used by the tests.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FTYPES = ("Q2_K", "Q4_K_M", "Q6_K", "Q8_0")


# ----------------------------------------------------------------------------------------------
# A small but complete llama model, written with the gguf package


def write_synthetic_llama(
    path: Path,
    *,
    n_embd: int = 256,
    n_ff: int = 512,
    n_layer: int = 8,
    n_head: int = 4,
    n_head_kv: int = 1,
    n_vocab: int = 320,
    tied: bool = False,
    dtype: Any = np.float32,
    seed: int = 0,
) -> Path:
    """Write a llama-architecture GGUF (random weights, tiny SPM vocabulary) that llama.cpp
    loads. dtype float32 or float16 for the 2-D weights; norms stay F32 as converters write."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic-llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0 if dtype == np.float32 else 1)
    _add_tiny_vocab(w, n_vocab)
    _add_llama_tensors(w, np.random.default_rng(seed), n_embd, n_ff, n_layer,
                       n_head_kv * (n_embd // n_head), n_vocab, tied, dtype)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_llama_tensors(
    w: Any, rng: np.random.Generator, n_embd: int, n_ff: int, n_layer: int, n_kv: int,
    n_vocab: int, tied: bool, dtype: Any,
) -> None:  # fmt: skip
    def weight(rows: int, cols: int) -> np.ndarray:
        # Gaussian weights with a few larger outliers, as trained matrices have.
        x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.02)
        spikes = rng.random((rows, cols)) < 0.002
        x[spikes] *= np.float32(8.0)
        return x.astype(dtype)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm())
        w.add_tensor(p + "attn_q.weight", weight(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", weight(n_kv, n_embd))
        w.add_tensor(p + "attn_v.weight", weight(n_kv, n_embd))
        w.add_tensor(p + "attn_output.weight", weight(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", norm())
        w.add_tensor(p + "ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", weight(n_embd, n_ff))
    w.add_tensor("output_norm.weight", norm())
    if not tied:
        w.add_tensor("output.weight", weight(n_vocab, n_embd))


def _add_tiny_vocab(w: Any, n_vocab: int) -> None:
    # SPM vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then short words.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    k = 0
    while len(tokens) < n_vocab:
        tokens.append("\u2581" + letters[k % 26] + letters[(k // 26) % 26])
        k += 1
    tokens = tokens[:n_vocab]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_vocab - 259)])
    w.add_token_types(types[:n_vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# ----------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python


def llama_ftype(name: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"))


_LOG_SINK: Any = None


def _silence_llama() -> None:
    # llama.cpp logs every tensor to stderr; keep the benchmark's and the tests' output readable.
    global _LOG_SINK
    import llama_cpp

    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p())


def llama_quantize_file(src: Path, dst: Path, ftype: str, pure: bool = False) -> None:
    """llama.cpp's quantizer on a file (default parameters: no imatrix, 2 threads)."""
    import llama_cpp

    _silence_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(ftype)
    params.nthread = 2
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")


_GGML_BASE: Any = None


def llama_quantize_rows(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """llama.cpp's own quantizer on float32 rows (ggml_quantize_chunk, no imatrix)."""
    global _GGML_BASE
    from llmapp.kernels_cpu.quantize import quantized_row_bytes

    if _GGML_BASE is None:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        fn = lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr]  # type, src, dst, start, ...
        _GGML_BASE = fn
    rows = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((rows.shape[0], quantized_row_bytes(ggml_type, rows.shape[1])), np.uint8)
    n = _GGML_BASE(ggml_type, rows.ctypes.data, out.ctypes.data, 0, *rows.shape, None)
    if n != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.size}")
    return out


# ----------------------------------------------------------------------------------------------
# Measuring


def rms_errors(src: Path, quantized: Path) -> dict[str, tuple[int, float]]:
    """Per tensor of `quantized`: (its type, RMS of its values minus the source's values)."""
    from llmapp.kernels_cpu.quants import dequantize
    from llmapp.runtime.files.gguf_file import GGUFFile

    errors = {}
    with GGUFFile(src) as a, GGUFFile(quantized) as b:
        for name, info in b.tensors.items():
            ref = a.tensors[name]
            x = dequantize(a.tensor_data(name), ref.ggml_type, ref.row_len)
            y = dequantize(b.tensor_data(name), info.ggml_type, info.row_len)
            diff = y.astype(np.float64) - x
            errors[name] = (info.ggml_type, float(np.sqrt(np.mean(diff * diff))))
    return errors


def compare(src: Path, ftype: str, workdir: Path) -> dict[str, Any]:
    """Quantize src both ways; per-tensor RMS errors, types and times."""
    from llmapp.runtime.files.quantize import quantize_file

    ours_path, peer_path = workdir / f"ours-{ftype}.gguf", workdir / f"llama-{ftype}.gguf"
    t0 = time.perf_counter()
    report = quantize_file(src, ours_path, ftype, allow_requantize=True)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    llama_quantize_file(src, peer_path, ftype)
    t_peer = time.perf_counter() - t0
    ours, peer = rms_errors(src, ours_path), rms_errors(src, peer_path)
    rows: list[dict[str, Any]] = []
    for name, (t, err) in ours.items():
        p_type, p_err = peer[name]
        if t != 0 or p_type != 0:  # F32 tensors are copies on both sides
            ratio = err / p_err if p_err > 0 else (1.0 if err == 0 else float("inf"))
            rows.append({"tensor": name, "type": t, "llama_type": p_type, "rms": err,
                         "llama_rms": p_err, "ratio": ratio})  # fmt: skip
    return {
        "ftype": ftype,
        "seconds": t_ours,
        "llama_seconds": t_peer,
        "bytes": report.dst_file_bytes,
        "llama_bytes": peer_path.stat().st_size,
        "max_ratio": max(r["ratio"] for r in rows),
        "same_types": all(r["type"] == r["llama_type"] for r in rows),
        "tensors": rows,
    }


def dequantized_copy(src: Path, dst: Path) -> Path:
    """A real model with every tensor stored as F32 (the float values its blocks encode)."""
    import gguf

    from llmapp.kernels_cpu.quants import dequantize
    from llmapp.runtime.files.gguf_file import GGUFFile
    from llmapp.runtime.files.quantize import _copy_key, _writer_class

    with GGUFFile(src) as f:
        w = _writer_class()(str(dst), f.metadata["general.architecture"])
        w.kv_data[0].clear()
        for key, value in f.metadata.items():
            if key == "general.file_type":
                w.add_key_value(key, 0, gguf.GGUFValueType.UINT32)  # all F32 now
            else:
                _copy_key(w, f, key, value)
        for name, info in f.tensors.items():
            w.add_tensor_info(
                name, tuple(reversed(info.shape)), np.dtype(np.float32), 4 * info.n_elements,
                raw_dtype=gguf.GGMLQuantizationType.F32,
            )  # fmt: skip
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, info in f.tensors.items():  # one tensor in memory at a time
            w.write_tensor_data(dequantize(f.tensor_data(name), info.ggml_type, info.row_len))
        w.close()
    return dst


def _print_table(results: list[dict[str, Any]], label: str) -> None:
    print(f"\n{label}")
    print(f"{'type':8s} {'max ratio':>9s} {'mean ratio':>10s} {'same mix':>8s} "
          f"{'ours s':>7s} {'llama s':>7s} {'MB':>7s} {'llama MB':>8s}")  # fmt: skip
    for r in results:
        mean = float(np.mean([t["ratio"] for t in r["tensors"]]))
        print(f"{r['ftype']:8s} {r['max_ratio']:9.4f} {mean:10.4f} {str(r['same_types']):>8s} "
              f"{r['seconds']:7.2f} {r['llama_seconds']:7.2f} {r['bytes'] / 1e6:7.2f} "
              f"{r['llama_bytes'] / 1e6:8.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(FTYPES))
    ap.add_argument("--real", metavar="MODEL", help="also measure a real model (name or path)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic model")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = write_synthetic_llama(work / "synthetic-f32.gguf", n_layer=args.layers)
        out["synthetic"] = [compare(src, t, work) for t in types]
        if args.real:
            from llmapp.runtime.files.store import resolve_model

            real = dequantized_copy(resolve_model(args.real), work / "real-f32.gguf")
            out["real"] = [compare(real, t, work) for t in types]
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        _print_table(out["synthetic"], "synthetic llama, F32 (n_embd 256, n_ff 512)")
        if "real" in out:
            _print_table(out["real"], f"{args.real}, weights dequantized to F32")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
