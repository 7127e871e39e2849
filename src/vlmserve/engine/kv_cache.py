"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-request block tables, prefix caching.

Owns which block ids are free, in use (with reference counts: prefix-cache hits share blocks) or free but
still holding a cached prefix. It does not own the KV tensors (the runner does; it indexes them with the block
ids handed out here) and does not decide who runs (scheduler.py). No torch.

Prefix caching hashes every FULL block as a chain: hash(parent block's hash, the block's token ids, extra
keys), where the extra keys are (mm_hash, image offset relative to the block start) of every image whose
placeholder span overlaps the block. Placeholder tokens are all <|image_pad|>, so without the image hash the
same text with a different image would hit; with the relative offset, the same image at another position
misses. A block hit therefore means: the same tokens, the same images at the same places, after the same
prefix, so the KV in the block is the one this request would compute.

NOTE: block 0 is reserved as the null block and is never handed out. The runner pads block tables with 0
(and CUDA graphs can point padding slots at it) without corrupting anyone's KV. The pool therefore has
num_blocks - 1 usable blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from vlmserve.engine.inputs import ImageFeature
from vlmserve.engine.request import Request

NULL_BLOCK_ID = 0
_ROOT_HASH = bytes(32)  # the parent of a request's first block


def hash_block(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: Sequence[tuple[str, int]] = ()
) -> bytes:
    """A stable 32-byte content hash of one full block (blake2b; Python's hash() is salted per process).

    The encoding is unambiguous: a fixed-size parent, a counted list of int64 token ids, then counted
    (offset, mm_hash) pairs.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(parent_hash or _ROOT_HASH)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for mm_hash, rel_offset in extra_keys:
        key = mm_hash.encode()
        h.update(struct.pack("<qI", rel_offset, len(key)))
        h.update(key)
    return h.digest()


def block_extra_keys(images: Sequence[ImageFeature], start: int, end: int) -> tuple[tuple[str, int], ...]:
    """(mm_hash, offset relative to `start`) of every image overlapping token span [start, end)."""
    return tuple(
        (img.mm_hash, img.offset - start)
        for img in images
        if img.offset < end and img.offset + img.length > start
    )


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full, computed and registered in the prefix cache


class KVCacheManager:
    """Block pool + prefix cache. Requests hold block ids in `request.block_ids`; ids index the runner's KV."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first: allocation takes (and, for a cached block,
        # evicts) from the front. Blocks without a hash go to the front, as nothing is lost by reusing them.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        # Per running request: how many of its leading blocks have been offered to the prefix cache.
        self._num_committed: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of which found in the cache

    # --- stats -----------------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (some still hold a cached prefix and are evicted on reuse)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's lookup (the scheduler calls this once the request is actually admitted, so a
        request that waits several steps for blocks is not counted several times)."""
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    def assert_no_leaks(self) -> None:
        """For tests: with no request holding blocks, every block is free and the cache index is consistent."""
        held = [b.block_id for b in self.blocks[1:] if b.ref_count != 0]
        if held:
            raise AssertionError(f"blocks still referenced: {held}")
        if len(self._free) != self.num_usable_blocks:
            raise AssertionError(f"free list has {len(self._free)} blocks, expected {self.num_usable_blocks}")
        if self._num_committed:
            raise AssertionError(f"requests still tracked: {sorted(self._num_committed)}")
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise AssertionError(f"cache index points at block {block_id}, which holds another hash")

    # --- prefix cache ----------------------------------------------------------------------------------

    def _update_block_hashes(self, request: Request, num_blocks: int) -> None:
        """Extend request.block_hashes to cover its first `num_blocks` full blocks."""
        bs = self.block_size
        num_blocks = min(num_blocks, request.num_tokens // bs)
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), num_blocks):
            start, end = i * bs, (i + 1) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[start:end], block_extra_keys(request.images, start, end)))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of full blocks for a request that holds no blocks: (block ids, tokens).

        A pure lookup: nothing is taken until `allocate_slots(..., new_computed_blocks=...)`.
        NOTE: the hit never covers the whole sequence; its last token is always recomputed, as its logits are
        needed to sample the next token.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_block_hashes(request, max_blocks)
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed, so later requests can hit them.

        Called after a step has run (not at scheduling time), so a hit never points at KV still being written.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_committed.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request, num_full)
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            block_hash = request.block_hashes[i]
            # A hit block is already registered; and when two requests computed the same content at once,
            # the first one registered keeps the entry and the duplicate stays anonymous.
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id
        self._num_committed[request.request_id] = num_full

    # --- allocation ------------------------------------------------------------------------------------

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens after its computed ones (plus, at admission,
        the prefix-cache hit `new_computed_blocks` from get_computed_blocks). All or nothing: False, with
        nothing changed, when the pool cannot supply them."""
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_held = len(request.block_ids) + len(new_computed_blocks)
        num_new_blocks = max(self.num_blocks_needed(num_computed + num_new_tokens) - num_held, 0)
        # Hit blocks sitting in the free list stop being free when we take them.
        num_reclaimed = sum(1 for b in new_computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > len(self._free) - num_reclaimed:
            return False
        for block_id in new_computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        request.block_ids.extend(new_computed_blocks)
        if new_computed_blocks:
            self._num_committed[request.request_id] = len(request.block_ids)
        for _ in range(num_new_blocks):
            request.block_ids.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: this prefix is no longer cached
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def free(self, request: Request) -> None:
        """Drop the request's references (finish, abort or preemption). Cached blocks stay cached until evicted."""
        # Reversed, so a request's tail blocks are evicted before its head: heads are the shared prefixes.
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        self._num_committed.pop(request.request_id, None)
