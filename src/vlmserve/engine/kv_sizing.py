"""How many KV blocks a GPU holds: memory measured in the largest step the scheduler can produce.

    KV budget = total * gpu_memory_utilization
                - in use with no KV cache (weights, CUDA context and kernels, NCCL, other processes)
                - the largest step's peak activations - the encoder cache's rows beyond that step's images
                - the decode CUDA graphs' memory
    blocks    = KV budget // bytes per block

The engine (EngineCore._load, on CUDA when num_kv_blocks is not given) builds the runner with a cache just
large enough for `LargestStep` and no CUDA graphs, runs the step through the runner's normal path (`measure`:
the real kernels, the real sampler), captures the decode graphs on that cache and drops them to measure their
memory, frees the cache, reads what is in use, and then has the runner allocate the sized cache and capture
its graphs again (`ModelRunner.allocate_kv_cache`): the graphs read the cache at its address.

The largest step: max_num_batched_tokens tokens (at most max_model_len per request) over max_num_seqs requests,
every one of which samples; the vision encoder on as many image tokens as a step may encode, in images as large
as the processor makes (max_encoder_tokens_per_step, encoder_cache_size); and every sampling row with every
sampler feature on (a grammar mask, logprobs at their maximum, penalties, top-k, top-p, min-p), so that the
sampler's (rows, vocabulary) float32 temporaries are at their largest.

Not covered: a prefill chunk's earlier context, and fragmentation across steps. The GPU prefill gathers each
chunk's whole context per layer (runner/triton_attention.py), a transient that grows with how many tokens the
step's chunks already have computed; the profile's chunks start at token 0. And serving steps of other shapes
may leave the caching allocator holding somewhat more than one step's peak (a few percent of the activations).
Both come out of the memory gpu_memory_utilization leaves free.

Tensor parallelism: every rank runs the step and captures the graphs (their collectives meet), rank 0 alone
measures, and every rank gets rank 0's block count: the ranks hold the same shapes. Memory used by other processes
on the other ranks' devices is not seen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from vlmserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from vlmserve.engine.structured import GrammarBitmask
from vlmserve.multimodal import EncoderInput, ImageFeature

if TYPE_CHECKING:
    from vlmserve.runner.model_runner import ModelRunner

GiB = 2**30

# Every sampler feature at once: each adds (rows, vocabulary) temporaries (runner/sampler.py).
PROFILE_SAMPLING = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=50,
    min_p=0.05,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    repetition_penalty=1.1,
    logprobs=MAX_LOGPROBS,
    max_tokens=1,
)


def kv_cache_blocks(
    total: int,
    gpu_memory_utilization: float,
    in_use: int,
    activations: int,
    graphs: int,
    per_block: int,
) -> int:
    """KV blocks that fit in `total * gpu_memory_utilization` bytes next to what is `in_use` without a KV
    cache, the largest step's `activations` and the CUDA `graphs`; raises when none are left."""
    budget = int(total * gpu_memory_utilization) - in_use - activations - graphs
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization} leaves no memory for the KV cache: of "
            f"{total * gpu_memory_utilization / GiB:.2f} GiB ({gpu_memory_utilization} of {total / GiB:.2f} "
            f"GiB), {in_use / GiB:.2f} GiB are in use (weights, CUDA context, other processes), the largest "
            f"step's activations need {activations / GiB:.2f} GiB and the CUDA graphs {graphs / GiB:.2f} GiB; "
            "raise gpu_memory_utilization, lower max_num_batched_tokens or max_num_seqs, or free the GPU"
        )
    return budget // per_block


@dataclass(frozen=True)
class MemoryProfile:
    """What `measure` found, in bytes."""

    total: int  # the device's memory
    in_use: int  # used on the device with no KV cache: weights, CUDA context, other processes
    activations: int  # the largest step's peak above what was allocated before it, encoder cache included
    graphs: int  # the decode CUDA graphs (0 without)

    def kv_blocks(self, gpu_memory_utilization: float, per_block: int) -> int:
        return kv_cache_blocks(
            self.total, gpu_memory_utilization, self.in_use, self.activations, self.graphs, per_block
        )


class _AllowAll:
    """A step's grammar masks (engine/structured.PendingBitmask's `resolve`), every token allowed."""

    def __init__(self, bitmask: GrammarBitmask) -> None:
        self._bitmask = bitmask
        self.request_ids = bitmask.request_ids

    def resolve(self) -> GrammarBitmask:
        return self._bitmask


