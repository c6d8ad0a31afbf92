"""Server latency and throughput: `llmapp serve` beside llama.cpp's server, same model, same run.

    python benchmarks/bench_server.py [MODEL] [--clients 1,4,16] [--max-tokens 64] [--json]

For each number of concurrent clients, every client sends streamed chat requests (greedy, a
fixed number of new tokens) and the script records time to first token, the gaps between
tokens, and aggregate generated tokens per second. The peer is llama-cpp-python's server
(`python -m llama_cpp.server`) on the same GGUF file with the same thread count, when it is
installed (`pip install "llama-cpp-python[server]"`). Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe a walk through a forest in autumn.",
    "List the steps to bake bread, with details.",
]


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    tokens: int


@dataclass
class Result:
    clients: int
    wall: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(s.ttft for s in self.samples if s.tokens)
        gaps = sorted(g for s in self.samples for g in s.gaps)
        tokens = sum(s.tokens for s in self.samples)
        return {
            "clients": self.clients,
            "requests": len(self.samples),
            "tokens": tokens,
            "aggregate_tps": tokens / self.wall if self.wall else 0.0,
            **{f"ttft_ms_p{q}": 1000 * _pct(ttft, q) for q in (50, 95, 99)},
            **{f"itl_ms_p{q}": 1000 * _pct(gaps, q) for q in (50, 95, 99)},
        }


def _pct(ordered: list[float], q: int) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, n: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
    if not stamps:
        return Sample(0.0, [], 0)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return Sample(stamps[0] - start, gaps, len(stamps))


async def run_level(url: str, model: str, clients: int, per_client: int, n: int) -> Result:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one_request(http, model, PROMPTS[0], 4)  # warm: compile, caches
        start = time.perf_counter()

        async def client(c: int) -> list[Sample]:
            return [
                await one_request(http, model, PROMPTS[(c + i) % len(PROMPTS)], n)
                for i in range(per_client)
            ]

        batches = await asyncio.gather(*(client(c) for c in range(clients)))
        result = Result(clients, time.perf_counter() - start)
    result.samples = [s for batch in batches for s in batch]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode})")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} never became ready")


def start_ours(model: str, threads: int, ctx: int) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "llmapp.app.cli", "serve", model, "--port", "0",
           "--threads", str(threads), "--ctx-size", str(ctx), "--parallel", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    match = re.search(rb"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    if not match:
        raise SystemExit("llmapp serve did not start")
    url = f"http://127.0.0.1:{int(match.group(1))}"
    wait_ready(url, proc, "/health")
    return proc, url


def start_peer(path: str, threads: int, ctx: int) -> tuple[subprocess.Popen[bytes], str] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_ctx", str(ctx),
           # By default a new request interrupts the one streaming: that is no load test.
           "--interrupt_requests", "False"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models")
    return proc, url


def measure(url: str, model: str, levels: list[int], n: int) -> list[dict[str, Any]]:
    out = []
    for clients in levels:
        per_client = 2 if clients < 16 else 1
        out.append(asyncio.run(run_level(url, model, clients, per_client, n)).summary())
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{name}: clients | agg t/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms"]
    for r in rows:
        lines.append(
            f"  {r['clients']:>3} | {r['aggregate_tps']:7.1f} | "
            f"{r['ttft_ms_p50']:.0f}/{r['ttft_ms_p95']:.0f}/{r['ttft_ms_p99']:.0f} | "
            f"{r['itl_ms_p50']:.1f}/{r['itl_ms_p95']:.1f}/{r['itl_ms_p99']:.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2:135m")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from llmapp.runtime.files.store import resolve_model

    path = str(resolve_model(args.model))
    levels = [int(c) for c in args.clients.split(",")]
    report: dict[str, Any] = {"model": args.model, "threads": args.threads, "cpus": os.cpu_count()}
    proc, url = start_ours(args.model, args.threads, args.ctx)
    try:
        report["llmapp"] = measure(url, args.model, levels, args.max_tokens)
    finally:
        stop(proc)
    peer = None if args.no_peer else start_peer(path, args.threads, args.ctx)
    if peer is not None:
        try:
            report["llama.cpp"] = measure(peer[1], args.model, levels, args.max_tokens)
        finally:
            stop(peer[0])
        report["ratio_aggregate_tps"] = [
            round(a["aggregate_tps"] / b["aggregate_tps"], 2) if b["aggregate_tps"] else None
            for a, b in zip(report["llmapp"], report["llama.cpp"], strict=True)
        ]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(table("llmapp", report["llmapp"]))
    if "llama.cpp" in report:
        print(table("llama.cpp server", report["llama.cpp"]))
        print("aggregate t/s, ours / llama.cpp:", report["ratio_aggregate_tps"])


if __name__ == "__main__":
    main()
