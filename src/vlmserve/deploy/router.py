"""Image-aware replica routing: a chat request goes to the replica that already holds its image's encoder
output and prompt prefix.

A replica's engine caches the vision encoder's output per image and the KV of prompt prefixes (their block
hashes include the images' content). Ray Serve's default router (power of two choices) spreads requests
evenly, so with R replicas a repeated image is encoded R times and its prefix is cached R times. Here:

    affinity_key(body)   the ingress's key of a chat request: a hash of its first image (the URL text as
                         sent: for a data: URL its base64 bytes, so nothing is decoded in the ingress) and of
                         the system / developer messages before it (the prompt prefix requests share). None
                         for a request without images.
    AffinityPolicy       plain data, no Ray: key -> replica in a bounded LRU table, in-flight counts per
                         replica (this ingress's requests: each ingress replica routes on its own view). A key goes to its replica ("hit") unless that replica has `spill_margin`
                         more requests in flight than the least loaded one ("spill": the least loaded takes
                         it, so a hot image cannot pile one replica up while another idles); a new key, or
                         one whose replica is gone, goes to the least loaded replica and stays there ("miss");
                         a request without a key goes to the least loaded replica ("unkeyed").
    ImageAffinityRouter  the policy as a Ray Serve `RequestRouter` (Ray Serve's custom router API, public in
                         ray.serve.request_router of the pinned Ray 2.60). It
                         runs inside the ingress's deployment handle; the key travels as the `routing_key`
                         keyword of LLMServer.chat. The chosen replica is ranked first and the others after
                         it by load, so a replica that rejects (at max_ongoing_requests) passes the request
                         on instead of stalling it.
    routing_stats(name)  the routed-request counters of a deployment's routers in this process, which the
                         ingress adds to /metrics (vlmserve:router_affinity_*_total).

Does not know: how replicas run requests, HTTP, deployment options (builder.py).
"""

from __future__ import annotations

import hashlib
import importlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from vlmserve.api.protocol import ChatCompletionRequest

ROUTING_KEY_KWARG = "routing_key"
# A call with this keyword goes to the replica it names (an ingress's delta channel, LLMServer.deltas).
REPLICA_PIN_KWARG = "replica_pin"
# LLMServer's methods that serve a request (the others are control calls: model_info, tokenize, ...).
_REQUEST_METHODS = frozenset({"chat", "generate"})
# A key's replica keeps it until it has this many more requests in flight than the least loaded replica.
DEFAULT_SPILL_MARGIN = 8
# Keys remembered (LRU); an entry is ~200 bytes.
DEFAULT_MAX_KEYS = 16_384

# Decisions kept for requests Ray has not sent yet (a request cancelled while queued never reports back).
_MAX_PENDING = 65_536

Outcome = Literal["hit", "miss", "spill", "unkeyed"]
OUTCOMES: tuple[Outcome, ...] = ("hit", "miss", "spill", "unkeyed")


def affinity_key(body: ChatCompletionRequest) -> str | None:
    """A hash of the request's first image and of the system / developer text before it; None without
    images. User text is left out: clients put the question before or after the image, and the encoder
    cache serves the image whatever the question is."""
    digest = hashlib.blake2b(digest_size=16)
    for message in body.messages:
        content = message.content
        if isinstance(content, str):
            if message.role in ("system", "developer"):
                digest.update(b"\x00s" + content.encode())
            continue
        for part in content or []:
            if part.type == "text" and message.role in ("system", "developer"):
                digest.update(b"\x00s" + (part.text or "").encode())
            elif part.type == "image_url":
                detail = part.image_url.detail if not isinstance(part.image_url, str) else None
                # detail and mm_processor_kwargs change the pixels the engine sees, so its cache entry.
                digest.update(b"\x00i" + str(detail).encode() + b"\x00" + part.url.encode())
                if body.mm_processor_kwargs is not None:
                    digest.update(b"\x00k" + body.mm_processor_kwargs.model_dump_json().encode())
                return digest.hexdigest()
    return None


@dataclass(frozen=True)
class Decision:
    replica: str
    outcome: Outcome


