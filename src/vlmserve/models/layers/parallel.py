"""Tensor-parallel layers: each rank holds one shard of a layer and the layers that need it talk to the others.

    column-parallel linear   q/k/v, gate/up: each rank computes its heads / its slice of the intermediate
                             dimension; no communication
    row-parallel linear      o_proj, down_proj: each rank multiplies its slice of the input; one all-reduce
                             sums the partial outputs (the bias is added once, after it)
    vocab-parallel embedding each rank looks up the ids in its vocabulary range (zeros elsewhere); all-reduce
    vocab-parallel head      each rank computes the logits of its vocabulary range; rank 0 gathers them

KV heads split across ranks like the query heads; where there are fewer KV heads than ranks, each KV head is
replicated on the `size / num_kv_heads` ranks whose query heads read it.

Every parallel module says which part of a checkpoint tensor it holds (`checkpoint_read`), so the loader
reads only that part from the safetensors file (models/loader.py). With `tp=None` the factories here return
the plain modules the single-device model has always used: no all-reduce, no extra copy.

Does not know how the ranks were started or how a step reaches them (runner/tensor_parallel.py); the
collectives go through the `TensorParallel` group it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlmserve.models.layers.weights import merged_linear

# (dim, [(start, stop), ...]): read these ranges of `dim` from a checkpoint tensor and concatenate them.
ShardRead = tuple[int, list[tuple[int, int]]]


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: `rank` of `size`, and the process group (a
    torch.distributed ProcessGroup: gloo on CPU, NCCL on GPU) its collectives run on. The group object is
    used directly, not registered as torch.distributed's default group, so several engines (or tests) can
    live in one process."""

    rank: int
    size: int
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        self.group.allreduce([x]).wait()
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) on every rank -> (B, size * N) on rank 0, ranks' columns in rank order; the other ranks get
        their own `x` back (they do not sample)."""
        x = x.contiguous()
        outs = [[torch.empty_like(x) for _ in range(self.size)]] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.group.gather(outs, [x], opts).wait()
        return torch.cat(outs[0], dim=-1) if self.rank == 0 else x

    def split(self, n: int, what: str) -> int:
        """n / size, or an error naming `what` when it does not divide."""
        if n % self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} does not divide {what} ({n}); use a size that divides it"
            )
        return n // self.size


def kv_heads_per_rank(num_kv_heads: int, tp: TensorParallel) -> int:
    """KV heads one rank holds: its share, or 1 (replicated) when there are fewer KV heads than ranks."""
    if num_kv_heads >= tp.size:
        return tp.split(num_kv_heads, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {tp.size} is neither a divisor nor a multiple of num_key_value_heads "
            f"({num_kv_heads}); use a size that is"
        )
    return 1


def first_kv_head(num_kv_heads: int, tp: TensorParallel) -> int:
    """The first KV head rank `tp.rank` holds (its query heads read exactly the KV heads it holds)."""
    if num_kv_heads >= tp.size:
        return tp.rank * (num_kv_heads // tp.size)
    return tp.rank // (tp.size // num_kv_heads)


class ColumnParallelLinear(nn.Linear):
    """A linear layer holding some output rows of the full layer: for each fused checkpoint projection (q, k,
    v or gate, up; `full_sizes` rows each in the full layer), the rows `row_ranges[i]` of it. Stays an
    nn.Linear; `shard_sizes` are the local sizes."""

    def __init__(
        self, in_features: int, full_sizes: list[int], row_ranges: list[tuple[int, int]], bias: bool
    ) -> None:
        super().__init__(in_features, sum(b - a for a, b in row_ranges), bias=bias)
        self.full_sizes = full_sizes
        self.row_ranges = row_ranges
        self.shard_sizes = [b - a for a, b in row_ranges]

    def checkpoint_read(self, param: str, shard: int | None, shape: tuple[int, ...]) -> ShardRead:
        if shard is not None:  # one projection stored on its own (q_proj, ...)
            return 0, [self.row_ranges[shard]]
        # The projections stored fused, in order: each one's rows, offset by the ones before it.
        offsets = [sum(self.full_sizes[:i]) for i in range(len(self.full_sizes))]
        return 0, [(off + a, off + b) for off, (a, b) in zip(offsets, self.row_ranges, strict=True)]


class RowParallelLinear(nn.Linear):
    """A linear layer holding the input columns [start, start + in_features) of the full layer; the partial
    outputs are summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp
        self.start = tp.rank * in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def checkpoint_read(self, param: str, shard: int | None, shape: tuple[int, ...]) -> ShardRead | None:
        if param == "bias":
            return None  # replicated, added once after the all-reduce
        return 1, [(self.start, self.start + self.in_features)]


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows [start, start + rows) of the vocabulary (the last rank's tail past the vocabulary
    is zero padding)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        rows = -(-vocab_size // tp.size)
        super().__init__(rows, hidden_size)
        self.tp = tp
        self.vocab_size = vocab_size
        self.start = tp.rank * rows
        self.stop = min(self.start + rows, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, 0)
        return self.tp.all_reduce(F.embedding(local, self.weight) * mine[:, None].to(self.weight.dtype))

    def checkpoint_read(self, param: str, shard: int | None, shape: tuple[int, ...]) -> ShardRead:
        return 0, [(self.start, self.stop)]


class VocabParallelHead(nn.Module):
    """lm_head rows for this rank's vocabulary range, like VocabParallelEmbedding's."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        rows = -(-vocab_size // tp.size)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.start = tp.rank * rows
        self.stop = min(self.start + rows, vocab_size)

    def checkpoint_read(self, param: str, shard: int | None, shape: tuple[int, ...]) -> ShardRead:
        return 0, [(self.start, self.stop)]


def vocab_logits(local: torch.Tensor, vocab_size: int, tp: TensorParallel) -> torch.Tensor:
    """This rank's logits (T, V / size) -> (T, V) on rank 0 (the padding columns dropped); the other ranks
    get their local columns back."""
    logits = tp.gather_columns(local)
    return logits[:, :vocab_size] if tp.rank == 0 else logits


# --- factories: plain modules when tp is None -----------------------------------------------------------


def qkv_linear(
    hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, tp: TensorParallel | None
) -> nn.Linear:
    """Fused [q | k | v]: all heads, or this rank's query heads and the KV heads they read."""
    if tp is None:
        return merged_linear(
            hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias=bias
        )
    q = tp.split(num_heads, "num_attention_heads") * head_dim
    kv = kv_heads_per_rank(num_kv_heads, tp) * head_dim
    kv_start = first_kv_head(num_kv_heads, tp) * head_dim
    return ColumnParallelLinear(
        hidden_size,
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
        [(tp.rank * q, (tp.rank + 1) * q), (kv_start, kv_start + kv), (kv_start, kv_start + kv)],
        bias,
    )


def gate_up_linear(
    hidden_size: int, intermediate_size: int, bias: bool, tp: TensorParallel | None
) -> nn.Linear:
    """Fused [gate | up]: the whole intermediate dimension, or this rank's slice of it."""
    if tp is None:
        return merged_linear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
    n = tp.split(intermediate_size, "intermediate_size")
    rows = (tp.rank * n, (tp.rank + 1) * n)
    return ColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], [rows, rows], bias)


def row_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallel | None) -> nn.Linear:
    """o_proj / down_proj: the full layer, or this rank's input columns followed by an all-reduce."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(
        tp.split(in_features, "the input of a row-parallel layer"), out_features, bias, tp
    )


def embedding(vocab_size: int, hidden_size: int, tp: TensorParallel | None) -> nn.Embedding:
    if tp is None:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def check_tensor_parallel(text: Any, size: int) -> None:
    """Raise, naming the field, when `size` ranks cannot split a language model of config `text` (before any
    process starts)."""
    tp = TensorParallel(0, size)
    tp.split(text.num_attention_heads, "num_attention_heads")
    kv_heads_per_rank(text.num_key_value_heads, tp)
    tp.split(text.intermediate_size, "intermediate_size")
    if getattr(text, "num_experts", 0):
        tp.split(text.moe_intermediate_size, "moe_intermediate_size")
