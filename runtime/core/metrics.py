"""Counters and latency histograms the engine exposes to front ends.

Histograms export cumulative buckets (count of observations <= each bound, +Inf last), the
shape Prometheus expects, so a front end can hand them over as they are.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds, Prometheus style (the last bucket is +Inf).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# Histogram names in snapshots: what each one measures, per request unless said otherwise.
HISTOGRAMS = {
    "ttft": "time_to_first_token_seconds",  # arrival -> first token
    "itl": "inter_token_latency_seconds",  # between consecutive tokens
    "e2e": "e2e_request_latency_seconds",  # arrival -> finished
    "queue": "request_queue_time_seconds",  # arrival -> first scheduled
    "prefill": "request_prefill_time_seconds",  # first scheduled -> first token
    "decode": "request_decode_time_seconds",  # first token -> last token
}


@dataclass
class Histogram:
    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0
    samples: list[float] = field(default_factory=list)  # most recent, for percentiles

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1
        self.samples.append(value)
        if len(self.samples) > 4096:
            del self.samples[:2048]

    def percentile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out

    def as_dict(self) -> dict[str, Any]:
        labels = [*map(str, self.bounds), "+Inf"]
        return {
            "buckets": dict(zip(labels, self.cumulative(), strict=True)),
            "count": self.n,
            "sum": self.total,
            "p50": self.percentile(50),
            "p90": self.percentile(90),
        }


@dataclass
class EngineMetrics:
    requests_received: int = 0
    requests_finished: int = 0
    tokens_processed: int = 0  # rows through the model: prompt tokens computed plus decode steps
    tokens_generated: int = 0
    prompt_tokens: int = 0  # prompt tokens of finished requests
    steps: int = 0
    preemptions: int = 0
    spec_drafted: int = 0  # speculative decoding: draft tokens verified, and accepted
    spec_accepted: int = 0
    finished_by_reason: Counter[str] = field(default_factory=Counter)
    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram() for name in HISTOGRAMS}
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self.histograms[name].observe(seconds)

    def record_finish(self, reason: str, prompt_tokens: int) -> None:
        with self._lock:
            self.requests_finished += 1
            self.prompt_tokens += prompt_tokens
            self.finished_by_reason[reason] += 1

    def snapshot(
        self, running: int, waiting: int, kv_usage: float, prefix: dict[str, int]
    ) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "running": running,
                "waiting": waiting,
                "kv_usage_percent": round(100 * kv_usage, 2),
                "prefix_cache": prefix,
                "requests_received": self.requests_received,
                "requests_finished": self.requests_finished,
                "finished_by_reason": dict(self.finished_by_reason),
                "tokens_processed": self.tokens_processed,
                "tokens_generated": self.tokens_generated,
                "prompt_tokens": self.prompt_tokens,
                "steps": self.steps,
                "preemptions": self.preemptions,
                "spec_decode_num_draft_tokens": self.spec_drafted,
                "spec_decode_num_accepted_tokens": self.spec_accepted,
            }
            for short, name in HISTOGRAMS.items():
                out[name] = self.histograms[short].as_dict()
            return out
