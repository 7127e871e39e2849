"""The model runner: the one place that turns scheduled work into tensors.

Owns the model, the paged KV cache, the vision-encoder output cache and per-request sampling state (seeded
generators). Each `launch(scheduler_output)` encodes the images the scheduler asked for, packs every
scheduled request's new tokens into one batch (token ids, multimodal positions, KV slots, image rows),
runs one forward, and samples for the requests whose prompt is complete. It does not decide what runs.

On a GPU nothing in `launch` waits for the device: it queues the step's work and returns a `StepOutput`
whose `result()` waits for that step only. The next step can then be prepared and queued while this one
runs; a token it needs that is still being sampled (a request's pending token) is read on the device from
the previous step's `StepOutput`.

Under tensor parallelism (runner/tensor_parallel.py) the runner of rank 0 builds each step's plain inputs
(`StepInputs`: token ids, positions, KV slots, block tables, images to encode), sends them to the other ranks'
runners, and every rank runs `execute` on them: the same forward on its shard. Rank 0 alone samples. Without
tensor parallelism none of that exists: `prepare` builds the device tensors straight away, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmserve.devices import to_device
from vlmserve.engine.request import Request
from vlmserve.engine.scheduler import SchedulerOutput
from vlmserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vlmserve.multimodal import EncoderInput
from vlmserve.runner.attention import (
    PagedAttentionMetadata,
    TorchPagedAttention,
    padded_block_tables,
    token_slots,
)
from vlmserve.runner.sampler import (
    PendingSamples,
    Sampler,
    build_sampling_tensors,
    make_generator,
    with_token_bitmask,
)

if TYPE_CHECKING:
    from vlmserve.runner.cuda_graph import CudaGraphDecoder
    from vlmserve.runner.tensor_parallel import WorkerGroup

logger = logging.getLogger(__name__)


class DecodeBatch(NamedTuple):
    """A step where every request computes one text token, as plain ints (the hot path of large decode
    batches: no per-request tensors)."""

    token_ids: list[int]  # PENDING where the token is still being sampled by the step before
    positions: list[int]  # text positions: the same on all three M-RoPE axes
    slots: list[int]  # KV-cache slot of each row's token
    block_tables: list[list[int]]
    seq_lens: list[int]
    pending: list[tuple[int, str]]  # (row, request id) of the PENDING ids


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class StepOutput:
    """What one launched step samples, possibly still being computed on the device."""

    request_ids: list[str]  # the requests that sample, in row order
    sampled: PendingSamples | None = None  # None when no request samples
    # A step launched with `defer_sampling`: its forward is queued, its sampling waits for `sample_now()`.
    deferred: Callable[[], StepOutput] | None = None

    def sample_now(self) -> None:
        """Queue this step's sampling if it was deferred (its masks and penalties read the host's token
        lists as they are now). Whatever reads this step's tokens calls it first."""
        if self.deferred is not None:
            sample, self.deferred = self.deferred, None
            self.sampled = sample().sampled

    def rows(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.request_ids)}

    def result(self) -> dict[str, SampledToken]:
        """The sampled tokens by request id; waits for this step's work on the device."""
        self.sample_now()
        if self.sampled is None:
            return {}
        out = self.sampled.output()
        result: dict[str, SampledToken] = {}
        for i, rid in enumerate(self.request_ids):
            lp = out.logprobs[i] if out.logprobs is not None else None
            top = out.top_logprobs[i] if out.top_logprobs is not None else None
            result[rid] = SampledToken(out.token_ids[i], lp, top)
        return result


@dataclass(frozen=True)
class AllocateKVCache:
    """To a tensor-parallel worker: `allocate_kv_cache(num_blocks)` on its runner, then report ready."""

    num_blocks: int


@dataclass(frozen=True)
class MeasureGraphMemory:
    """To a tensor-parallel worker: `measure_graph_memory()` on its runner (its graph capture's collectives
    meet rank 0's), then report ready."""


@dataclass
class _MaskBuffer:
    """A pinned host buffer for grammar masks and the event after the last copy that read it."""

    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None


# An input token id not known on the host yet: sampled by the step still running, read on the device.
PENDING = -1


@dataclass
class PreparedStep:
    """A step whose inputs are built; `run()` queues its kernels and returns its `StepOutput`."""

    run: Callable[[], StepOutput]
    # Every row decodes one token (or there are none): a graph replay, or a few kernels per layer, cheap to
    # queue behind a running step. Anything else may be thousands of launches (prefill, vision tower).
    decode_only: bool
    # run() queues only the forward; the StepOutput samples at its sample_now() (see prepare).
    sampling_deferred: bool = False


