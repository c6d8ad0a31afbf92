"""What constrained decoding costs: mask time per token, and decode speed with and without a
JSON schema on each model.

    python benchmarks/bench_grammar.py [--models smollm2:135m,gemma3:270m,qwen2.5-coder:0.5b]
                                       [--threads 2] [--json]

Mask time is measured on Qwen2.5's 151,936-token vocabulary by walking a matcher along a
valid JSON text, llguidance (what llmapp uses) beside outlines-core when that is installed.
Decode speed is generated tokens per second after the first token, greedy, same prompt, the
schema forcing a long enough object that both runs generate the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 12,
            "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                },
                "required": ["name", "count"],
            },
        }
    },
    "required": ["items"],
}
TEXT = json.dumps({"items": [{"name": f"item {i}", "count": i * 7} for i in range(12)]})


def mask_times(model: str) -> dict[str, Any]:
    import numpy as np

    from llmapp.runtime.files.gguf_file import GGUFFile
    from llmapp.runtime.files.store import resolve_model
    from llmapp.runtime.text.constrain import Constraint, _ll_tokenizer, grammar_for
    from llmapp.runtime.text.tokenizer import Tokenizer

    with GGUFFile(resolve_model(model)) as gguf:
        tok = Tokenizer.from_gguf(gguf)
    start = time.perf_counter()
    _ll_tokenizer(tok)
    vocab_s = time.perf_counter() - start
    start = time.perf_counter()
    constraint = Constraint(grammar_for(json_schema=SCHEMA) or "", tok)
    compile_s = time.perf_counter() - start
    ids = tok.encode(TEXT, add_bos=False)
    logits = np.zeros(tok.n_vocab, dtype=np.float32)
    times = []
    for i in range(len(ids)):
        t = time.perf_counter()
        constraint(logits, ids[:i])
        times.append(time.perf_counter() - t)
    return {
        "vocab": tok.n_vocab,
        "llguidance_vocab_setup_s": round(vocab_s, 3),
        "llguidance_compile_ms": round(compile_s * 1000, 2),
        "llguidance_mask_ms_median": round(statistics.median(times) * 1000, 3),
        "llguidance_mask_ms_max": round(max(times) * 1000, 3),
        **outlines_times(tok, ids),
    }


def outlines_times(tok: Any, ids: list[int]) -> dict[str, Any]:
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return {}
    eos = min(tok.eog_ids)
    pieces: dict[str, list[int]] = {}
    for i in range(tok.n_vocab):
        if i == eos or tok.is_control(i):
            continue
        try:
            pieces.setdefault(tok.token_bytes(i).decode("utf-8"), []).append(i)
        except UnicodeDecodeError:
            continue
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, pieces))
    build = time.perf_counter() - start
    guide = Guide(index)
    times = []
    for token in ids:
        t = time.perf_counter()
        guide.get_tokens()
        times.append(time.perf_counter() - t)
        guide.advance(token)
    return {
        "outlines_index_build_s": round(build, 3),
        "outlines_allowed_list_ms_median": round(statistics.median(times) * 1000, 3),
    }


def decode_speed(model: str, threads: int) -> dict[str, Any]:
    from llmapp.runtime import Engine, EngineOptions, RunnerOptions, SamplingParams

    prompt = [{"role": "user", "content": "List twelve fruits with a count for each, as JSON."}]
    out: dict[str, Any] = {}
    opts = EngineOptions(runner=RunnerOptions(ctx_size=2048, n_threads=threads))
    with Engine(model, opts) as engine:
        engine.generate(prompt, SamplingParams(temperature=0, max_tokens=8))  # warm
        for label, schema in (("plain", None), ("schema", SCHEMA)):
            runs = []
            for _ in range(3):
                params = SamplingParams(
                    temperature=0, max_tokens=200, ignore_eos=schema is None, json_schema=schema
                )
                _, ids, last = engine.generate(prompt, params)
                assert last.timings is not None and last.usage is not None
                runs.append(last.timings.tps(last.usage)[1])
            out[f"{label}_decode_tps"] = round(statistics.median(runs), 1)
    out["schema_over_plain"] = round(out["schema_decode_tps"] / out["plain_decode_tps"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smollm2:135m,gemma3:270m,qwen2.5-coder:0.5b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    report: dict[str, Any] = {"mask_qwen_vocab": mask_times("qwen2.5-coder:0.5b")}
    report["decode"] = {m: decode_speed(m, args.threads) for m in args.models.split(",")}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("mask on Qwen2.5's vocabulary:", report["mask_qwen_vocab"])
    print("model | plain decode t/s | with schema | ratio")
    for model, row in report["decode"].items():
        print(f"{model} | {row['plain_decode_tps']} | {row['schema_decode_tps']} | "
              f"{row['schema_over_plain']}")  # fmt: skip


if __name__ == "__main__":
    main()