class LargestStep:
    """The largest step the scheduler can produce under `limits` (the engine's scheduler configuration), as
    dummy requests scheduled by a scheduler of their own.

    `max_image_tokens`: the largest image the processor makes, in tokens; `patch_size`, `merge_size`: the
    processor's, to give the dummy images real grids."""

    def __init__(
        self,
        limits: SchedulerConfig,
        max_image_tokens: int,
        patch_size: int,
        merge_size: int,
        image_token_id: int,
        vocab_size: int,
    ) -> None:
        self.limits = limits
        self.vocab_size = vocab_size
        seqs = limits.max_num_seqs
        tokens = min(limits.max_num_batched_tokens, seqs * limits.max_model_len)
        # One token for every request, the rest to the first ones, up to max_model_len each.
        lengths = [1] * seqs
        rest = tokens - seqs
        for i in range(seqs):
            add = min(rest, limits.max_model_len - 1)
            lengths[i] += add
            rest -= add
        # The images go into the longest request, scheduled last, within the tokens it computes. An image
        # larger than that is encoded whole all the same (the request's prompt grows to hold it, and it
        # computes only a chunk: it does not sample).
        chunk = lengths[0]
        budget = min(limits.encoder_tokens_per_step, limits.encoder_cache_size)
        images: list[ImageFeature] = []
        offset = 0
        while offset < chunk:
            limit = min(max_image_tokens, budget)
            if images:
                limit = min(limit, chunk - offset)
            size = _image_tokens(limit)
            if size == 0 or offset + size > limits.max_model_len:
                break
            images.append(_image(f"largest-step-{len(images)}", offset, size, patch_size, merge_size))
            offset += size
            budget -= size
        self.image_tokens = offset
        prompt = [0] * max(chunk, offset)
        for img in images:
            prompt[img.offset : img.offset + img.length] = [image_token_id] * img.length
        self.requests = [
            Request(f"largest-step-{i}", [0] * n, PROFILE_SAMPLING) for i, n in enumerate(lengths[1:], 1)
        ]
        self.requests.append(Request("largest-step-0", prompt, PROFILE_SAMPLING, images=images))
        # Blocks for every request's scheduled tokens, the null block, and one max_model_len sequence (the
        # scheduler's own check).
        bs = limits.block_size
        needed = sum(-(-r.num_prompt_tokens // bs) for r in self.requests)
        self.num_blocks = 1 + max(needed, -(-limits.max_model_len // bs))

    def schedule(self) -> SchedulerOutput:
        """The step (its block ids within a cache of `num_blocks`), with an allow-all grammar mask on every
        sampling row. Call once."""
        config = dataclasses.replace(
            self.limits, num_blocks=self.num_blocks, enable_prefix_caching=False, max_queued_requests=None
        )
        scheduler = Scheduler(config)
        scheduler.add_requests(self.requests)
        sched = scheduler.schedule()
        rows = [s.request.request_id for s in sched.scheduled if s.sample]
        words = -(-self.vocab_size // 32)
        sched.grammar_bitmask = _AllowAll(GrammarBitmask(rows, np.full((len(rows), words), -1, np.int32)))
        return sched


def _image_tokens(limit: int) -> int:
    """The most tokens, at most `limit`, of an image whose merged grid is (h, w): h * w for a near-square."""
    h = math.isqrt(limit)
    return 0 if h == 0 else h * (limit // h)


def _image(mm_hash: str, offset: int, tokens: int, patch_size: int, merge_size: int) -> ImageFeature:
    """A black image of `tokens` tokens as resized uint8 pixels (how a GPU engine receives images)."""
    h = math.isqrt(tokens)
    w = tokens // h
    unit = patch_size * merge_size
    pixels = torch.zeros(h * unit, w * unit, 3, dtype=torch.uint8)
    grid = (1, h * merge_size, w * merge_size)
    return ImageFeature(mm_hash, offset, tokens, EncoderInput(pixels, grid, as_pixels=True))


def measure(runner: ModelRunner, step: LargestStep) -> MemoryProfile:
    """Run `step` on `runner` (built with `step.num_blocks` blocks, no graphs yet), measure the graphs, then
    free the runner's cache and read what stays in use."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        runner.launch(step.schedule()).result()
    except torch.cuda.OutOfMemoryError as e:
        limits = step.limits
        raise ValueError(
            f"the largest step (max_num_batched_tokens={limits.max_num_batched_tokens} over "
            f"max_num_seqs={limits.max_num_seqs} requests, {step.image_tokens} image tokens to encode) does not "
            "fit in GPU memory beside the weights; lower max_num_batched_tokens, max_num_seqs or max_pixels, "
            "or shard the model over more GPUs (tensor_parallel_size)"
        ) from e
    torch.cuda.synchronize(device)
    # Reserved rather than allocated: what the step took from the device, the allocator's rounding and
    # fragmentation included.
    activations = torch.cuda.max_memory_reserved(device) - before
    # The encoder cache may hold more rows than the step encoded, each as wide as the step's.
    cached = list(runner.encoder_cache.values())
    rows = sum(t.shape[0] for t in cached)
    if rows:
        row_bytes = sum(t.numel() * t.element_size() for t in cached) // rows
        activations += max(step.limits.encoder_cache_size - rows, 0) * row_bytes
    graphs = runner.measure_graph_memory()
    runner.free_kv_cache()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(total=total, in_use=total - free, activations=activations, graphs=graphs)
