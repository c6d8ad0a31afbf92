"""`llmapp serve --ray`: the OpenAI server as replicas on Ray Serve, routed by prompt prefix.

Three parts, and only the last needs Ray (app/server/cluster_serve.py):

    HTTP -> Serve proxy -> Ingress (one FastAPI app: keys, CORS, models, metrics; tokenizes
            the prompt and hashes its first blocks) -> PrefixRouter (picks the replica that
            served the same prefix, unless it is busy) -> EngineReplica (the single-machine
            app and ModelPool, one engine with continuous batching)

This module holds what can be tested without Ray: the configuration, the prefix keys (the
prefix cache's own chained block hashes), the index of which replica saw which prefix, the
routing decision, and the Prometheus families for a whole deployment.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmapp.app.server.app import ServerConfig
from llmapp.app.server.metrics import P, snapshot_families
from llmapp.runtime.core.kv_cache import BlockKey, chain_key
from llmapp.runtime.errors import LlmappError

INSTALL_HINT = 'llmapp serve --ray needs Ray Serve: pip install "llmapp[cluster]"'
ROUTINGS = ("prefix", "random")  # random: a baseline for measurements only
BLOCK_SIZE = 16  # the engine's KV block (RunnerOptions.block_size; the pool never changes it)
ROUTES = ("prefix", "fallback_busy", "fallback_miss", "random")


def prepare_ray_environment(address: str | None) -> None:
    """Ray reads these when it is first imported: call before anything imports it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports leave the machine
    if address is None:
        # Ray's single-machine mode: every Ray service binds 127.0.0.1, not the host's
        # address, so nothing of the local instance is reachable from the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def require_ray() -> None:
    try:
        importlib.import_module("ray.serve")
    except ImportError:
        raise LlmappError(INSTALL_HINT) from None