@dataclass
class HostInputs:
    """An eager step's inputs on the host, before any device copy (what tensor-parallel ranks receive)."""

    token_ids: list[int]
    pending: list[tuple[int, str]]  # (row, request id) of the PENDING ids
    positions: torch.Tensor  # (3, T)
    slots: np.ndarray  # (T,)
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    image_rows: list[tuple[str, int, int]]  # (mm_hash, first row, end row) of the image's embedding
    image_spans: list[tuple[int, int]]  # (flat start, flat end) of rows replaced by image rows
    sample_index: list[int]  # rows whose hidden state samples
    sample_rows: list[int]  # the scheduled requests (by position) that sample, in the same order


@dataclass
class StepInputs:
    """One step as plain data, the same for every tensor-parallel rank: one of `decode` (every row decodes a
    text token) or `eager` (anything else), the images to encode first, and encoder outputs to drop."""

    free_encoder_hashes: list[str]
    images: list[Any]  # ImageFeature of each image to encode (with its pixels or patches)
    decode: DecodeBatch | None = None
    eager: HostInputs | None = None
    sample_rows: list[int] | None = None  # decode: the rows that sample


@dataclass
class EagerInputs:
    """An eager step's inputs, on the device, with what to fetch from the encoder cache once it ran."""

    ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (3, T)
    attn: TorchPagedAttention  # built from the block tables as they are now, not when the step runs
    image_rows: list[tuple[str, int, int]]  # (mm_hash, first row, end row), in batch order
    image_mask: torch.Tensor | None  # (T,) bool: the rows image rows replace
    sample_index: torch.Tensor | None  # rows whose hidden state samples; None when no request samples
    sample_reqs: list[Request]
    grammar_bitmask: Any = None  # the step's structured-output masks (SchedulerOutput.grammar_bitmask)


