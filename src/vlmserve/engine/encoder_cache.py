"""Accounting for the vision-encoder output cache: which image hashes have outputs, who needs them, how full.

The runner holds the tensors (keyed by mm_hash); this class only mirrors which hashes are there, their size in
embedding rows (= placeholder tokens), and which requests reference each. It does not know tensors, requests'
token counters or when to encode (scheduler.py decides).

Lifecycle of an entry: `allocate` when the scheduler lists the image for encoding (the space is reserved from
then on, so a second request in the same step just references it); a request holds a reference from when a
scheduled span first overlaps the image until its computed tokens pass the image's end; an entry nobody
references stays cached (an image seen again is never re-encoded) and is evicted least-recently-released
first when space is needed. Evicted hashes are collected for the scheduler's output so the runner frees them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class _Entry:
    num_tokens: int
    refs: set[str] = field(default_factory=set)  # request ids


class EncoderCacheManager:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"encoder cache capacity must be >= 0 tokens, got {capacity}")
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}
        self._unreferenced: OrderedDict[str, None] = OrderedDict()  # evictable, least recently released first
        self._by_request: dict[str, set[str]] = {}  # request id -> hashes it references
        self._num_used = 0  # tokens in entries, referenced or not
        self._num_evictable = 0  # tokens in unreferenced entries
        self._freed: list[str] = []  # evicted since the last take_freed()
        self.num_encoded = 0  # images given to the encoder (cache misses)
        self.num_hits = 0  # images a request found cached (encoded for another request, or earlier)

    # --- queries ---------------------------------------------------------------------------------------

    def is_cached(self, mm_hash: str) -> bool:
        """True when the output exists or is scheduled to be computed (the runner encodes before the forward)."""
        return mm_hash in self._entries

    def can_allocate(self, num_tokens: int, pinned: Collection[str] = ()) -> bool:
        """Whether `num_tokens` fit after evicting unreferenced entries other than `pinned` (hashes the caller
        is about to reference, which must survive)."""
        evictable = self._num_evictable - sum(
            self._entries[h].num_tokens for h in pinned if h in self._unreferenced
        )
        return num_tokens <= self.capacity - self._num_used + evictable

    def hashes_of(self, request_id: str) -> set[str]:
        return set(self._by_request.get(request_id, ()))

    @property
    def num_used_tokens(self) -> int:
        return self._num_used

    @property
    def usage(self) -> float:
        return self._num_used / self.capacity if self.capacity else 0.0

    @property
    def num_referencing_requests(self) -> int:
        return len(self._by_request)

    # --- updates ---------------------------------------------------------------------------------------

    def allocate(self, mm_hash: str, num_tokens: int, request_id: str) -> None:
        """Reserve space for an image about to be encoded, evicting unreferenced entries as needed."""
        if mm_hash in self._entries:
            raise ValueError(f"encoder output {mm_hash} is already cached; reference it with add_ref")
        if not self.can_allocate(num_tokens):
            raise RuntimeError(
                f"encoder cache cannot fit {num_tokens} tokens (capacity {self.capacity}, "
                f"used {self._num_used}, evictable {self._num_evictable}); check can_allocate first"
            )
        while self.capacity - self._num_used < num_tokens:
            victim, _ = self._unreferenced.popitem(last=False)
            entry = self._entries.pop(victim)
            self._num_used -= entry.num_tokens
            self._num_evictable -= entry.num_tokens
            self._freed.append(victim)
        self._entries[mm_hash] = _Entry(num_tokens, {request_id})
        self.num_encoded += 1
        self._num_used += num_tokens
        self._by_request.setdefault(request_id, set()).add(mm_hash)

    def add_ref(self, mm_hash: str, request_id: str) -> None:
        entry = self._entries[mm_hash]
        if request_id in entry.refs:
            return
        self.num_hits += 1
        if not entry.refs:
            del self._unreferenced[mm_hash]
            self._num_evictable -= entry.num_tokens
        entry.refs.add(request_id)
        self._by_request.setdefault(request_id, set()).add(mm_hash)

    def release(self, mm_hash: str, request_id: str) -> None:
        """Drop one request's reference; the output stays cached, evictable once nobody references it."""
        entry = self._entries.get(mm_hash)
        if entry is None or request_id not in entry.refs:
            return
        entry.refs.discard(request_id)
        held = self._by_request[request_id]
        held.discard(mm_hash)
        if not held:
            del self._by_request[request_id]
        if not entry.refs:
            self._unreferenced[mm_hash] = None
            self._num_evictable += entry.num_tokens

    def release_request(self, request_id: str) -> None:
        for mm_hash in self.hashes_of(request_id):
            self.release(mm_hash, request_id)

    def take_freed(self) -> list[str]:
        """Hashes evicted since the last call; the runner must drop their outputs."""
        freed, self._freed = self._freed, []
        return freed
