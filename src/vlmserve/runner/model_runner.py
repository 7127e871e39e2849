"""The model runner: the one place that turns scheduled work into tensors.

Owns the model, the paged KV cache, the vision-encoder output cache and per-request sampling state (seeded
generators). Each `execute(scheduler_output)` encodes the images the scheduler asked for, packs every
scheduled request's new tokens into one batch (token ids, multimodal positions, KV slots, image rows),
runs one forward, and samples for the requests whose prompt is complete. It does not decide what runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from vlmserve.engine.request import Request
from vlmserve.engine.scheduler import SchedulerOutput
from vlmserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vlmserve.runner.attention import PagedAttentionMetadata, TorchPagedAttention
from vlmserve.runner.sampler import Sampler, build_sampling_batch, make_generator

logger = logging.getLogger(__name__)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


# On CPU, a small model's steps of at most this many tokens run on one thread (ModelRunner._set_cpu_threads);
# the others on torch's thread count as the process started (read once here: a runner made after another one
# switched to one thread must not take that for the machine's size).
SMALL_CPU_STEP_TOKENS = 4
CPU_THREADS = torch.get_num_threads()
# Weights up to this size count as small: their few-token steps are chains of tiny ops, which lose more to
# thread synchronisation than they gain. A real checkpoint's decode step streams gigabytes of weights and
# needs every core's memory bandwidth, so it keeps all threads.
SMALL_CPU_MODEL_BYTES = 64 * 2**20


def kv_bytes_per_block(model: Qwen2_5_VLForConditionalGeneration, block_size: int, dtype: torch.dtype) -> int:
    t = model.config.text
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * t.num_hidden_layers * block_size * t.num_key_value_heads * t.head_dim * elem


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
    ) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.one_thread_small_steps = weight_bytes <= SMALL_CPU_MODEL_BYTES
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = list(eos_token_ids)
        t = model.config.text
        shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(t.num_hidden_layers)
        ]
        self.scale = t.head_dim**-0.5
        self.image_token_id = model.config.image_token_id
        self.encoder_cache: dict[str, torch.Tensor] = {}  # mm_hash -> (tokens, hidden)
        self.generators: dict[str, torch.Generator | None] = {}
        self.sampler = Sampler()
        self.graphs: CudaGraphDecoder | None = None
        if self.device.type == "cuda" and not enforce_eager:
            self.graphs = CudaGraphDecoder(self, max_num_seqs, max_model_len)

    # --- encoder ---------------------------------------------------------------------------------------

    def _run_encoder(self, sched: SchedulerOutput) -> None:
        todo: dict[str, object] = {}
        for req, idx in sched.encoder_inputs:
            img = req.images[idx]
            if img.mm_hash not in self.encoder_cache:
                todo.setdefault(img.mm_hash, img)
        if not todo:
            return
        imgs = list(todo.values())
        patches = torch.cat([img.data[0] for img in imgs]).to(self.device, self.dtype)
        grids = [tuple(img.data[1]) for img in imgs]
        for img, emb in zip(imgs, self.model.encode_images(patches, grids), strict=True):
            if emb.shape[0] != img.length:
                raise RuntimeError(
                    f"image {img.mm_hash}: encoder gave {emb.shape[0]} rows, prompt has {img.length}"
                )
            # A copy when the batch held several images: a row slice would keep the whole batch's output
            # alive for as long as any one of its images stays cached.
            self.encoder_cache[img.mm_hash] = emb.clone() if len(imgs) > 1 else emb

    def _set_cpu_threads(self, sched: SchedulerOutput) -> None:
        """A small model's step of a few tokens is a chain of small ops, each cheaper on one thread than split
        (and the other cores stay free for the HTTP front); a step with prefill or images, or any step of a
        large model, takes every thread."""
        tokens = sum(s.num_tokens for s in sched.scheduled)
        small = self.one_thread_small_steps and tokens <= SMALL_CPU_STEP_TOKENS and not sched.encoder_inputs
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

    def _prepare_decode(
        self, sched: SchedulerOutput
    ) -> tuple[list[int], list[int], list[int], list[list[int]], list[int]] | None:
        """Inputs of a step where every request computes one text token, built from plain ints (the hot
        path of large decode batches: no per-request tensors). None when the step is anything else."""
        bs = self.block_size
        ids, pos, slots, seq_lens, tables = [], [], [], [], []
        for s in sched.scheduled:
            req, i = s.request, s.start
            if s.num_tokens != 1:
                return None
            mp = req.mrope_positions
            if mp is not None and i < mp.shape[1]:
                return None  # a one-token prefill chunk: may be an image token or need its 3-D position
            ids.append(req.all_token_ids[i])
            pos.append(i + req.mrope_delta)
            slots.append(req.block_ids[i // bs] * bs + i % bs)
            seq_lens.append(i + 1)
            tables.append(req.block_ids)
        return ids, pos, slots, tables, seq_lens

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, SampledToken]:
        for h in sched.free_encoder_hashes:
            self.encoder_cache.pop(h, None)
        for rid in sched.finished_request_ids:
            self.generators.pop(rid, None)
        if not sched.scheduled:
            return {}
        if self.device.type == "cpu":
            self._set_cpu_threads(sched)
        self._run_encoder(sched)
        if self.graphs is not None:
            decode = self._prepare_decode(sched)
            if decode is not None:
                logits = self.graphs.run(*decode)
                if logits is not None:
                    reqs = [s.request for s in sched.scheduled if s.sample]
                    rows = [i for i, s in enumerate(sched.scheduled) if s.sample]
                    return self._sample(logits[rows].float(), reqs) if reqs else {}

        bs = self.block_size
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        image_rows: list[torch.Tensor] = []
        image_spans: list[tuple[int, int]] = []  # (flat start, flat end) of rows replaced by image rows
        sample_index: list[int] = []
        sample_reqs = []
        flat = 0
        for s in sched.scheduled:
            req, start, n = s.request, s.start, s.num_tokens
            end = start + n
            token_ids.extend(req.all_token_ids[start:end])
            positions.append(self._positions(req, start, n))
            table = torch.tensor(req.block_ids, dtype=torch.long)
            idx = torch.arange(start, end)
            slots.append(table[idx // bs] * bs + idx % bs)
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(req.block_ids)
            for img in req.images:
                lo, hi = max(start, img.offset), min(end, img.offset + img.length)
                if lo < hi:
                    image_rows.append(self.encoder_cache[img.mm_hash][lo - img.offset : hi - img.offset])
                    image_spans.append((flat + lo - start, flat + hi - start))
            flat += n
            if s.sample:
                sample_index.append(flat - 1)
                sample_reqs.append(req)

        dev = self.device
        ids = torch.tensor(token_ids, device=dev)
        pos = torch.cat(positions, dim=1).to(dev)
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.zeros(len(tables), max_blocks, dtype=torch.long)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        meta = PagedAttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables.to(dev),
            decode_rows=[i for i, n in enumerate(query_lens) if n == 1],
            prefill_rows=[i for i, n in enumerate(query_lens) if n > 1],
        )
        if image_rows:
            mask = torch.zeros(len(token_ids), dtype=torch.bool)
            for a, b in image_spans:
                mask[a:b] = True
            x = self.model.embed(ids, torch.cat(image_rows), mask.to(dev))
        else:
            x = self.model.embed(ids)
        hidden = self.model(x, pos, TorchPagedAttention(self.kv_caches, meta, self.scale))
        if not sample_reqs:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=dev)]).float()
        return self._sample(logits, sample_reqs)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> dict[str, SampledToken]:
        gens = []
        for r in reqs:
            if r.request_id not in self.generators:
                self.generators[r.request_id] = make_generator(r.sampling_params.seed, self.device)
            gens.append(self.generators[r.request_id])
        batch = build_sampling_batch(
            [r.sampling_params for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.prompt_token_ids for r in reqs],
            gens,
            self.eos_token_ids,
            self.device,
        )
        out = self.sampler(logits, batch)
        result: dict[str, SampledToken] = {}
        for i, r in enumerate(reqs):
            lp = out.logprobs[i] if out.logprobs is not None else None
            top = out.top_logprobs[i] if out.top_logprobs is not None else None
            result[r.request_id] = SampledToken(out.token_ids[i], lp, top)
        return result


class CudaGraphDecoder:
    """Decode steps (one new token per sequence, no images) replayed from CUDA graphs, one per batch size.

    Kernel launches, not math, dominate a decode step at small batch: a graph replays the whole model
    forward (embedding -> 28 layers with paged Triton attention -> logits) as one launch. Inputs go through
    static device buffers; a batch is padded up to the next captured size with rows that write to the
    reserved null block 0 and read one token.
    """

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int) -> None:
        from vlmserve.runner.triton_attention import PARTITION, TritonDecodeAttention

        self.runner = runner
        model, dev = runner.model, runner.device
        self.max_blocks = -(-max_model_len // runner.block_size)
        self.num_partitions = -(-max_model_len // PARTITION)
        self.sizes = sorted(
            {b for b in (1, 2, 4, 8, *range(16, 257, 16)) if b <= max_num_seqs} | {max_num_seqs}
        )
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for b in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            attn = TritonDecodeAttention(
                runner.kv_caches,
                self.slots[:b],
                self.tables[:b],
                self.seq_lens[:b],
                runner.scale,
                self.num_partitions,
            )

            def forward(b: int = b, attn: TritonDecodeAttention = attn) -> torch.Tensor:
                hidden = model(model.embed(self.ids[:b]), self.pos[:, :b], attn)
                return model.compute_logits(hidden)

            with torch.inference_mode():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    forward()  # warm-up: Triton compilation, cuBLAS handles
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[b] = forward()
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def run(
        self,
        token_ids: list[int],
        positions: list[int],  # text positions: the same on all three M-RoPE axes
        slots: list[int],
        tables: list[list[int]],
        seq_lens: list[int],
    ) -> torch.Tensor | None:
        """(B, V) logits, or None when the batch is larger than every captured graph."""
        bsz = len(token_ids)
        size = next((s for s in self.sizes if s >= bsz), None)
        if size is None:
            return None
        width = max(len(t) for t in tables)
        table = np.zeros((bsz, width), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        # Padding rows: token 0 at position 0, written into the null block, attending to one token.
        self.ids[bsz:size].zero_()
        self.pos[:, bsz:size].zero_()
        self.slots[bsz:size].zero_()
        self.seq_lens[bsz:size].fill_(1)
        self.tables[bsz:size, :1].zero_()
        self.ids[:bsz].copy_(torch.tensor(token_ids), non_blocking=True)
        self.pos[:, :bsz].copy_(torch.tensor(positions).expand(3, -1), non_blocking=True)
        self.slots[:bsz].copy_(torch.tensor(slots), non_blocking=True)
        self.tables[:bsz, :width].copy_(torch.from_numpy(table), non_blocking=True)
        self.seq_lens[:bsz].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:bsz]


def num_blocks_for_memory(memory_bytes: int, per_block: int) -> int:
    return max(2, math.floor(memory_bytes / per_block))
