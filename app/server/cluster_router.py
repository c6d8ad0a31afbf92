"""The request router of `llmapp serve --ray`'s engine deployments (runs in the ingress).

Serve ships a custom router's whole module to every caller by value (cloudpickle), so this
module holds the router alone, and its per-process state is registered with cluster.py, which
is imported normally: the ingress finds the router there for /metrics and /health.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from llmapp.app.server.cluster import (
    Forwarded,
    PrefixIndex,
    RoutePolicy,
    decide,
    register_router,
)


class PrefixRouter(RequestRouter):
    """Sends a request to the replica that was sent the same prompt prefix, unless it is busy.

    Load is counted here, per replica, from the requests this router sent and has not seen
    finish: exact for one ingress, and free of the staleness of probed queue lengths.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._deployment = str(kwargs["deployment"])
        self._routing = str(kwargs.get("routing", "prefix"))
        self._policy = RoutePolicy(**kwargs.get("policy", {}))
        self._index = PrefixIndex()
        self._loads: dict[str, int] = {}
        # internal request id -> (replica, the routing future: cancelled if the caller left)
        self._reserved: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        self._routes: Counter[str] = Counter()
        self._live: set[str] = set()
        self._rng = random.Random()
        # choose_replicas runs on the handle's loop thread; /metrics reads from the ingress's.
        self._lock = threading.Lock()
        register_router(self._deployment, self)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        keys = _keys_of(pending_request)
        with self._lock:
            self._release_abandoned()
            loads = {rid: self._loads.get(rid, 0) for rid in by_id}
            chosen, route = self._choose(keys, loads)
            if pending_request is not None:
                self._reserve(pending_request, chosen, route)
        # Ranks: the choice, then the rest by load, should the choice refuse (queue full).
        rest = sorted((r for rid, r in by_id.items() if rid != chosen),
                      key=lambda r: loads[r.replica_id.unique_id])  # fmt: skip
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    def _choose(
        self, keys: tuple[bytes, ...] | None, loads: dict[str, int]
    ) -> tuple[str, str | None]:
        if keys is None:  # not a generation request: any replica, the least loaded
            least = min(loads.values())
            return self._rng.choice(sorted(r for r, n in loads.items() if n == least)), None
        if self._routing == "random":
            return self._rng.choice(sorted(loads)), "random"
        chosen, route = decide(keys, self._index, loads, self._policy, self._rng)
        self._index.record(keys, chosen)
        return chosen, route

    def _reserve(self, request: PendingRequest, replica: str, route: str | None) -> None:
        rid = request.metadata.internal_request_id
        previous = self._reserved.pop(rid, None)
        if previous is not None:  # routed again (refused, or backing off): move the load
            self._release(previous[0])
        elif route is not None:
            self._routes[route] += 1
        self._reserved[rid] = (replica, request.future)
        self._loads[replica] = self._loads.get(replica, 0) + 1

    def _release(self, replica: str) -> None:
        if self._loads.get(replica, 0) > 0:
            self._loads[replica] -= 1

    def _release_abandoned(self) -> None:
        """Requests whose caller went away before they were sent never complete."""
        for rid, (replica, future) in list(self._reserved.items()):
            if future.cancelled():
                del self._reserved[rid]
                self._release(replica)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        with self._lock:
            reserved = self._reserved.pop(internal_request_id, None)
            if reserved is not None:
                self._release(reserved[0])

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        with self._lock:
            for gone in self._live - live:
                self._loads.pop(gone, None)
                self._index.forget(gone)
            self._live = live

    def view(self) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """(replica id -> its last reported stats, routing decisions so far)."""
        replicas = list(self.curr_replicas.values())
        with self._lock:
            routes = dict(self._routes)
        return {r.replica_id.unique_id: dict(r.routing_stats) for r in replicas}, routes


def _keys_of(request: PendingRequest | None) -> tuple[bytes, ...] | None:
    if request is None or not request.args or not isinstance(request.args[0], Forwarded):
        return None
    return request.args[0].prefix_keys
