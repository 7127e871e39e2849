"""KV block pool and prefix cache: allocation, reference counts, LRU eviction, hash chains with image keys."""

from __future__ import annotations

import pytest

from vlmserve.engine.encoder_cache import EncoderCacheManager
from vlmserve.engine.inputs import ImageFeature
from vlmserve.engine.kv_cache import NULL_BLOCK_ID, KVCacheManager, block_extra_keys, hash_block
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams

BS = 4
PAD = 7


def make_request(rid: str, tokens: list[int], images: list[ImageFeature] | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), images=images or [])


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit a waiting request with its prefix-cache hit, compute the whole prompt, cache it."""
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req, req.num_computed_tokens)
    return num_hit


def test_hash_is_stable_and_chained() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert len(a) == 32
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], [("img", 0)]) != a
    assert hash_block(None, [1, 2, 3, 4], [("img", 0)]) != hash_block(None, [1, 2, 3, 4], [("img", 1)])
    assert hash_block(None, [1, 2, 3, 4], [("img", 0)]) != hash_block(None, [1, 2, 3, 4], [("other", 0)])


def test_extra_keys_are_images_overlapping_the_block() -> None:
    images = [ImageFeature("x", 2, 5, None), ImageFeature("y", 9, 2, None)]  # spans [2, 7) and [9, 11)
    assert block_extra_keys(images, 0, 4) == (("x", 2),)
    assert block_extra_keys(images, 4, 8) == (("x", -2),)
    assert block_extra_keys(images, 8, 12) == (("y", 1),)
    assert block_extra_keys(images, 12, 16) == ()


def test_null_block_is_never_handed_out() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    req = make_request("a", list(range(16)))
    assert kv.allocate_slots(req, 16)
    assert sorted(req.block_ids) == [1, 2, 3, 4]
    assert NULL_BLOCK_ID not in req.block_ids
    assert kv.num_free_blocks == 0
    assert kv.usage == 1.0
    assert not kv.allocate_slots(make_request("b", [1]), 1)


def test_allocate_grows_with_tokens_and_free_releases_everything() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    req = make_request("a", list(range(6)))
    assert kv.allocate_slots(req, 6)
    assert len(req.block_ids) == 2
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 2)  # fits in the second block
    assert len(req.block_ids) == 2
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 1)
    assert len(req.block_ids) == 3
    assert kv.num_used_blocks == 3
    kv.free(req)
    assert req.block_ids == []
    kv.assert_no_leaks()


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable
    req = make_request("a", list(range(20)))
    assert not kv.allocate_slots(req, 20)
    assert req.block_ids == []
    assert kv.num_free_blocks == 3


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks
    a = make_request("a", prompt)
    assert admit(kv, a) == 0
    b = make_request("b", [*prompt, 99])
    assert admit(kv, b) == 12
    assert b.block_ids[:3] == a.block_ids[:3]
    assert all(kv.blocks[i].ref_count == 2 for i in a.block_ids[:3])
    kv.free(a)
    assert all(kv.blocks[i].ref_count == 1 for i in b.block_ids[:3])
    kv.free(b)
    kv.assert_no_leaks()


def test_hit_never_covers_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(12))  # exactly 3 full blocks
    admit(kv, make_request("a", prompt))
    hits, num_hit = kv.get_computed_blocks(make_request("b", prompt))
    assert num_hit == 8  # not 12: the last token must be computed to get logits
    assert len(hits) == 2


def test_freed_blocks_stay_cached_and_are_revived_by_a_hit() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    a = make_request("a", prompt)
    admit(kv, a)
    kv.free(a)
    kv.assert_no_leaks()
    assert kv.num_cached_blocks == 2
    b = make_request("b", prompt)
    assert admit(kv, b) == 8
    assert kv.num_free_blocks == 19 - 3  # two revived from the free list, one new
    kv.free(b)
    kv.assert_no_leaks()


def test_lru_eviction_order_and_eviction_drops_the_hash() -> None:
    kv = KVCacheManager(num_blocks=7, block_size=BS)  # 6 usable
    a = make_request("a", [1] * 4 + [2] * 4 + [0])
    b = make_request("b", [3] * 4 + [4] * 4 + [0])
    admit(kv, a)
    admit(kv, b)
    kv.free(a)  # a's blocks are now least recently used
    kv.free(b)
    # Taking 4 blocks reuses the 2 never-hashed tail blocks first, then evicts a's 2 blocks.
    c = make_request("c", [5] * 16)
    assert kv.allocate_slots(c, 16)
    assert kv.get_computed_blocks(make_request("a2", [1] * 4 + [2] * 4 + [0]))[1] == 0
    assert kv.get_computed_blocks(make_request("b2", [3] * 4 + [4] * 4 + [0]))[1] == 8
    kv.free(c)
    kv.assert_no_leaks()


def test_tail_blocks_are_evicted_before_the_shared_head() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # 4 usable
    a = make_request("a", [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [0])
    hits, _ = kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 16, hits)
    a.num_computed_tokens = 16
    kv.cache_full_blocks(a, 16)
    kv.free(a)
    d = make_request("d", [9])
    assert kv.allocate_slots(d, 1)  # evicts exactly one block: the last one
    assert kv.get_computed_blocks(make_request("a2", [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [0]))[1] == 12
    kv.free(d)
    kv.assert_no_leaks()


def test_same_text_different_image_never_hits() -> None:
    kv = KVCacheManager(num_blocks=30, block_size=BS)
    text = [1, 2, 3, 4, 5, 6] + [PAD] * 8 + [8, 9, 10]  # image span [6, 14)
    admit(kv, make_request("a", text, [ImageFeature("cat", 6, 8, None)]))
    same = make_request("b", text, [ImageFeature("cat", 6, 8, None)])
    other = make_request("c", text, [ImageFeature("dog", 6, 8, None)])
    assert kv.get_computed_blocks(same)[1] == 16
    assert kv.get_computed_blocks(other)[1] == 4  # only the block before the image


def test_same_image_at_another_offset_misses() -> None:
    kv = KVCacheManager(num_blocks=30, block_size=BS)
    # Identical token ids; the image covers [4, 12) in one and [5, 12) in the other (with a PAD before it).
    tokens = [1, 2, 3, 4] + [PAD] * 8 + [5]
    admit(kv, make_request("a", tokens, [ImageFeature("cat", 4, 8, None)]))
    shifted = make_request("b", tokens, [ImageFeature("cat", 5, 7, None)])
    assert kv.get_computed_blocks(shifted)[1] == 4


def test_duplicate_content_computed_twice_keeps_one_entry() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    for req in (a, b):  # both admitted before either is cached, as in one step
        hits, _ = kv.get_computed_blocks(req)
        assert hits == []
        assert kv.allocate_slots(req, 9)
    for req in (a, b):
        req.num_computed_tokens = 9
        kv.cache_full_blocks(req, 9)
    assert kv.num_cached_blocks == 2
    assert kv.get_computed_blocks(make_request("c", prompt))[0] == a.block_ids[:2]
    kv.free(a)
    kv.free(b)
    kv.assert_no_leaks()


def test_disabled_prefix_caching_never_hits() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    a = make_request("a", prompt)
    assert admit(kv, a) == 0
    assert admit(kv, make_request("b", prompt)) == 0
    assert kv.num_cached_blocks == 0


def test_assert_no_leaks_reports_held_blocks() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    assert kv.allocate_slots(make_request("a", [1, 2]), 2)
    with pytest.raises(AssertionError, match="still referenced"):
        kv.assert_no_leaks()


def test_encoder_cache_keeps_unreferenced_entries_and_evicts_lru() -> None:
    enc = EncoderCacheManager(capacity=10)
    enc.allocate("x", 4, "r1")
    enc.allocate("y", 4, "r2")
    assert not enc.can_allocate(4)  # both referenced
    enc.release("x", "r1")
    enc.release("y", "r2")
    assert enc.is_cached("x")
    assert enc.can_allocate(4)
    assert not enc.can_allocate(4, pinned={"x", "y"})
    enc.add_ref("y", "r3")  # revive y: now only x may go
    enc.allocate("z", 5, "r3")
    assert enc.take_freed() == ["x"]
    assert enc.take_freed() == []
    assert enc.hashes_of("r3") == {"y", "z"}
    enc.release_request("r3")
    assert enc.num_referencing_requests == 0
    assert enc.num_used_tokens == 9