@dataclass(frozen=True)
class ClusterConfig:
    server: ServerConfig
    address: str | None = None  # None: start a local Ray instance on loopback
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    replica_cpus: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8080
    routing: str = "prefix"
    prefix_blocks: int = 32  # blocks of the prompt hashed for routing (512 tokens)
    app_name: str = "llmapp"
    stats_period_s: float = 1.0  # how often replicas report their metrics to the routers

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.autoscale is not None:
            low, high = self.autoscale
            if low < 0 or high < 1 or low > high:
                raise ValueError("--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1")
        if self.replica_cpus <= 0:
            raise ValueError("--replica-cpus must be positive")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}")
        if self.prefix_blocks < 1:
            raise ValueError("prefix_blocks must be at least 1")

    @property
    def min_replicas(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @property
    def capacity(self) -> int:
        """Sequences one replica decodes together: beyond this a request waits in its queue."""
        pool = self.server.pool
        return max(pool.max_num_seqs, pool.parallel)


def parse_autoscale(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"--autoscale wants MIN:MAX (e.g. 1:4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def deployment_name(model: str) -> str:
    """A Serve deployment name for a model's replicas (Serve reserves '#' and friends)."""
    return "engine-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")


# ---- what the ingress sends a replica ------------------------------------------------------


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress received it, for a replica's own app to answer."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # None: not a generation request (not counted in routing); () : nothing to hash.
    prefix_keys: tuple[BlockKey, ...] | None = None


def json_object(body: bytes) -> dict[str, Any]:
    """The body's top-level object, or {} (the replica answers malformed bodies itself)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- prefix keys --------------------------------------------------------------------------


def prefix_keys(
    token_ids: Sequence[int], max_blocks: int, block_size: int = BLOCK_SIZE
) -> tuple[BlockKey, ...]:
    """The prefix cache's keys of the prompt's first full blocks (chained, as the engine
    publishes them), so equal keys mean the engine could reuse those blocks."""
    keys: list[BlockKey] = []
    key: BlockKey | None = None
    for i in range(min(max_blocks, len(token_ids) // block_size)):
        key = chain_key(key, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(key)
    return tuple(keys)


def routing_ids(fields: Mapping[str, Any], tokenizer: Any, template: Any, limit: int) -> list[int]:
    """Prompt token ids of a chat or text completion body, at least the first `limit` of them
    exactly as the engine would encode them (a longer text is cut, and the tokens near the cut
    dropped, since a word split by the cut tokenizes differently)."""
    from llmapp.app.server.completions import chat_messages
    from llmapp.app.server.schemas import ChatCompletionRequest
    from llmapp.runtime.text.chat_template import encode_prompt

    if "messages" in fields:
        body = ChatCompletionRequest.model_validate(fields)
        text = template.render(chat_messages(body), add_generation_prompt=True)
        return _cut(text, limit, lambda t: encode_prompt(tokenizer, t))
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # several prompts: route by the first
    if isinstance(prompt, str):
        return _cut(prompt, limit, lambda t: tokenizer.encode(t, parse_special=False))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    return []


def _cut(text: str, limit: int, encode: Any) -> list[int]:
    # Tokens are far shorter than 64 characters, so this much text holds more than `limit`
    # tokens even after the 32 nearest the cut are dropped.
    max_chars = 64 * (limit + 32)
    if len(text) <= max_chars:
        return list(encode(text))
    return list(encode(text[:max_chars]))[:-32]


# ---- which replica saw which prefix -------------------------------------------------------


class PrefixIndex:
    """Block key -> the replicas that were sent a prompt starting with that block chain.

    Bounded (least recently used keys go first): it only has to remember prefixes that are
    still likely to be in some replica's KV cache.
    """

    def __init__(self, max_keys: int = 65536) -> None:
        self.max_keys = max_keys
        self._holders: OrderedDict[BlockKey, dict[str, None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def match(self, keys: Sequence[BlockKey], live: Collection[str]) -> tuple[int, list[str]]:
        """(blocks matched, live replicas holding them) for the deepest block held anywhere.

        Keys are chained, so a replica holding block d was also sent blocks 1..d.
        """
        for depth in range(len(keys), 0, -1):
            holders = self._holders.get(keys[depth - 1])
            if holders:
                alive = [r for r in holders if r in live]
                if alive:
                    self._holders.move_to_end(keys[depth - 1])
                    return depth, alive
        return 0, []

    def record(self, keys: Sequence[BlockKey], replica: str) -> None:
        for key in keys:
            holders = self._holders.setdefault(key, {})
            holders.pop(replica, None)
            holders[replica] = None  # most recent last
            self._holders.move_to_end(key)
        while len(self._holders) > self.max_keys:
            self._holders.popitem(last=False)

    def forget(self, replica: str) -> None:
        for key in list(self._holders):
            holders = self._holders[key]
            holders.pop(replica, None)
            if not holders:
                del self._holders[key]


@dataclass(frozen=True)
class RoutePolicy:
    capacity: int = 16  # a replica at this load queues new requests: never prefix-route there
    busy_margin: int = 4  # most requests a holder may have beyond the least loaded replica
    min_match_blocks: int = 1

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.busy_margin < 1 or self.min_match_blocks < 1:
            raise ValueError("capacity, busy_margin and min_match_blocks must be >= 1")

    @classmethod
    def for_capacity(cls, capacity: int) -> RoutePolicy:
        return cls(capacity=capacity, busy_margin=max(2, capacity // 4))


def decide(
    keys: Sequence[BlockKey],
    index: PrefixIndex,
    loads: Mapping[str, int],
    policy: RoutePolicy,
    rng: random.Random,
) -> tuple[str, str]:
    """(replica, route) for one request: the least loaded holder of the deepest matching
    prefix unless it is busy, else the least loaded replica (ties broken at random, so equal
    replicas share new conversations).

    Busy means a full batch, or more requests than the least loaded replica by a margin that
    grows with the match: a shared system prompt (a block or two) saves little prefill and
    must not pile requests onto one replica; a conversation's history is worth a few.
    """
    if not loads:
        raise ValueError("no replicas to choose from")
    least = min(loads.values())
    route = "fallback_miss"
    depth, holders = index.match(keys, loads)
    if depth >= policy.min_match_blocks and holders:
        best = min(holders, key=lambda r: loads[r])
        margin = min(policy.busy_margin, max(1, depth // 2))
        if loads[best] < policy.capacity and loads[best] - least < margin:
            return best, "prefix"
        route = "fallback_busy"
    idle = sorted(r for r, load in loads.items() if load == least)
    return rng.choice(idle), route


# ---- metrics for a whole deployment -------------------------------------------------------


@dataclass
class ModelView:
    """What the ingress knows of one model's deployment when /metrics is scraped."""

    model_name: str
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> routing stats
    routes: dict[str, int] = field(default_factory=dict)


class ClusterCollector(Collector):
    def __init__(self, views: list[ModelView]) -> None:
        self.views = views

    def collect(self) -> Iterator[Metric]:
        rows = []
        for view in self.views:
            for replica, stats in sorted(view.replicas.items()):
                for model in stats.get("models", ()):
                    rows.append(([view.model_name, replica], model["snapshot"]))
        yield from snapshot_families(rows, ["model_name", "replica"])
        count = GaugeMetricFamily(
            P + "cluster_replicas", "Engine replicas running.", labels=["model_name"]
        )
        routed = CounterMetricFamily(
            P + "cluster_routed_requests",
            "Generation requests by routing decision: prefix (to the replica that saw the "
            "prefix), fallback_busy (that replica was busy), fallback_miss (no replica had it), "
            "random (the measurement baseline).",
            labels=["model_name", "route"],
        )
        for view in self.views:
            count.add_metric([view.model_name], float(len(view.replicas)))
            for route in ROUTES:
                routed.add_metric([view.model_name, route], float(view.routes.get(route, 0)))
        yield count
        yield routed


def cluster_metrics_text(views: list[ModelView]) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(views))
    return generate_latest(registry), CONTENT_TYPE_LATEST


# The engine deployments' routers living in this process (the ingress), by deployment name.
_ROUTERS: dict[str, weakref.ref[Any]] = {}


def register_router(deployment: str, router: Any) -> None:
    _ROUTERS[deployment] = weakref.ref(router)


def router_for(deployment: str) -> Any | None:
    ref = _ROUTERS.get(deployment)
    return ref() if ref is not None else None


def serve_cluster(config: ClusterConfig) -> int:
    """Run the deployment until Ctrl-C (the CLI's entry point)."""
    prepare_ray_environment(config.address)
    require_ray()
    from llmapp.app.server.cluster_serve import run

    return run(config)