# On CPU, a small model's decode steps and steps of at most this many tokens run on one thread
# (ModelRunner._set_cpu_threads); the others on torch's thread count as the process started (read once
# here: a runner made after another one switched to one thread must not take that for the machine's size).
SMALL_CPU_STEP_TOKENS = 4
CPU_THREADS = torch.get_num_threads()
# Weights up to this size count as small: their few-token steps are chains of tiny ops, which lose more to
# thread synchronisation than they gain. A real checkpoint's decode step streams gigabytes of weights and
# needs every core's memory bandwidth, so it keeps all threads.
SMALL_CPU_MODEL_BYTES = 64 * 2**20
# Attention kernels the GPU path may use (see ModelRunner.launch for why not cuDNN's).
GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def kv_bytes_per_block(model: Qwen2_5_VLForConditionalGeneration, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block on this rank (its KV heads only, under tensor parallelism)."""
    t = model.config.text
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * t.num_hidden_layers * block_size * model.num_kv_heads * t.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        num_blocks: int,
        block_size: int,
        eos_token_ids: tuple[int, ...],
        max_model_len: int = 32768,
        max_num_seqs: int = 64,
        enforce_eager: bool = False,
        encoder_input: Callable[[torch.Tensor, tuple[int, int, int], torch.dtype], torch.Tensor]
        | None = None,
        kv_cache_dtype: torch.dtype | None = None,
        workers: WorkerGroup | None = None,
        capture_graphs: bool = True,
    ) -> None:
        """`capture_graphs=False`: no CUDA graphs yet (a runner whose cache is sized from a measured step:
        `allocate_kv_cache` captures them once the cache has its final size)."""
        self.model = model
        # The other tensor-parallel ranks (rank 0, this runner, sends them each step); None without.
        self.workers = workers
        self._unsent_free: list[str] = []  # encoder outputs freed here, not yet freed on the other ranks
        # (H, W, 3) uint8 pixels, grid_thw, dtype -> patches on the pixels' device, resized there first when
        # the pixels are not yet the grid's size (the processor's); images may arrive as pixels, not patches.
        self.encoder_input = encoder_input
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.one_thread_small_steps = weight_bytes <= SMALL_CPU_MODEL_BYTES
        self.block_size = block_size
        self.eos_token_ids = list(eos_token_ids)
        t = model.config.text
        self.kv_dtype = kv_cache_dtype or self.dtype  # FP8 (runner/kv_quant.py) or the model's dtype
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._allocate(num_blocks)
        self.scale = t.head_dim**-0.5
        self.image_token_id = model.config.image_token_id
        self.encoder_cache: dict[str, torch.Tensor] = {}  # mm_hash -> (tokens, hidden)
        self.generators: dict[str, torch.Generator | None] = {}
        self.sampler = Sampler()
        self._mask_buffers = [_MaskBuffer(), _MaskBuffer()]  # used in turn (mask_buffer)
        self._mask_turn = 0
        self.graphs: CudaGraphDecoder | None = None
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        if self.use_graphs and capture_graphs:
            self._capture_graphs()

    # --- KV cache and graphs -------------------------------------------------------------------------

    def _allocate(self, num_blocks: int) -> None:
        t = self.model.config.text
        shape = (num_blocks, self.block_size, self.model.num_kv_heads, t.head_dim)
        self.num_blocks = num_blocks
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
            )
            for _ in range(t.num_hidden_layers)
        ]

    def _capture_graphs(self) -> None:
        from vlmserve.runner.cuda_graph import CudaGraphDecoder

        self.graphs = CudaGraphDecoder(self, self.max_num_seqs, self.max_model_len)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Replace the KV cache with one of `num_blocks` blocks (on every tensor-parallel rank), then capture
        the CUDA graphs, which read the cache at its address. Nothing computed before survives: KV, encoder
        outputs, per-request generators. Made for the engine's start, after the step that measured memory."""
        if self.workers is not None:
            self.workers.send(AllocateKVCache(num_blocks))
        self.free_kv_cache()  # the old cache goes before the new one is allocated
        self._allocate(num_blocks)
        if self.use_graphs:
            self._capture_graphs()
            torch.cuda.empty_cache()  # as measure_graph_memory measured them: without the warm-ups' blocks
        if self.workers is not None:
            self.workers.wait_ready()

    def free_kv_cache(self) -> None:
        """Drop this rank's KV cache and everything that holds on to it or to earlier steps (the graphs, the
        encoder outputs, the generators) until `allocate_kv_cache` makes a new one."""
        self.graphs = None
        self.encoder_cache.clear()
        self.generators.clear()
        self._unsent_free.clear()
        self.kv_caches = []
        self.num_blocks = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure_graph_memory(self) -> int:
        """Device bytes the decode CUDA graphs take (0 without graphs), measured before the sized cache
        exists: captured on the cache there is now, then dropped (`allocate_kv_cache` captures them again
        on the new cache, whose address they read). Counted: all the capture leaves in use (the graphs' shared
        memory pool and outputs, each instantiated graph, and what a first capture sets up once, such as the
        capture streams' cuBLAS workspaces); an upper bound, since a second capture reuses some of it."""
        if not self.use_graphs:
            return 0
        if self.workers is not None:
            self.workers.send(MeasureGraphMemory())  # the captures' all-reduces run on every rank
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self._capture_graphs()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' blocks (default pool) go back; the graphs' pool stays
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.graphs = None
        torch.cuda.empty_cache()
        if self.workers is not None:
            self.workers.wait_ready()
        return used

    # --- encoder ---------------------------------------------------------------------------------------

    def _encoder_inputs(self, sched: SchedulerOutput) -> tuple[list[Any], torch.Tensor] | None:
        """The images to encode this step (not cached yet, each once) and their patches, on the device."""
        return self._encoder_patches(self._images_to_encode(sched))

    def _images_to_encode(self, sched: SchedulerOutput) -> list[Any]:
        todo: dict[str, Any] = {}
        for req, idx in sched.encoder_inputs:
            img = req.images[idx]
            if img.mm_hash not in self.encoder_cache:
                todo.setdefault(img.mm_hash, img)
        # An image the step reads but nobody encoded: the step meant to encode it failed before it ran (the
        # scheduler still counts it as cached). Encode it now rather than fail every request that shows it.
        for s in sched.scheduled:
            for img in s.request.images:
                overlaps = img.offset < s.start + s.num_tokens and img.offset + img.length > s.start
                if overlaps and img.mm_hash not in self.encoder_cache and img.mm_hash not in todo:
                    logger.warning("image %s was never encoded (a failed step); encoding it now", img.mm_hash)
                    todo[img.mm_hash] = img
        return list(todo.values())

    def _encoder_patches(self, imgs: list[Any]) -> tuple[list[Any], torch.Tensor] | None:
        if not imgs:
            return None
        # Each image's patches straight to the device (a host-side cat would copy them once more first).
        parts = [self._patches(img.data) for img in imgs]
        return imgs, (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.dtype)

    def _patches(self, data: EncoderInput) -> torch.Tensor:
        """An image's encoder input on the device: float32 patches as given, or uint8 pixels (resized and)
        patchified there, straight into the model's dtype."""
        if data.values.dtype != torch.uint8:
            return to_device(data.values, self.device)
        if self.encoder_input is None:
            raise RuntimeError(
                "an image arrived as pixels, but this runner was given no encoder_input function"
            )
        return self.encoder_input(to_device(data.values, self.device), tuple(data.grid_thw), self.dtype)

    def _encode(self, imgs: list[Any], patches: torch.Tensor) -> None:
        grids = [tuple(img.data.grid_thw) for img in imgs]
        for img, emb in zip(imgs, self.model.encode_images(patches, grids), strict=True):
            if emb.shape[0] != img.length:
                raise RuntimeError(
                    f"image {img.mm_hash}: encoder gave {emb.shape[0]} rows, prompt has {img.length}"
                )
            # A copy when the batch held several images: a row slice would keep the whole batch's output
            # alive for as long as any one of its images stays cached.
            self.encoder_cache[img.mm_hash] = emb.clone() if len(imgs) > 1 else emb

    def _set_cpu_threads(self, sched: SchedulerOutput) -> None:
        """A small model's decode step (one token per sequence), or any step of a few tokens, is a chain of
        small ops that one thread runs about as fast as two (within 10% up to batch 32), and the other cores
        stay free for the HTTP front; a step with a prefill chunk or images, or any step of a large model,
        takes every thread."""
        if not self.one_thread_small_steps or sched.encoder_inputs:
            small = False
        else:
            tokens = sum(s.num_tokens for s in sched.scheduled)
            small = tokens <= SMALL_CPU_STEP_TOKENS or tokens == len(sched.scheduled)
        self._use_threads(small)

    def _use_threads(self, small: bool) -> None:
        want = 1 if small else CPU_THREADS
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    # --- inputs ----------------------------------------------------------------------------------------

    def _positions(self, req: Request, start: int, n: int) -> torch.Tensor:
        """(3, n) multimodal positions of tokens [start, start + n)."""
        mp = req.mrope_positions
        end = start + n
        known = 0 if mp is None else mp.shape[1]
        parts = []
        if start < known:
            parts.append(mp[:, start : min(end, known)])
        if end > known:
            # Past the original prompt (generated tokens, also when recomputed after preemption).
            lo = max(start, known)
            parts.append((torch.arange(lo, end) + req.mrope_delta).expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _prepare_decode(self, sched: SchedulerOutput) -> DecodeBatch | None:
        """Inputs of a step where every request computes one text token, built from plain ints (the hot
        path of large decode batches: no per-request tensors). None when the step is anything else."""
        bs = self.block_size
        ids, pos, slots, seq_lens, tables = [], [], [], [], []
        pending: list[tuple[int, str]] = []
        for row, s in enumerate(sched.scheduled):
            req, i = s.request, s.start
            if s.num_tokens != 1:
                return None
            mp = req.mrope_positions
            if mp is not None and i < mp.shape[1]:
                return None  # a one-token prefill chunk: may be an image token or need its 3-D position
            if i < len(req.all_token_ids):
                ids.append(req.all_token_ids[i])
            else:
                ids.append(PENDING)
                pending.append((row, req.request_id))
            pos.append(i + req.mrope_delta)
            slots.append(req.block_ids[i // bs] * bs + i % bs)
            seq_lens.append(i + 1)
            tables.append(req.block_ids)
        return DecodeBatch(ids, pos, slots, tables, seq_lens, pending)

    def _fill_pending(
        self, ids: torch.Tensor, pending: list[tuple[int, str]], prev: StepOutput | None
    ) -> None:
        """Write the pending tokens' ids (rows of `ids`, on the device) from the step that samples them."""
        if not pending:
            return
        if prev is not None:
            prev.sample_now()  # queued before this step's forward, which overwrites the graph's logits
        if prev is None or prev.sampled is None:
            raise RuntimeError("a scheduled token is still pending but no running step samples it")
        rows = prev.rows()
        index = to_device(
            torch.tensor([[dst for dst, _ in pending], [rows[rid] for _, rid in pending]]), self.device
        )
        ids[index[0]] = prev.sampled.token_ids[index[1]]

    def launch(self, sched: SchedulerOutput, prev: StepOutput | None = None) -> StepOutput:
        """Queue one step; `prev` is the step still running whose sampled tokens this one may need."""
        return self.prepare(sched, prev).run()

    @torch.inference_mode()
    def prepare(
        self, sched: SchedulerOutput, prev: StepOutput | None = None, defer_sampling: bool = False
    ) -> PreparedStep:
        """Build one step's inputs (host work and host -> device copies); `.run()` queues its kernels.

        Split so that the engine can build a step's inputs while the previous step runs and still choose
        when to queue the kernels: a long eager step queued in full would block the host (the launch queue
        fills up) until most of it ran, delaying the previous step's tokens.

        defer_sampling: for requests whose sampling reads their earlier tokens' values (a grammar's mask,
        penalties), a decode step queues only its forward (it reads `prev`'s tokens on the device);
        the engine applies `prev` on the host meanwhile and then calls `sample_now()`. Other steps ignore it
        (`sampling_deferred` says which happened)."""
        for h in sched.free_encoder_hashes:
            self.encoder_cache.pop(h, None)
        for rid in sched.finished_request_ids:
            self.generators.pop(rid, None)
        if self.workers is not None:
            self._unsent_free.extend(sched.free_encoder_hashes)
        if not sched.scheduled:
            return PreparedStep(lambda: StepOutput([]), decode_only=True)
        if self.device.type == "cpu":
            self._set_cpu_threads(sched)
        if self.workers is not None:
            return self._prepare_parallel(sched)
        decode = None if sched.encoder_inputs else self._prepare_decode(sched)
        if decode is not None and self.graphs is not None and self.graphs.fits(len(sched.scheduled)):
            run = self._in_mode(lambda: self._run_graph(sched, decode, prev, defer_sampling))
            return PreparedStep(run, decode_only=True, sampling_deferred=defer_sampling)
        if decode is not None:  # CPU (or a batch beyond the graphs): the same ints, no per-request tensors
            eager = self._decode_inputs(sched, decode, prev)
            eager.grammar_bitmask = sched.grammar_bitmask
            run = self._in_mode(lambda: self._run_eager(None, eager, defer_sampling))
            return PreparedStep(run, decode_only=True, sampling_deferred=defer_sampling)
        encoder = self._encoder_inputs(sched)
        eager = self._eager_inputs(sched, prev)
        eager.grammar_bitmask = sched.grammar_bitmask
        return PreparedStep(self._in_mode(lambda: self._run_eager(encoder, eager)), decode_only=False)

    def _in_mode(self, fn: Callable[[], StepOutput]) -> Callable[[], StepOutput]:
        """`fn` under inference mode and, on a GPU, the attention kernels allowed there."""

        def run() -> StepOutput:
            with torch.inference_mode():
                if self.device.type == "cpu":
                    return fn()
                # cuDNN's fused attention builds an execution plan per input shape (~10 ms of host time
                # each on an H200), and the vision tower's and mixed steps' shapes change every step.
                with sdpa_kernel(GPU_SDPA_BACKENDS):
                    return fn()

        return run

    def _run_graph(
        self,
        sched: SchedulerOutput,
        decode: DecodeBatch,
        prev: StepOutput | None,
        defer_sampling: bool = False,
    ) -> StepOutput:
        assert self.graphs is not None
        logits = self.graphs.run(
            decode.token_ids,
            decode.positions,
            decode.slots,
            decode.block_tables,
            decode.seq_lens,
            fill_pending=lambda ids: self._fill_pending(ids, decode.pending, prev),
        )
        reqs = [s.request for s in sched.scheduled if s.sample]
        rows = [i for i, s in enumerate(sched.scheduled) if s.sample]
        if not reqs:
            return StepOutput([])
        index = to_device(torch.tensor(rows), self.device) if len(rows) < len(sched.scheduled) else None

        def sample() -> StepOutput:
            # `logits` is the graph's output buffer: read here before the next replay (stream order).
            return self._sample(
                (logits if index is None else logits[index]).float(), reqs, sched.grammar_bitmask
            )

        if defer_sampling:
            return StepOutput([r.request_id for r in reqs], deferred=self._in_mode(sample))
        return sample()

    def _eager_inputs(self, sched: SchedulerOutput, prev: StepOutput | None) -> EagerInputs:
        host = self._eager_host(sched)
        return self._eager_device(host, [sched.scheduled[i].request for i in host.sample_rows], prev)

    def _eager_host(self, sched: SchedulerOutput) -> HostInputs:
        bs = self.block_size
        token_ids: list[int] = []
        pending: list[tuple[int, str]] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        image_rows: list[tuple[str, int, int]] = []  # (mm_hash, first row, end row) of the image's embedding
        image_spans: list[tuple[int, int]] = []  # (flat start, flat end) of rows replaced by image rows
        sample_index: list[int] = []
        sample_rows: list[int] = []
        flat = 0
        for row, s in enumerate(sched.scheduled):
            req, start, n = s.request, s.start, s.num_tokens
            end = start + n
            token_ids.extend(req.all_token_ids[start:end])
            for i in range(max(start, len(req.all_token_ids)), end):
                token_ids.append(PENDING)
                pending.append((flat + i - start, req.request_id))
            positions.append(self._positions(req, start, n))
            slots.append(token_slots(req.block_ids, start, end, bs))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(req.block_ids)
            for img in req.images:
                lo, hi = max(start, img.offset), min(end, img.offset + img.length)
                if lo < hi:
                    image_rows.append((img.mm_hash, lo - img.offset, hi - img.offset))
                    image_spans.append((flat + lo - start, flat + hi - start))
            flat += n
            if s.sample:
                sample_index.append(flat - 1)
                sample_rows.append(row)
        host = HostInputs(
            token_ids=token_ids,
            pending=pending,
            positions=torch.cat(positions, dim=1),
            slots=np.concatenate(slots),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=tables,
            image_rows=image_rows,
            image_spans=image_spans,
            sample_index=sample_index,
            sample_rows=sample_rows,
        )
        return host

    def _eager_device(
        self, host: HostInputs, sample_reqs: list[Request], prev: StepOutput | None
    ) -> EagerInputs:
        """The device tensors of `host`; `sample_reqs` are the requests of its sampled rows (empty on the
        ranks that do not sample, which still compute those rows' logits for the gather)."""
        dev = self.device
        ids = to_device(torch.tensor(host.token_ids), dev)
        self._fill_pending(ids, host.pending, prev)
        query_lens = host.query_lens
        meta = PagedAttentionMetadata(
            slot_mapping=to_device(torch.from_numpy(host.slots), dev),
            query_lens=query_lens,
            seq_lens=host.seq_lens,
            block_tables=to_device(torch.from_numpy(padded_block_tables(host.block_tables)), dev),
            decode_rows=[i for i, n in enumerate(query_lens) if n == 1],
            prefill_rows=[i for i, n in enumerate(query_lens) if n > 1],
            host_block_tables=host.block_tables,
        )
        image_mask = None
        if host.image_rows:
            mask = torch.zeros(len(host.token_ids), dtype=torch.bool)
            for a, b in host.image_spans:
                mask[a:b] = True
            image_mask = to_device(mask, dev)
        return EagerInputs(
            ids=ids,
            positions=to_device(host.positions, dev),
            attn=self._attention(meta),
            image_rows=host.image_rows,
            image_mask=image_mask,
            sample_index=to_device(torch.tensor(host.sample_index), dev) if host.sample_index else None,
            sample_reqs=sample_reqs,
        )

    def _decode_inputs(
        self, sched: SchedulerOutput, decode: DecodeBatch, prev: StepOutput | None
    ) -> EagerInputs:
        """`_eager_inputs` for a step of one-token decodes, from `_prepare_decode`'s plain ints."""
        sample = [i for i, s in enumerate(sched.scheduled) if s.sample]
        return self._decode_device(decode, sample, [sched.scheduled[i].request for i in sample], prev)

    def _decode_device(
        self, decode: DecodeBatch, sample: list[int], sample_reqs: list[Request], prev: StepOutput | None
    ) -> EagerInputs:
        token_ids, positions, slots, tables, seq_lens, pending = decode
        dev = self.device
        ids = to_device(torch.tensor(token_ids), dev)
        self._fill_pending(ids, pending, prev)
        rows = list(range(len(token_ids)))
        meta = PagedAttentionMetadata(
            slot_mapping=to_device(torch.tensor(slots), dev),
            query_lens=[1] * len(rows),
            seq_lens=seq_lens,
            block_tables=to_device(torch.from_numpy(padded_block_tables(tables)), dev),
            decode_rows=rows,
            prefill_rows=[],
            host_block_tables=tables,
        )
        text_positions = torch.tensor(positions).expand(3, -1).contiguous()  # the same on all three axes
        return EagerInputs(
            ids=ids,
            positions=to_device(text_positions, dev),
            attn=self._attention(meta),
            image_rows=[],
            image_mask=None,
            sample_index=to_device(torch.tensor(sample), dev) if sample else None,
            sample_reqs=sample_reqs,
        )

    def _run_eager(
        self,
        encoder: tuple[list[Any], torch.Tensor] | None,
        inputs: EagerInputs,
        defer_sampling: bool = False,
    ) -> StepOutput:
        logits = self._forward(encoder, inputs)
        if logits is None:
            return StepOutput([])
        if defer_sampling:
            sample = self._in_mode(lambda: self._sample(logits, inputs.sample_reqs, inputs.grammar_bitmask))
            return StepOutput([r.request_id for r in inputs.sample_reqs], deferred=sample)
        return self._sample(logits, inputs.sample_reqs, inputs.grammar_bitmask)

    def _forward(
        self, encoder: tuple[list[Any], torch.Tensor] | None, inputs: EagerInputs
    ) -> torch.Tensor | None:
        """Encode, embed, run the model; float32 logits of the sampled rows (None when no row samples)."""
        if encoder is not None:
            self._encode(*encoder)
        if inputs.image_rows:
            rows = torch.cat([self.encoder_cache[h][lo:hi] for h, lo, hi in inputs.image_rows])
            x = self.model.embed(inputs.ids, rows, inputs.image_mask)
        else:
            x = self.model.embed(inputs.ids)
        hidden = self.model(x, inputs.positions, inputs.attn)
        if inputs.sample_index is None:
            return None
        return self.model.compute_logits(hidden[inputs.sample_index]).float()

    # --- tensor parallelism ------------------------------------------------------------------------------

    def _prepare_parallel(self, sched: SchedulerOutput) -> PreparedStep:
        """Rank 0's step: plain inputs, sent to the other ranks when it runs; the same `execute` everywhere."""
        decode = None if sched.encoder_inputs else self._prepare_decode(sched)
        free, self._unsent_free = self._unsent_free, []
        if decode is not None:
            sample = [i for i, s in enumerate(sched.scheduled) if s.sample]
            step = StepInputs(free, [], decode=decode, sample_rows=sample)
            pending = decode.pending
        else:
            host = self._eager_host(sched)
            sample = host.sample_rows
            step = StepInputs(free, self._images_to_encode(sched), eager=host)
            pending = host.pending
        if pending:
            raise RuntimeError(
                "a scheduled token is still being sampled: tensor parallelism runs without async scheduling"
            )
        reqs = [sched.scheduled[i].request for i in sample]
        workers = self.workers
        assert workers is not None

        def run() -> StepOutput:
            try:
                workers.send(step)
                logits = self.execute(step)
            except Exception as e:  # the ranks may be out of step now: fatal (see WorkerGroup.failure)
                raise workers.failure(e) from e
            if logits is None:
                return StepOutput([])
            return self._sample(logits, reqs, sched.grammar_bitmask)

        return PreparedStep(self._in_mode(run), decode_only=decode is not None)

    def execute(self, step: StepInputs) -> torch.Tensor | None:
        """One step's forward from its plain inputs, on this rank's shard (every rank runs it, in the same
        order, so their collectives meet): (rows that sample, V) float32 logits on rank 0, None when no row
        samples; the other ranks' return value means nothing."""
        for h in step.free_encoder_hashes:
            self.encoder_cache.pop(h, None)
        decode = step.decode
        if decode is not None:
            sample = step.sample_rows or []
            if self.graphs is not None and self.graphs.fits(len(decode.token_ids)):
                logits = self.graphs.run(
                    decode.token_ids, decode.positions, decode.slots, decode.block_tables, decode.seq_lens
                )
                if not sample:
                    return None
                if len(sample) < len(decode.token_ids):
                    logits = logits[to_device(torch.tensor(sample), self.device)]
                return logits.float()
            return self._forward(None, self._decode_device(decode, sample, [], None))
        assert step.eager is not None
        return self._forward(self._encoder_patches(step.images), self._eager_device(step.eager, [], None))

    def run_worker_call(self, call: AllocateKVCache | MeasureGraphMemory) -> None:
        """A rank other than 0: the call rank 0's runner makes on itself at the same time."""
        if isinstance(call, AllocateKVCache):
            self.allocate_kv_cache(call.num_blocks)
        else:
            self.measure_graph_memory()

    def run_worker_step(self, step: StepInputs) -> None:
        """A rank other than 0: `execute` under the same modes as rank 0's step."""
        if self.device.type == "cpu":
            tokens = len(step.eager.token_ids) if step.eager is not None else 0
            small = step.decode is not None or (not step.images and tokens <= SMALL_CPU_STEP_TOKENS)
            self._use_threads(self.one_thread_small_steps and small)

        def run() -> StepOutput:
            self.execute(step)
            return StepOutput([])

        self._in_mode(run)()

    def _attention(self, meta: PagedAttentionMetadata) -> TorchPagedAttention:
        if self.device.type == "cuda":
            from vlmserve.runner.triton_attention import TritonPagedAttention

            return TritonPagedAttention(self.kv_caches, meta, self.scale, self.max_model_len)
        return TorchPagedAttention(self.kv_caches, meta, self.scale)

    def _sample(self, logits: torch.Tensor, reqs: list[Request], grammar_bitmask: Any = None) -> StepOutput:
        """Queue the sampling of `reqs` (row i = reqs[i]). `grammar_bitmask`: the step's masks, a
        PendingBitmask (its `request_ids` are constrained, `resolve()` waits for their fill)."""
        constrained_rows: list[int] = []
        if grammar_bitmask is not None:
            constrained = set(grammar_bitmask.request_ids)
            constrained_rows = [j for j, r in enumerate(reqs) if r.request_id in constrained]
        gens = []
        for r in reqs:
            if r.request_id not in self.generators:
                self.generators[r.request_id] = make_generator(r.sampling_params.seed, self.device)
            gens.append(self.generators[r.request_id])
        batch = build_sampling_tensors(
            [r.sampling_params for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.prompt_token_ids for r in reqs],
            gens,
            self.eos_token_ids,
            self.device,
            # Tokens this request samples in steps not yet applied (its own sample here is one of them).
            num_earlier_pending=[r.num_pending_tokens - 1 for r in reqs],
            constrained_rows=constrained_rows,
        )
        # The masks last: they may still be filling (on the fill thread) while the tensors above are built.
        masks = grammar_bitmask.resolve() if grammar_bitmask is not None else None
        if masks is not None:
            mask_row = {rid: i for i, rid in enumerate(masks.request_ids)}
            rows = [j for j, r in enumerate(reqs) if r.request_id in mask_row]
            order = [mask_row[reqs[j].request_id] for j in rows]
            # The engine fills the masks in sampling order: then they are used in place.
            in_order = order == list(range(len(masks.request_ids)))
            bits = masks.bits if in_order else masks.bits[order]
            batch = with_token_bitmask(batch, rows, bits)
            self._mask_copied(bits)
        return StepOutput([r.request_id for r in reqs], self.sampler.sample(logits, batch))

    def mask_buffer(self, rows: int, words: int) -> np.ndarray:
        """Host memory for one step's grammar masks, (rows, words) int32: the engine fills it, the sampler
        copies it to the device. On a GPU it is pinned (the copy is queued without a staging copy), from
        two buffers used in turn; a buffer is handed out again only once the copy that read it has run."""
        if self.device.type != "cuda":
            return np.empty((rows, words), dtype=np.int32)
        self._mask_turn ^= 1
        buf = self._mask_buffers[self._mask_turn]
        if buf.copied is not None:  # before writing it, or freeing it for a larger one
            buf.copied.synchronize()
            buf.copied = None
        if buf.host is None or buf.host.shape[0] < rows or buf.host.shape[1] != words:
            buf.host = torch.empty((max(rows, self.max_num_seqs), words), dtype=torch.int32, pin_memory=True)
        return buf.host[:rows].numpy()

    def _mask_copied(self, bits: np.ndarray) -> None:
        """Mark the mask buffer that holds `bits` (if one does) as read by the work queued so far."""
        for buf in self._mask_buffers:
            if buf.host is not None and bits.ctypes.data == buf.host.data_ptr():
                buf.copied = torch.cuda.Event()
                buf.copied.record()