class AffinityPolicy:
    """Where a request goes, from its key and the replicas' in-flight requests (replicas are plain ids)."""

    def __init__(
        self,
        spill_margin: int = DEFAULT_SPILL_MARGIN,
        max_keys: int = DEFAULT_MAX_KEYS,
        rng: random.Random | None = None,
    ) -> None:
        if spill_margin < 1 or max_keys < 1:
            raise ValueError(
                f"request_router_kwargs: spill_margin ({spill_margin}) and max_keys ({max_keys}) must be >= 1"
            )
        self.spill_margin = spill_margin
        self.max_keys = max_keys
        self._table: OrderedDict[str, str] = OrderedDict()
        self.in_flight: dict[str, int] = {}
        self._rng = rng or random.Random()

    def __len__(self) -> int:
        return len(self._table)

    def replica_of(self, key: str) -> str | None:
        return self._table.get(key)

    def least_loaded(self, replicas: Sequence[str]) -> str:
        low = min(self.in_flight.get(r, 0) for r in replicas)
        return self._rng.choice([r for r in replicas if self.in_flight.get(r, 0) == low])

    def choose(self, key: str | None, replicas: Sequence[str]) -> Decision:
        """The replica for a request with `key`, among `replicas` (non-empty). Does not record anything:
        `routed` does, once Ray has sent the request (it may go elsewhere if the replica rejects it)."""
        least = self.least_loaded(replicas)
        if key is None:
            return Decision(least, "unkeyed")
        home = self._table.get(key)
        if home is None or home not in replicas:
            return Decision(least, "miss")
        if self.in_flight.get(home, 0) - self.in_flight.get(least, 0) >= self.spill_margin:
            return Decision(least, "spill")
        return Decision(home, "hit")

    def routed(self, key: str | None, replica: str, outcome: Outcome) -> None:
        """A request went to `replica`: count it in flight; a miss makes `replica` its key's home. A hit
        or spill refreshes the key's place in the LRU order."""
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1
        if key is None:
            return
        if outcome == "miss" or key not in self._table:
            self._table[key] = replica
        self._table.move_to_end(key)
        while len(self._table) > self.max_keys:
            self._table.popitem(last=False)

    def completed(self, replica: str) -> None:
        left = self.in_flight.get(replica, 0) - 1
        if left > 0:
            self.in_flight[replica] = left
        else:
            self.in_flight.pop(replica, None)

    def forget_replica(self, replica: str) -> None:
        """A replica left: its keys become misses (re-homed on their next request)."""
        self.in_flight.pop(replica, None)
        for key in [k for k, r in self._table.items() if r == replica]:
            del self._table[key]


# Counters per deployment name, summed over the routers of this process (the ingress's handles).
_STATS: dict[str, dict[Outcome, int]] = {}


def routing_stats(deployment_name: str) -> dict[str, float]:
    """vlmserve:router_affinity_* counters of a deployment (empty when no router of it ran here)."""
    counts = _STATS.get(deployment_name)
    if counts is None:
        return {}
    return {f"router_affinity_{outcome}_total": float(counts[outcome]) for outcome in OUTCOMES}


class ImageAffinityRouter(RequestRouter):
    """`AffinityPolicy` as Ray Serve's request router of a model's LLMServer deployment."""

    def initialize_state(
        self, spill_margin: int = DEFAULT_SPILL_MARGIN, max_keys: int = DEFAULT_MAX_KEYS, **_: Any
    ) -> None:
        self.policy = AffinityPolicy(spill_margin=spill_margin, max_keys=max_keys)
        # internal request id -> (key, outcome) until Ray sent it, then -> the replica until it completed
        self._pending: dict[str, tuple[str | None, Outcome]] = {}
        self._routed_to: dict[str, str] = {}
        # NOTE: Ray ships this class to the ingress pickled by value, with a copy of this module's globals; the
        # counters must go to the imported module's _STATS, which routing_stats (in the ingress) reads.
        registry: dict[str, dict[Outcome, int]] = importlib.import_module(__name__)._STATS
        self._counts = registry.setdefault(self._deployment_id.name, dict.fromkeys(OUTCOMES, 0))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = None
        pin = None if pending_request is None else pending_request.kwargs.get(REPLICA_PIN_KWARG)
        if pin is not None:
            # Not counted, not in flight: a channel lives as long as requests use it.
            return [[by_id[pin]]] if pin in by_id else []
        if pending_request is not None:
            key = pending_request.kwargs.get(ROUTING_KEY_KWARG)
            # Every replica is ranked below: once they all rejected, wait before the next round.
            pending_request.routing_context.should_backoff = True
        decision = self.policy.choose(key, list(by_id))
        if pending_request is not None:
            if len(self._pending) >= _MAX_PENDING:  # requests cancelled before Ray sent them
                del self._pending[next(iter(self._pending))]
            self._pending[pending_request.metadata.internal_request_id] = (key, decision.outcome)
        rest = sorted(
            (r for rid, r in by_id.items() if rid != decision.replica),
            key=lambda r: self.policy.in_flight.get(r.replica_id.unique_id, 0),
        )
        return [[by_id[decision.replica]], rest] if rest else [[by_id[decision.replica]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        if request_id not in self._pending:
            return  # a pinned call
        key, outcome = self._pending.pop(request_id)
        replica = replica_id.unique_id
        if key is not None and outcome == "hit" and self.policy.replica_of(key) != replica:
            outcome = "spill"  # its home rejected it (full): another replica took it
        self.policy.routed(key, replica, outcome)
        self._routed_to[request_id] = replica
        # Requests are counted; control calls (model_info, tokenize, ...) are routed the same way, uncounted.
        if pending_request.metadata.call_method in _REQUEST_METHODS:
            self._counts[outcome] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._pending.pop(internal_request_id, None)
        if self._routed_to.pop(internal_request_id, None) is not None:
            self.policy.completed(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self._replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        policy = getattr(self, "policy", None)  # Ray may call this before initialize_state
        for replica_id in gone if policy is not None else ():
            policy.forget_replica(replica_id.unique_id)
