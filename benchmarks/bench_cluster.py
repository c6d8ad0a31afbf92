"""`llmapp serve --ray`: aggregate throughput and time to first token with 1 and 2 replicas,
prefix-routed against random routing, on a shared-prefix chat workload.

    python benchmarks/bench_cluster.py [MODEL] [--clients 16] [--turns 3] [--json]

The workload: every client holds a conversation over one of eight long documents (two clients
share each document), asking a question per turn; each turn's prompt is the document, the
history and the new question, so prompts share prefixes across clients (the document) and
across turns (the history). Runs, each a fresh `llmapp serve` on loopback:

    single     plain `llmapp serve` (no Ray), the hops' baseline
    1 replica  --ray --replicas 1, with all clients, a half and a quarter of them (the load
               one replica carries when two or four share the clients: the inputs of a paper
               estimate for replicas on machines of their own)
    2 / prefix --ray --replicas 2, routed by prefix
    2 / random --ray --replicas 2 --ray-routing random

Every replica and the single server compute on one thread (--threads 1). On a machine with
fewer cores than replicas they share cores, so two replicas there cannot be faster than one
by much; the prefix-vs-random comparison does not depend on that. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TOPICS = ["the tides", "the keepers", "the lamp", "storms", "ships", "the harbour", "gulls",
          "the stairs", "fog signals", "the log book", "winter", "supplies"]  # fmt: skip
WORDS = ("granite harbour lamp keeper storm ship gull fog signal stair winter coast light wave "
         "rope bell tower island rock night watch oil lens beacon current").split()  # fmt: skip


_DOC_IDS = itertools.count()


def document(i: int, sentences: int) -> str:
    """A long, deterministic text unique from its first words."""
    rng = random.Random(i)
    body = " ".join(
        " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(sentences)
    )
    return f"Document {i}: notes of lighthouse number {i * 7 + 3}.\n{body}"


@dataclass
class Sample:
    ttft: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    replica: str
    turn: int = 0


@dataclass
class Run:
    name: str
    clients: int
    wall: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    routed: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(s.ttft for s in self.samples)
        # Later turns are where routing shows: their history is cached only where it was sent.
        later = sorted(s.ttft for s in self.samples if s.turn > 0)
        tokens = sum(s.tokens for s in self.samples)
        prompt = sum(s.prompt_tokens for s in self.samples)
        per_replica: dict[str, int] = {}
        for s in self.samples:
            per_replica[s.replica] = per_replica.get(s.replica, 0) + 1
        return {
            "run": self.name,
            "clients": self.clients,
            "requests": len(self.samples),
            "wall_s": round(self.wall, 2),
            "aggregate_tps": round(tokens / self.wall, 1) if self.wall else 0.0,
            "ttft_ms_p50": round(1000 * _pct(ttft, 50)),
            "ttft_ms_p95": round(1000 * _pct(ttft, 95)),
            "later_turns_ttft_ms_p50": round(1000 * _pct(later, 50)),
            "later_turns_ttft_ms_p95": round(1000 * _pct(later, 95)),
            "prompt_tokens": prompt,
            "cached_share": round(sum(s.cached_tokens for s in self.samples) / prompt, 3)
            if prompt
            else 0.0,
            "requests_per_replica": sorted(per_replica.values(), reverse=True),
            "routed": self.routed,
        }


def _pct(ordered: list[float], q: int) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_turn(
    http: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int
) -> tuple[Sample, str]:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, text, usage = 0.0, "", {}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        replica = r.headers.get("x-llmapp-replica", "single")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
    details = usage.get("prompt_tokens_details") or {}
    sample = Sample(
        (first or time.perf_counter()) - start,
        usage.get("completion_tokens", 0),
        usage.get("prompt_tokens", 0),
        details.get("cached_tokens", 0),
        replica,
    )
    return sample, text


async def conversation(
    http: httpx.AsyncClient, c: int, docs: list[str], turns: int, max_tokens: int
) -> list[Sample]:
    messages = [{"role": "system", "content": docs[c % len(docs)]}]
    samples = []
    for t in range(turns):
        topic = TOPICS[(c * turns + t) % len(TOPICS)]
        messages.append({"role": "user", "content": f"Reader {c}, question {t}: {topic}?"})
        sample, text = await one_turn(http, messages, max_tokens)
        sample.turn = t
        samples.append(sample)
        messages.append({"role": "assistant", "content": text})
    return samples


async def drive(url: str, run: Run, docs: list[str], turns: int, max_tokens: int) -> None:
    limits = httpx.Limits(max_connections=run.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await one_turn(http, [{"role": "user", "content": "Hello"}], 2)  # first-call costs
        start = time.perf_counter()
        batches = await asyncio.gather(
            *(conversation(http, c, docs, turns, max_tokens) for c in range(run.clients))
        )
        run.wall = time.perf_counter() - start
    run.samples = [s for batch in batches for s in batch]


def start(
    model: str, args: list[str], ctx: int, parallel: int
) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "llmapp.app.cli", "serve", model, "--port", "0", "--threads",
           "1", "--ctx-size", str(ctx), "--parallel", str(parallel), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        stop(proc)
        raise SystemExit(f"llmapp serve {' '.join(args)} did not start: {line!r}")
    url = f"http://127.0.0.1:{match.group(1)}"
    want = args[args.index("--replicas") + 1] if "--replicas" in args else None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmapp serve {' '.join(args)} exited ({proc.returncode})")
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200 and (want is None or _replicas(r.json()) == int(want)):
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"llmapp serve {' '.join(args)} never became ready")


def _replicas(health: dict[str, Any]) -> int:
    return min(health.get("replicas", {}).values(), default=0)


def routed(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = r'^llmapp:cluster_routed_requests_total\{[^}]*route="(\w+)"\} (\S+)$'
    return {route: float(n) for route, n in re.findall(pattern, text, re.M) if float(n)}


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def measure(model: str, name: str, args: list[str], clients: list[int], opts: Any) -> list[Run]:
    proc, url = start(model, args, opts.ctx, opts.parallel)
    runs = []
    try:
        for n in clients:
            # Documents no earlier run on this server has seen: every run starts cold.
            docs = [document(next(_DOC_IDS), opts.sentences) for _ in range(opts.documents)]
            run = Run(name if len(clients) == 1 else f"{name}, {n} clients", n)
            asyncio.run(drive(url, run, docs, opts.turns, opts.max_tokens))
            if "--ray" in args:
                run.routed = routed(url)
            runs.append(run)
            print(table([run.summary()]), file=sys.stderr, flush=True)
    finally:
        stop(proc)
    return runs


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"{r['run']:<24} | {r['clients']:>3} clients | {r['aggregate_tps']:6.1f} t/s | "
            f"TTFT p50/p95 {r['ttft_ms_p50']:>5}/{r['ttft_ms_p95']:>5} ms, later turns "
            f"{r['later_turns_ttft_ms_p50']:>5}/{r['later_turns_ttft_ms_p95']:>5} ms | "
            f"cached {100 * r['cached_share']:4.1f}% | per replica {r['requests_per_replica']}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2:135m")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--documents", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sentences", type=int, default=24, help="document length (~13 tokens each)")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--parallel", type=int, default=8, help="KV cache per replica, in contexts")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    shares = [opts.clients] + [n for n in (opts.clients // 2, opts.clients // 4) if n >= 1]
    runs: list[Run] = []
    runs += measure(opts.model, "single (no Ray)", [], [opts.clients], opts)
    runs += measure(opts.model, "1 replica", ["--ray", "--replicas", "1"], shares, opts)
    runs += measure(opts.model, "2 replicas, prefix", ["--ray", "--replicas", "2"],
                    [opts.clients], opts)  # fmt: skip
    runs += measure(opts.model, "2 replicas, random",
                    ["--ray", "--replicas", "2", "--ray-routing", "random"],
                    [opts.clients], opts)  # fmt: skip
    rows = [r.summary() for r in runs]
    if opts.json:
        meta = {"model": opts.model, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                "turns": opts.turns, "documents": opts.documents,
                "max_tokens": opts.max_tokens, "sentences": opts.sentences}  # fmt: skip
        print(json.dumps({**meta, "runs": rows}, indent=1))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
