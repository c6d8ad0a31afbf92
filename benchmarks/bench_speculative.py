"""N-gram speculative decoding on editing work and on open chat: speed, acceptance, sameness.

    python benchmarks/bench_speculative.py [MODEL] [--tokens 4,8,16] [--threads 2] [--json]

Each task runs greedy with speculation off and with each draft size, in one process: decode
tokens/s after the first token (median of 3 runs), the fraction of drafted tokens accepted,
and whether the reply is token for token the same as without speculation.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

CODE = """def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age, email = line.strip().split(",")
            users.append({"name": name, "age": int(age), "email": email})
    return users


def adults(users):
    return [u for u in users if u["age"] >= 18]


def by_domain(users):
    out = {}
    for u in users:
        domain = u["email"].split("@")[1]
        out.setdefault(domain, []).append(u["name"])
    return out
"""
BUGGY = CODE.replace('u["age"] >= 18', 'u["age"] > 18').replace('split("@")[1]', 'split("@")[0]')
DATA = {
    "name": "llmapp",
    "version": "0.1.0",
    "features": ["server", "chat", "pull"],
    "limits": {"ctx": 8192, "parallel": 4},
    "authors": [{"name": "A", "role": "dev"}],
}

TASKS = {
    "type hints": "Add type hints and docstrings to this code. Reply with the full code only."
    "\n\n" + CODE,
    "fix a bug": "Adults are 18 or older, and the domain is after the @. Fix the bugs and reply "
    "with the whole corrected file only.\n\n" + BUGGY,
    "reformat JSON": "Reformat this JSON with 4-space indentation, keys unchanged. Reply with "
    "the JSON only.\n\n" + json.dumps(DATA),
    "open chat": "Tell me a short story about a lighthouse keeper and a storm.",
}


def run_task(engine: Any, prompt: str, max_tokens: int) -> tuple[list[int], float, Any]:
    from llmapp.runtime import SamplingParams

    messages = [{"role": "user", "content": prompt}]
    speeds, ids, last = [], [], None
    for _ in range(3):
        _, ids, last = engine.generate(
            messages, SamplingParams(temperature=0, max_tokens=max_tokens)
        )
        speeds.append(last.timings.tps(last.usage)[1])
    return ids, statistics.median(speeds), last.usage


def measure(model: str, sizes: list[int], threads: int, max_tokens: int) -> dict[str, Any]:
    from llmapp.runtime import Engine, EngineOptions, RunnerOptions

    results: dict[str, Any] = {}
    baseline: dict[str, list[int]] = {}
    for k in [0, *sizes]:
        opts = EngineOptions(runner=RunnerOptions(ctx_size=4096, n_threads=threads),
                             speculative_tokens=k)  # fmt: skip
        with Engine(model, opts) as engine:
            engine.generate("warm up", None)
            for task, prompt in TASKS.items():
                ids, tps, usage = run_task(engine, prompt, max_tokens)
                row = results.setdefault(task, {"tokens": len(ids)})
                if k == 0:
                    baseline[task] = ids
                    row["plain_tps"] = round(tps, 1)
                    continue
                rate = usage.accepted_tokens / usage.drafted_tokens if usage.drafted_tokens else 0
                row[f"k{k}"] = {
                    "tps": round(tps, 1),
                    "speedup": round(tps / row["plain_tps"], 2) if row["plain_tps"] else None,
                    "acceptance": round(rate, 2),
                    "identical": ids == baseline[task],
                }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default="qwen2.5-coder:0.5b")
    p.add_argument("--tokens", default="4,8,16", help="draft sizes to try")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sizes = [int(k) for k in args.tokens.split(",")]
    results = measure(args.model, sizes, args.threads, args.max_tokens)
    if args.json:
        print(
            json.dumps({"model": args.model, "threads": args.threads, "tasks": results}, indent=2)
        )
        return
    print(f"{args.model}, {args.threads} threads, greedy")
    print("task | tokens | plain t/s | " + " | ".join(f"k={k}: t/s (x, accept)" for k in sizes))
    for task, row in results.items():
        cells = [
            f"{row[f'k{k}']['tps']} ({row[f'k{k}']['speedup']}x, {row[f'k{k}']['acceptance']})"
            + ("" if row[f"k{k}"]["identical"] else " DIFFERENT")
            for k in sizes
        ]
        print(f"{task} | {row['tokens']} | {row['plain_tps']} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
