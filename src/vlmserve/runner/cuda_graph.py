"""Decode steps replayed from CUDA graphs, one graph per padded batch size (GPU only).

Owns the graphs, their static input buffers and the memory pool they share. The model runner decides when a
step is a graph step (every row decodes one text token and the batch fits) and hands over plain ints; this
module does not know requests, images or sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlmserve.runner.attention import padded_block_tables

if TYPE_CHECKING:
    from vlmserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class CudaGraphDecoder:
    """Decode steps (one new token per sequence, no images) replayed from CUDA graphs, one per batch size.

    Kernel launches, not math, dominate a decode step at small batch: a graph replays the whole model
    forward (embedding -> 28 layers with paged Triton attention -> logits) as one launch. Inputs go through
    static device buffers; a batch is padded up to the next captured size with rows that write to the
    reserved null block 0 and read one token.
    """

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int) -> None:
        from vlmserve.runner.triton_attention import TritonDecodeAttention

        self.runner = runner
        model, dev = runner.model, runner.device
        self.max_blocks = -(-max_model_len // runner.block_size)
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
                max_model_len,
            )

            def forward(b: int = b, attn: TritonDecodeAttention = attn) -> torch.Tensor:
                hidden = model(model.embed(self.ids[:b]), self.pos[:, :b], attn)
                # Under tensor parallelism each rank's vocabulary columns: the gather runs after the replay
                # (the all-reduces inside the layers are captured; a gather to one rank is left out).
                return model.compute_logits(hidden, gather=False)

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

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(
        self,
        token_ids: list[int],
        positions: list[int],  # text positions: the same on all three M-RoPE axes
        slots: list[int],
        tables: list[list[int]],
        seq_lens: list[int],
        fill_pending: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """(B, V) logits; the batch must `fit`. `fill_pending` gets the token-id input buffer after the
        host's ids are copied in, to write the ids still on the device."""
        bsz = len(token_ids)
        size = next(s for s in self.sizes if s >= bsz)
        table = padded_block_tables(tables, np.int32)
        width = table.shape[1]
        # Padding rows: token 0 at position 0, written into the null block, attending to one token.
        self.ids[bsz:size].zero_()
        self.pos[:, bsz:size].zero_()
        self.slots[bsz:size].zero_()
        self.seq_lens[bsz:size].fill_(1)
        self.tables[bsz:size, :1].zero_()
        # One pinned host buffer, one copy for the four int64 inputs (from pageable memory a copy may wait
        # for the queued kernels to finish).
        packed = torch.tensor([token_ids, positions, slots, seq_lens]).pin_memory()
        dev = packed.to(self.ids.device, non_blocking=True)
        self.ids[:bsz].copy_(dev[0])
        self.pos[:, :bsz].copy_(dev[1].expand(3, -1))
        self.slots[:bsz].copy_(dev[2])
        self.seq_lens[:bsz].copy_(dev[3])
        self.tables[:bsz, :width].copy_(torch.from_numpy(table).pin_memory(), non_blocking=True)
        if fill_pending is not None:
            fill_pending(self.ids[:bsz])
        self.graphs[size].replay()
        logits = self.logits[size][:bsz]
        return logits if self.runner.model.tp is None else self.runner.model.gather_logits(logits)
