"""The engine's state for one sequence: its tokens, how many of them have KV computed, its block table.

Owns the per-request counters the scheduler works with (`num_computed_tokens` catches up with
`num_tokens`), the status machine, and the bookkeeping for usage and latency metrics. It does not know how
blocks are chosen (kv_cache.py), when it runs (scheduler.py) or what its tokens mean as text
(detokenizer.py). No torch: `mrope_positions` and `ImageFeature.data` are carried through opaquely for the
runner.

`n > 1`: the engine turns one EngineRequest into n child Requests (`requests_from_engine_request`), with ids
`f"{request_id}-{i}"`. Children 1..n-1 carry `wait_for = f"{request_id}-0"`: the scheduler keeps them waiting
until child 0 has produced its first token, by which time child 0's prompt blocks are in the prefix cache and
the siblings compute only their last partial block.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from vlmserve.engine.inputs import EngineRequest, ImageFeature
from vlmserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, blocks freed, will be recomputed
    FINISHED_STOPPED = "finished_stopped"  # eos, a stop token id or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"  # the client went away or cancelled
    FINISHED_ERROR = "finished_error"  # the engine could not run it

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's `finish_reason` for a finished status, None while the request is alive."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


# Identity equality: the scheduler keeps requests in lists and removes them by identity. Token lists, hashes
# and the multimodal payload stay out of the repr, which would otherwise print whole prompts.
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int] = field(repr=False)
    sampling_params: SamplingParams = field(repr=False)
    images: list[ImageFeature] = field(default_factory=list, repr=False)
    mrope_positions: Any = field(default=None, repr=False)  # (3, num_prompt_tokens) for the runner; opaque
    mrope_delta: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: the id of the sibling whose prompt blocks this one should reuse; see the module docstring.
    wait_for: str | None = None
    parent_id: str | None = None  # the EngineRequest id when this is one of n > 1 children
    index: int = 0  # which of the n choices this is (OpenAI's `choices[i].index`)
    # False while the engine still prepares something the request needs before it can run (its output
    # grammar is compiling): the scheduler leaves it waiting and schedules the others.
    ready: bool = True

    # --- state, owned by the scheduler -----------------------------------------------------------------
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False, repr=False)
    # prompt + output; grows in place so the runner can read it without copies.
    all_token_ids: list[int] = field(init=False, repr=False)
    # Tokens whose KV is (or, once the scheduled step has run, will be) in this request's blocks.
    num_computed_tokens: int = field(default=0, init=False)
    # Sampled by a step that is still running (asynchronous scheduling): the token exists but its id is not
    # known on the host yet. 0 or 1; the next step computes its KV from the id on the device.
    num_pending_tokens: int = field(default=0, init=False)
    block_ids: list[int] = field(default_factory=list, init=False, repr=False)  # the block table
    # Prefix-cache hashes of this request's full blocks, computed lazily by the KV cache manager; they stay
    # valid across preemption because tokens never change once known.
    block_hashes: list[bytes] = field(default_factory=list, init=False, repr=False)
    num_cached_tokens: int = field(
        default=0, init=False
    )  # prefix-cache hit at first scheduling (usage stats)
    stop_reason: int | str | None = field(
        default=None, init=False
    )  # stop token id or stop string; None for eos
    num_preemptions: int = field(default=0, init=False)
    first_scheduled_time: float | None = field(default=None, init=False)
    first_token_time: float | None = field(default=None, init=False)
    finished_time: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)
        # The scheduler walks images in prompt order and the runner indexes them by position in this list.
        self.images = sorted(self.images, key=lambda img: img.offset)

    @classmethod
    def from_engine_request(
        cls,
        engine_request: EngineRequest,
        *,
        request_id: str | None = None,
        sampling_params: SamplingParams | None = None,
        wait_for: str | None = None,
        parent_id: str | None = None,
        index: int = 0,
    ) -> Request:
        return cls(
            request_id=engine_request.request_id if request_id is None else request_id,
            prompt_token_ids=engine_request.prompt_token_ids,
            sampling_params=engine_request.sampling_params if sampling_params is None else sampling_params,
            images=list(engine_request.images),
            mrope_positions=engine_request.mrope_positions,
            mrope_delta=engine_request.mrope_delta,
            arrival_time=engine_request.arrival_time,
            wait_for=wait_for,
            parent_id=parent_id,
            index=index,
        )

    # --- derived counters ------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_image_tokens(self) -> int:
        return sum(img.length for img in self.images)

    @property
    def num_cached_image_tokens(self) -> int:
        """Image placeholder tokens inside the prefix-cache hit (usage stats)."""
        hit = self.num_cached_tokens
        return sum(max(0, min(img.offset + img.length, hit) - img.offset) for img in self.images)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()


def child_request_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


def requests_from_engine_request(engine_request: EngineRequest) -> list[Request]:
    """One Request for n == 1 (same id); n children `f"{id}-{i}"` with n = 1 each for n > 1.

    Children 1..n-1 wait for child 0 (prefix-cache reuse of the prompt). A seeded request gives child i the
    seed `seed + i`: the same seed on every child would make all n choices identical.
    """
    params = engine_request.sampling_params
    if params.n == 1:
        return [Request.from_engine_request(engine_request)]
    first = child_request_id(engine_request.request_id, 0)
    children = []
    for i in range(params.n):
        seed = None if params.seed is None else params.seed + i
        children.append(
            Request.from_engine_request(
                engine_request,
                request_id=child_request_id(engine_request.request_id, i),
                sampling_params=dataclasses.replace(params, n=1, seed=seed),
                wait_for=None if i == 0 else first,
                parent_id=engine_request.request_id,
                index=i,
            )
        )
    return children
