"""The wrapper every vision-language family shares: a vision tower (`visual`), a language model (`model`,
with `embed_tokens`) and an lm_head unless tied to the embedding. Images in as packed patches, token embeddings
with the images' rows scattered in, hidden states out, logits from them.

A family subclasses it with its own tower and language model (and overrides `embed` / `forward` where its
image rows carry more, as Qwen3-VL's DeepStack features do). Parameter names follow the released checkpoints
(`visual.*`, `model.*`, `lm_head.*`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmserve.models.layers.attention import AttentionBackend
from vlmserve.models.layers.parallel import (
    TensorParallel,
    VocabParallelHead,
    kv_heads_per_rank,
    vocab_logits,
)
from vlmserve.models.layers.weights import CheckpointLoadable


class VisionLanguageModel(CheckpointLoadable):
    def __init__(
        self, config: Any, visual: nn.Module, model: nn.Module, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.visual = visual  # replicated on every rank under tensor parallelism
        self.model = model
        self.tp = tp
        text = config.text
        # KV heads this rank's cache holds (all of them without tensor parallelism).
        self.num_kv_heads = (
            text.num_key_value_heads if tp is None else kv_heads_per_rank(text.num_key_value_heads, tp)
        )
        if not text.tie_word_embeddings:
            if tp is None:
                self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
            else:
                self.lm_head = VocabParallelHead(text.hidden_size, text.vocab_size, tp)
        self.remember_fused_shards()

    def encode_images(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """All images' patches packed (N, C*T*P*P) -> one (tokens_i, width) embedding per image."""
        out = self.visual(patches, grids)
        unit = self.config.vision.spatial_merge_size**2
        return list(out.split([t * h * w // unit for t, h, w in grids]))

    def embed(
        self,
        token_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_ids (T,) -> (T, hidden), with rows where image_mask is set replaced by image_embeds in order."""
        x = self.model.embed_tokens(token_ids)
        if image_embeds is not None and image_mask is not None:
            x = x.masked_scatter(image_mask[:, None], image_embeds.to(x.dtype))
        return x

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        return self.model(embeds, positions, attn)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """(T, hidden) -> (T, V). Under tensor parallelism: (T, V) on rank 0 (the ranks' vocabulary columns
        gathered), this rank's columns elsewhere; `gather=False` leaves the gather to `gather_logits` (the
        CUDA graphs capture the matmul and run the gather after the replay)."""
        weight = (
            self.model.embed_tokens.weight if self.config.text.tie_word_embeddings else self.lm_head.weight
        )
        logits = hidden @ weight.t()
        if self.tp is not None and gather:
            return self.gather_logits(logits)
        return logits

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary columns (T, V / size) -> (T, V) on rank 0; identity without tensor
        parallelism."""
        if self.tp is None:
            return local
        return vocab_logits(local, self.config.text.vocab_size, self.tp)
