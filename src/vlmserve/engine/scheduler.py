"""The scheduler: decides, each step, which requests compute how many tokens and which images get encoded.

One rule: every request's computed tokens catch up with its known tokens (prompt + sampled output), within a
per-step token budget. A decode is a request one token behind; a prefill is one many tokens behind and takes
them in chunks (chunked prefill); a prefix-cache hit simply starts a request with tokens already computed; a
preempted request drops its KV and catches up again from zero (recompute), its output so far included.

Owns the waiting queue and the running list, admission, preemption, stop conditions on token ids, and the
bookkeeping of the KV block pool (kv_cache.py) and the encoder-output cache (encoder_cache.py). Its output is
plain data (`SchedulerOutput`); it does not know tensors, the model, text or the HTTP layer. No torch.

A step is `out = schedule()`, then the runner executes `out`, then `update_from_output(out, sampled)`.
`schedule()` advances `num_computed_tokens` of every scheduled request right away (as vLLM v1 does); the runner
reads the span from `ScheduledRequest.start` / `.num_tokens`. Call `add_request` / `finish_request` between
steps, not between `schedule()` and `update_from_output()`.

Asynchronous scheduling: the next step may be scheduled before the previous one's `update_from_output`. A
request that samples in a step holds a pending token until its update (`num_pending_tokens`); the next
schedule counts it as known, so the request decodes it (the runner takes its id from the device), and a
request whose pending token must end it by length is not scheduled again. A stop that depends on the token's
value (eos, stop ids, stop strings) is found one step late: the extra step's row is computed and dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmserve.engine.encoder_cache import EncoderCacheManager
from vlmserve.engine.kv_cache import KVCacheManager
from vlmserve.engine.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queued_requests requests; the caller should retry later (HTTP 503)."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # KV blocks in the runner's cache, including the reserved null block 0
    block_size: int = 16  # tokens per KV block
    max_model_len: int = 32768  # prompt + output tokens of one sequence
    max_num_seqs: int = 256  # requests in one batch
    max_num_batched_tokens: int = 8192  # tokens computed per step, over all requests
    enable_prefix_caching: bool = True
    encoder_cache_size: int = 16384  # vision-encoder output rows (= image placeholder tokens) kept cached
    # Image tokens encoded per step; None means max_num_batched_tokens.
    max_encoder_tokens_per_step: int | None = None
    # Cap on one request's prefill chunk per step (None: only the token budget caps it), so that one long
    # prompt cannot take a whole step from the other prefills.
    long_prefill_token_threshold: int | None = None
    max_queued_requests: int | None = None  # waiting requests before add_request raises QueueFullError

    def __post_init__(self) -> None:
        positive = {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_encoder_tokens_per_step": self.max_encoder_tokens_per_step,
            "long_prefill_token_threshold": self.long_prefill_token_threshold,
            "max_queued_requests": self.max_queued_requests,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.encoder_cache_size < 0:
            raise ValueError(f"encoder_cache_size must be >= 0, got {self.encoder_cache_size}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), or a step could not give every running request its token; "
                "raise max_num_batched_tokens or lower max_num_seqs"
            )
        # One sequence of max_model_len must fit alone, or a long request could be preempted forever.
        needed = -(-self.max_model_len // self.block_size)
        if self.num_blocks - 1 < needed:
            raise ValueError(
                f"the KV cache has {self.num_blocks - 1} usable blocks of {self.block_size} tokens "
                f"({(self.num_blocks - 1) * self.block_size} tokens), but one sequence of "
                f"max_model_len={self.max_model_len} needs {needed} blocks; lower max_model_len or give the "
                "KV cache more memory (gpu_memory_utilization, kv_cache_memory_gb or num_kv_blocks)"
            )

    @property
    def encoder_tokens_per_step(self) -> int:
        if self.max_encoder_tokens_per_step is None:
            return self.max_num_batched_tokens
        return self.max_encoder_tokens_per_step


@dataclass
class ScheduledRequest:
    request: Request  # the runner reads its tokens, block table, images, positions and sampling params
    start: int  # num_computed_tokens before this step: compute all_token_ids[start : start + num_tokens]
    num_tokens: int
    sample: bool  # the step completes the known tokens: sample one new token from the last position


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # batch order
    # (request, index into request.images) to encode before the forward; each hash appears once per step.
    encoder_inputs: list[tuple[Request, int]] = field(default_factory=list)
    # Encoder outputs to drop. The runner frees these BEFORE encoding `encoder_inputs` (a hash evicted and
    # needed again in the same step appears in both).
    free_encoder_hashes: list[str] = field(default_factory=list)
    # Requests gone for good since the last step (finished, aborted): drop all per-request state.
    finished_request_ids: list[str] = field(default_factory=list)
    # Requests preempted in this step: their blocks are gone and their KV will be recomputed from token 0,
    # but they come back under the same id, so keep state that outlives KV (e.g. a seeded generator).
    preempted_request_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Token masks of the constrained requests that sample in this step: an engine/structured.PendingBitmask
    # attached by the engine after scheduling, `resolve()`d by the sampler; None when none is constrained.
    grammar_bitmask: Any = None


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of usable blocks held by requests
    num_free_blocks: int
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    encoder_cache_usage: float
    images_encoded: int = 0  # images run through the vision encoder
    encoder_cache_hits: int = 0  # images whose encoder output a request found cached

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: Sequence[int] = ()) -> None:
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache = EncoderCacheManager(config.encoder_cache_size)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order = priority order; preemption takes from the end
        self.num_preemptions = 0
        self._finished_ids: list[str] = []

    # --- intake ----------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.add_requests([request])

    def add_requests(self, requests: Sequence[Request]) -> None:
        """Queue requests, all or none (the n children of one request are added together)."""
        for request in requests:
            self._validate(request)
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique within one add_requests call")
        limit = self.config.max_queued_requests
        if limit is not None and len(self.waiting) + len(requests) > limit:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)} waiting, max_queued_requests={limit}); "
                "retry later, or raise max_queued_requests"
            )
        for request in requests:
            request.status = RequestStatus.WAITING
            self.requests[request.request_id] = request
            self.waiting.append(request)

    def _validate(self, request: Request) -> None:
        cfg = self.config
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use by an unfinished request")
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        if request.num_prompt_tokens > cfg.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens, more than max_model_len={cfg.max_model_len}; "
                "shorten the prompt (less text, fewer or smaller images) or raise max_model_len"
            )
        end = 0
        for img in request.images:
            if img.length < 1 or img.offset < end or img.offset + img.length > request.num_prompt_tokens:
                raise ValueError(
                    f"image {img.mm_hash}: placeholder span [{img.offset}, {img.offset + img.length}) must be "
                    f"non-empty, inside the prompt ({request.num_prompt_tokens} tokens) and not overlap "
                    "another image"
                )
            end = img.offset + img.length
            limit = min(cfg.encoder_cache_size, cfg.encoder_tokens_per_step)
            if img.length > limit:
                raise ValueError(
                    f"an image takes {img.length} tokens, more than the encoder can hold at once "
                    f"(encoder_cache_size={cfg.encoder_cache_size}, max_encoder_tokens_per_step="
                    f"{cfg.encoder_tokens_per_step}); send a smaller image (or lower max_pixels) or raise both limits"
                )

    # --- scheduling ------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens
        encoder_budget = cfg.encoder_tokens_per_step

        # 1. Running requests, in admission order. A prefill chunk leaves one token for every decode behind
        # it, so decodes are never stalled by a long prompt (chunks are otherwise only limited by budget).
        decodes_behind = sum(1 for r in self.running if _remaining(r) == 1)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = _remaining(req)
            if req.num_pending_tokens and self._ends_by_length(req):
                # Its pending token is its last: nothing more to compute (its update finishes it).
                if remaining == 1:
                    decodes_behind -= 1
                i += 1
                continue
            if remaining == 1:
                decodes_behind -= 1
                num_tokens = 1
            else:
                num_tokens = self._cap_prefill(remaining, budget - decodes_behind)
            num_tokens, to_encode, to_ref = self._plan_encoder(
                req, req.num_computed_tokens, num_tokens, encoder_budget
            )
            if num_tokens == 0:
                i += 1
                continue
            scheduled = True
            while not self.kv.allocate_slots(req, num_tokens):
                victim = self.running.pop()  # the lowest priority: later than req, or req itself
                if victim is not req and _remaining(victim) == 1:
                    decodes_behind -= 1
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break  # req was the last running request
            encoder_budget -= self._commit_encoder(req, to_encode, to_ref, out)
            budget -= self._schedule_tokens(req, num_tokens, out)
            i += 1

        # 2. Waiting requests, first come first served; none after a preemption (there is no room for them).
        if not out.preempted_request_ids:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                req = self.waiting[0]
                if self._waits_for_sibling(req) or not req.ready:
                    skipped.append(self.waiting.popleft())
                    continue
                hit_blocks, num_hit = self.kv.get_computed_blocks(req)
                num_tokens = self._cap_prefill(req.num_tokens - num_hit, budget)
                num_tokens, to_encode, to_ref = self._plan_encoder(req, num_hit, num_tokens, encoder_budget)
                if num_tokens == 0 or not self.kv.allocate_slots(req, num_tokens, hit_blocks):
                    break
                self.waiting.popleft()
                self.kv.record_prefix_lookup(req.num_tokens, num_hit)
                req.num_computed_tokens = num_hit
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                    req.num_cached_tokens = num_hit
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                encoder_budget -= self._commit_encoder(req, to_encode, to_ref, out)
                budget -= self._schedule_tokens(req, num_tokens, out)
            self.waiting.extendleft(reversed(skipped))

        out.num_batched_tokens = cfg.max_num_batched_tokens - budget
        out.free_encoder_hashes = self.encoder_cache.take_freed()
        out.finished_request_ids, self._finished_ids = self._finished_ids, []
        return out

    def _cap_prefill(self, remaining: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold is not None:
            remaining = min(remaining, threshold)
        return max(min(remaining, budget), 0)

    def _waits_for_sibling(self, req: Request) -> bool:
        """n > 1: hold a sibling back until the first child has sampled, i.e. its prompt blocks are cached."""
        if req.wait_for is None or not self.config.enable_prefix_caching:
            return False
        first = self.requests.get(req.wait_for)
        return first is not None and first.num_output_tokens == 0

    def _plan_encoder(
        self, req: Request, start: int, num_tokens: int, encoder_budget: int
    ) -> tuple[int, list[int], set[str]]:
        """Which images the span [start, start + num_tokens) needs: (num_tokens, possibly shortened to stop
        before an image that cannot be encoded this step; image indices to encode; cached hashes to reference).
        Changes nothing."""
        if not req.images or num_tokens == 0:
            return num_tokens, [], set()
        end = start + num_tokens
        overlapping = [
            i for i, img in enumerate(req.images) if img.offset < end and img.offset + img.length > start
        ]
        # Everything cached that the span touches is pinned: evicting it to make room would defeat the point.
        cached = {
            req.images[i].mm_hash for i in overlapping if self.encoder_cache.is_cached(req.images[i].mm_hash)
        }
        to_encode: list[int] = []
        new_hashes: set[str] = set()
        new_tokens = 0
        for i in overlapping:
            img = req.images[i]
            if img.mm_hash in cached or img.mm_hash in new_hashes:
                continue
            total = new_tokens + img.length
            if total > encoder_budget or not self.encoder_cache.can_allocate(total, pinned=cached):
                num_tokens = max(img.offset - start, 0)
                break
            to_encode.append(i)
            new_hashes.add(img.mm_hash)
            new_tokens = total
        end = start + num_tokens
        to_ref = {
            img.mm_hash for img in req.images if img.offset < end and img.offset + img.length > start
        } & cached
        return num_tokens, to_encode, to_ref

    def _commit_encoder(
        self, req: Request, to_encode: list[int], to_ref: set[str], out: SchedulerOutput
    ) -> int:
        # References first: they pin their entries before allocation may evict.
        for mm_hash in to_ref:
            self.encoder_cache.add_ref(mm_hash, req.request_id)
        num_tokens = 0
        for i in to_encode:
            img = req.images[i]
            self.encoder_cache.allocate(img.mm_hash, img.length, req.request_id)
            out.encoder_inputs.append((req, i))
            num_tokens += img.length
        return num_tokens

    def _schedule_tokens(self, req: Request, num_tokens: int, out: SchedulerOutput) -> int:
        start = req.num_computed_tokens
        req.num_computed_tokens = start + num_tokens
        sample = req.num_computed_tokens == req.num_tokens + req.num_pending_tokens
        if sample:
            req.num_pending_tokens += 1
        out.scheduled.append(ScheduledRequest(req, start, num_tokens, sample))
        return num_tokens

    def _ends_by_length(self, req: Request) -> bool:
        """Whether the request's known and pending tokens already reach max_tokens or max_model_len."""
        max_tokens = req.sampling_params.max_tokens
        n = req.num_pending_tokens
        return (max_tokens is not None and req.num_output_tokens + n >= max_tokens) or (
            req.num_tokens + n >= self.config.max_model_len
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self.encoder_cache.release_request(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # --- after the step --------------------------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Request]:
        """Apply one executed step: append sampled tokens, cache the now-computed full blocks, release passed
        images, finish requests that hit a stop condition (their blocks are freed, status and stop_reason set).
        Returns the requests that got a new token, finished or not, for detokenization.

        With asynchronous scheduling, a later step has been scheduled already: a request may have been
        preempted since (its token still counts) or finished (nothing of this step counts)."""
        updated: list[Request] = []
        for scheduled in output.scheduled:
            req = scheduled.request
            if req.status is RequestStatus.RUNNING:
                # Blocks computed by this step (a later one may be scheduled already, and may yet fail) whose
                # token ids are all known get a prefix-cache hash.
                done = min(scheduled.start + scheduled.num_tokens, req.num_tokens)
                self.kv.cache_full_blocks(req, done)
                self._release_passed_images(req)
            elif req.status is not RequestStatus.PREEMPTED:
                continue  # finished by finish_request after schedule(); its blocks are already gone
            if not scheduled.sample:
                continue
            token = sampled.get(req.request_id)
            if token is None:
                raise KeyError(
                    f"the runner returned no token for request {req.request_id!r}, scheduled to sample"
                )
            req.num_pending_tokens -= 1
            req.append_output_token(token)
            updated.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                (self.running if req.status is RequestStatus.RUNNING else self.waiting).remove(req)
                self._finish(req, status)
        return updated

    def _release_passed_images(self, req: Request) -> None:
        for mm_hash in self.encoder_cache.hashes_of(req.request_id):
            ends = [img.offset + img.length for img in req.images if img.mm_hash == mm_hash]
            if max(ends) <= req.num_computed_tokens:
                self.encoder_cache.release(mm_hash, req.request_id)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        """Stop conditions in order: eos, stop_token_ids, max_tokens, max_model_len.

        eos and stop_token_ids only count once more than min_tokens tokens exist: the sampler masks them for
        the first min_tokens tokens, and a runner that does not must not be able to end the request early.
        """
        params = req.sampling_params
        if req.num_output_tokens > params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED  # stop_reason stays None for eos, as in vLLM
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and req.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # --- finishing -------------------------------------------------------------------------------------

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish a request from outside the step: abort, error, or a stop string the detokenizer found.

        Safe for an unknown or already finished id (returns None) and for a waiting or running request.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        if stop_reason is not None:
            req.stop_reason = stop_reason
        self._finish(req, status)
        return req

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.kv.free(req)
        self.encoder_cache.release_request(req.request_id)
        req.status = status
        req.finished_time = time.monotonic()
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    # --- introspection ---------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request_counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.kv.prefix_cache_hit_rate

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            encoder_cache_usage=self.encoder_cache.usage,
            images_encoded=self.encoder_cache.num_encoded,
            encoder_cache_hits=self.encoder_cache.num_hits,
        )


def _remaining(req: Request) -> int:
    """Tokens the request has (known or pending) whose KV is not computed (or scheduled) yet."""
    return req.num_tokens + req.num_pending_tokens - req.num_computed_tokens
