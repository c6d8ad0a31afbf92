"""Counters and latency histograms the engine exposes to front ends."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds, Prometheus style (the last bucket is +Inf).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "buckets": dict(zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True)),
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
    steps: int = 0
    preemptions: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def snapshot(
        self, running: int, waiting: int, kv_usage: float, prefix: dict[str, int]
    ) -> dict[str, Any]:
        with self._lock:
            return {
                "running": running,
                "waiting": waiting,
                "kv_usage_percent": round(100 * kv_usage, 2),
                "prefix_cache": prefix,
                "requests_received": self.requests_received,
                "requests_finished": self.requests_finished,
                "tokens_processed": self.tokens_processed,
                "tokens_generated": self.tokens_generated,
                "steps": self.steps,
                "preemptions": self.preemptions,
                "ttft_seconds": self.ttft.as_dict(),
                "inter_token_latency_seconds": self.itl.as_dict(),
            }
