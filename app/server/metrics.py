"""GET /metrics: Prometheus text from the engines' own counters (names modelled on vLLM's).

A collector reads each loaded model's snapshot when scraped, so nothing is counted twice and
a model unloaded and loaded again simply restarts its counters (Prometheus handles resets).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from llmapp.runtime.core.metrics import HISTOGRAMS

if TYPE_CHECKING:
    from llmapp.app.server.pool import ModelPool

P = "llmapp:"
_GAUGES = [
    ("num_requests_running", "Requests in the running batch.", lambda s: s["running"]),
    ("num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s["waiting"]),
    ("kv_cache_usage_perc", "KV cache usage (1 = full).", lambda s: s["kv_usage_percent"] / 100),
]
_COUNTERS = [
    ("prompt_tokens", "Prompt tokens of finished requests.", lambda s: s["prompt_tokens"]),
    ("generation_tokens", "Generated tokens.", lambda s: s["tokens_generated"]),
    ("num_preemptions", "Sequences preempted for lack of KV blocks.", lambda s: s["preemptions"]),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     lambda s: s["prefix_cache"]["query_tokens"]),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     lambda s: s["prefix_cache"]["hit_tokens"]),
    ("spec_decode_num_draft_tokens", "Speculative draft tokens verified.",
     lambda s: s["spec_decode_num_draft_tokens"]),
    ("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.",
     lambda s: s["spec_decode_num_accepted_tokens"]),
]  # fmt: skip


class PoolCollector(Collector):
    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        rows = [([self.pool.public_name(m.name)], m.engine.metrics_snapshot())
                for m in self.pool.loaded()]  # fmt: skip
        yield from snapshot_families(rows, ["model_name"])


def snapshot_families(
    rows: list[tuple[list[str], dict[str, Any]]], label_names: list[str]
) -> Iterator[Metric]:
    """Every llmapp:* family from engine snapshots: one series per row of label values
    (a cluster adds a `replica` label to `model_name`)."""
    for name, doc, read in _GAUGES:
        family = GaugeMetricFamily(P + name, doc, labels=label_names)
        for labels, snap in rows:
            family.add_metric(labels, float(read(snap)))
        yield family
    for name, doc, read in _COUNTERS:
        counter = CounterMetricFamily(P + name, doc, labels=label_names)
        for labels, snap in rows:
            counter.add_metric(labels, float(read(snap)))
        yield counter
    yield _successes(rows, label_names)
    for hist_name in HISTOGRAMS.values():
        yield _histogram(hist_name, rows, label_names)


def _successes(rows: list[tuple[list[str], dict[str, Any]]], label_names: list[str]) -> Metric:
    family = CounterMetricFamily(
        P + "request_success", "Finished requests by reason.",
        labels=[*label_names, "finished_reason"],
    )  # fmt: skip
    for labels, snap in rows:
        for reason, count in sorted(snap["finished_by_reason"].items()):
            family.add_metric([*labels, reason], float(count))
    return family


def _histogram(
    name: str, rows: list[tuple[list[str], dict[str, Any]]], label_names: list[str]
) -> Metric:
    family = HistogramMetricFamily(P + name, name.replace("_", " "), labels=label_names)
    for labels, snap in rows:
        hist = snap[name]
        buckets = [(le, float(count)) for le, count in hist["buckets"].items()]
        family.add_metric(labels, buckets, sum_value=hist["sum"])
    return family


def metrics_text(pool: ModelPool) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool))
    return generate_latest(registry), CONTENT_TYPE_LATEST
