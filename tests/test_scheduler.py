"""Scheduler against a fake paged model: batched, chunked, preempted, prefix-cached runs give the same tokens
as a plain one-request-at-a-time loop; nothing leaks; limits and stop conditions hold.

The fake runner behaves like a paged model where it matters: it writes each computed position's "KV" (token
id, plus the encoder row for image placeholders, which must be in its encoder cache) into the block given by
the request's block table, and samples the next token as a hash of the KV it reads back through the block
table. A wrong block table, a wrong `start`, a stale prefix-cache hit, a write into a shared block or a missing
encoder output therefore changes the tokens or fails loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from array import array
from collections import Counter
from collections.abc import Callable

import pytest

from vlmserve.engine.inputs import EngineRequest, ImageFeature
from vlmserve.engine.request import Request, RequestStatus, requests_from_engine_request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 64
EOS = 3
PAD = 7  # image placeholder token
TEXT_LOW = 8  # prompt text tokens are drawn from [TEXT_LOW, VOCAB)


# --- the fake model ------------------------------------------------------------------------------------


def encoder_rows(mm_hash: str, length: int) -> list[int]:
    digest = hashlib.blake2b(mm_hash.encode()).digest()
    return [1 + (digest[j % len(digest)] * 131 + j) % 997 for j in range(length)]


def next_token(kv: list[int]) -> int:
    digest = hashlib.blake2b(array("q", kv).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % VOCAB


def prompt_kv(req: Request) -> list[int]:
    """The KV a correct model holds for the prompt: token and, on placeholders, the image's encoder row."""
    kv = [t * 1000 for t in req.prompt_token_ids]
    for img in req.images:
        rows = encoder_rows(img.mm_hash, img.length)
        for j in range(img.length):
            kv[img.offset + j] += rows[j]
    return kv


def reference_generate(
    req: Request, max_model_len: int, eos: int | None = EOS
) -> tuple[list[int], RequestStatus]:
    """The plain loop: one request, its whole sequence recomputed every token, no blocks, no cache."""
    params = req.sampling_params
    kv = prompt_kv(req)
    out: list[int] = []
    while True:
        token = next_token(kv)
        out.append(token)
        if len(out) > params.min_tokens and (
            (token == eos and not params.ignore_eos) or token in params.stop_token_ids
        ):
            return out, RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and len(out) >= params.max_tokens:
            return out, RequestStatus.FINISHED_LENGTH
        if req.num_prompt_tokens + len(out) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH
        kv.append(token * 1000)


class FakeRunner:
    def __init__(self, scheduler: Scheduler) -> None:
        cfg = scheduler.config
        self.scheduler = scheduler
        self.block_size = cfg.block_size
        self.kv: list[list[int | None]] = [[None] * cfg.block_size for _ in range(cfg.num_blocks)]
        self.encoder_cache: dict[str, list[int]] = {}
        self.encoder_capacity = cfg.encoder_cache_size
        self.encoded: Counter[str] = Counter()

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for mm_hash in out.free_encoder_hashes:
            del self.encoder_cache[mm_hash]
        for req, i in out.encoder_inputs:
            img = req.images[i]
            assert img.mm_hash not in self.encoder_cache, f"{img.mm_hash} encoded while cached"
            self.encoder_cache[img.mm_hash] = encoder_rows(img.mm_hash, img.length)
            self.encoded[img.mm_hash] += 1
        assert sum(len(rows) for rows in self.encoder_cache.values()) <= self.encoder_capacity
        holders = Counter(b for r in self.scheduler.running for b in r.block_ids)
        bs = self.block_size
        sampled: dict[str, int] = {}
        for s in out.scheduled:
            req = s.request
            for pos in range(s.start, s.start + s.num_tokens):
                block = req.block_ids[pos // bs]
                assert block != 0, "wrote into the null block"
                assert holders[block] == 1, f"wrote into block {block}, shared with another request"
                self.kv[block][pos % bs] = self._embed(req, pos)
            if s.sample:
                kv = [self.kv[req.block_ids[p // bs]][p % bs] for p in range(s.start + s.num_tokens)]
                assert None not in kv, "read KV that was never computed"
                sampled[req.request_id] = next_token(kv)  # type: ignore[arg-type]
        return sampled

    def _embed(self, req: Request, pos: int) -> int:
        value = req.all_token_ids[pos] * 1000
        for img in req.images:
            if img.offset <= pos < img.offset + img.length:
                return value + self.encoder_cache[img.mm_hash][pos - img.offset]
        return value


def check_step(scheduler: Scheduler, out: SchedulerOutput) -> None:
    cfg = scheduler.config
    assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled) <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    assert all(s.num_tokens > 0 for s in out.scheduled)
    assert len({id(s.request) for s in out.scheduled}) == len(out.scheduled)
    hashes = [req.images[i].mm_hash for req, i in out.encoder_inputs]
    assert len(hashes) == len(set(hashes))
    assert sum(req.images[i].length for req, i in out.encoder_inputs) <= cfg.encoder_tokens_per_step
    for s in out.scheduled:
        assert s.request.num_computed_tokens == s.start + s.num_tokens
        assert s.sample == (s.start + s.num_tokens == s.request.num_tokens)
        assert len(s.request.block_ids) * cfg.block_size >= s.start + s.num_tokens


def run(
    scheduler: Scheduler,
    runner: FakeRunner,
    arrivals: dict[int, list[Request]] | None = None,
    on_step: Callable[[int, SchedulerOutput], None] | None = None,
    max_steps: int = 5000,
) -> list[SchedulerOutput]:
    arrivals = dict(arrivals or {})
    outputs = []
    step = 0
    while scheduler.has_unfinished_requests() or arrivals:
        for req in arrivals.pop(step, []):
            scheduler.add_request(req)
        out = scheduler.schedule()
        check_step(scheduler, out)
        if on_step is not None:
            on_step(step, out)
        scheduler.update_from_output(out, runner.execute(out))
        outputs.append(out)
        step += 1
        assert step < max_steps, "no progress"
    return outputs


def assert_clean(scheduler: Scheduler) -> None:
    assert scheduler.get_request_counts() == (0, 0)
    assert not scheduler.has_unfinished_requests()
    scheduler.kv.assert_no_leaks()
    assert scheduler.encoder_cache.num_referencing_requests == 0


def text(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TEXT_LOW, VOCAB) for _ in range(n)]


def make_request(
    rid: str, prompt: list[int], images: list[ImageFeature] | None = None, **params: object
) -> Request:
    params.setdefault("temperature", 0.0)
    return Request(rid, prompt, SamplingParams(**params), images=images or [])  # type: ignore[arg-type]


def image_prompt(parts: list[list[int] | tuple[str, int]]) -> tuple[list[int], list[ImageFeature]]:
    """Build a prompt from text parts and (mm_hash, length) images."""
    prompt: list[int] = []
    images = []
    for part in parts:
        if isinstance(part, tuple):
            images.append(ImageFeature(part[0], len(prompt), part[1], None))
            prompt += [PAD] * part[1]
        else:
            prompt += part
    return prompt, images


def workload(seed: int, n: int) -> list[Request]:
    rng = random.Random(seed)
    system = text(rng, 10)
    # Same-length images: identical placeholder tokens that only the image hash tells apart.
    pool = [("imgA", 12), ("imgB", 8), ("imgC", 20), ("imgD", 8), ("imgE", 12)]
    reqs = []
    for i in range(n):
        parts: list[list[int] | tuple[str, int]] = [list(system)] if rng.random() < 0.6 else []
        for _ in range(rng.randint(0, 2)):
            parts += [text(rng, rng.choice([0, 0, 3, 8])), rng.choice(pool)]
        parts.append(text(rng, rng.randint(1, 30)))
        prompt, images = image_prompt(parts)
        max_tokens = None if i % 7 == 3 else rng.randint(1, 25)
        reqs.append(make_request(f"r{i}", prompt, images, max_tokens=max_tokens))
    return reqs


# --- batched == one at a time -------------------------------------------------------------------------

TIGHT = SchedulerConfig(
    num_blocks=34,  # 33 usable: one max_model_len sequence plus a little; 8 sequences must preempt
    block_size=4,
    max_model_len=128,
    max_num_seqs=8,
    max_num_batched_tokens=24,  # forces chunked prefill of every longer prompt
    encoder_cache_size=32,
    max_encoder_tokens_per_step=24,
)
ROOMY = SchedulerConfig(num_blocks=600, block_size=4, max_model_len=128, encoder_cache_size=1000)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("config", [TIGHT, ROOMY], ids=["tight", "roomy"])
def test_batched_run_matches_one_at_a_time(config: SchedulerConfig, prefix_caching: bool, seed: int) -> None:
    config = dataclasses.replace(config, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(config, eos_token_ids=[EOS])
    runner = FakeRunner(scheduler)
    reqs = workload(seed=seed, n=24)
    arrivals: dict[int, list[Request]] = {}
    for i, req in enumerate(reqs):  # 16 at once, the rest trickling in while others run
        arrivals.setdefault(0 if i < 16 else 3 * i, []).append(req)
    outputs = run(scheduler, runner, arrivals)

    for req in reqs:
        expected, status = reference_generate(req, config.max_model_len)
        assert req.output_token_ids == expected, req.request_id
        assert req.status is status
    assert_clean(scheduler)
    # Every request is reported finished exactly once (the last ones by the next schedule()).
    finished = [rid for out in [*outputs, scheduler.schedule()] for rid in out.finished_request_ids]
    assert sorted(finished) == sorted(r.request_id for r in reqs)
    if config.num_blocks == TIGHT.num_blocks:
        assert scheduler.num_preemptions > 0
        assert any(out.preempted_request_ids for out in outputs)
        assert any(
            s.num_tokens < s.request.num_prompt_tokens and not s.sample for o in outputs for s in o.scheduled
        )
    if prefix_caching:
        assert scheduler.kv.prefix_cache_hits > 0
        assert 0.0 < scheduler.stats().prefix_cache_hit_rate < 1.0
    else:
        assert scheduler.kv.prefix_cache_hits == 0
    assert scheduler.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_random_aborts_never_leak(seed: int) -> None:
    scheduler = Scheduler(TIGHT, eos_token_ids=[EOS])
    runner = FakeRunner(scheduler)
    reqs = workload(seed=10 + seed, n=24)
    rng = random.Random(seed)
    aborted: set[str] = set()
    scheduler.add_requests(reqs)
    step = 0
    while scheduler.has_unfinished_requests():
        if rng.random() < 0.15:  # waiting, mid-prefill, decoding or preempted: whatever it is now
            rid = rng.choice(sorted(scheduler.requests))
            assert scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED) is not None
            aborted.add(rid)
        out = scheduler.schedule()
        check_step(scheduler, out)
        scheduler.update_from_output(out, runner.execute(out))
        step += 1
        assert step < 5000
    assert aborted
    for req in reqs:
        if req.request_id in aborted:
            assert req.status is RequestStatus.FINISHED_ABORTED
        else:
            assert req.output_token_ids == reference_generate(req, TIGHT.max_model_len)[0]
    assert_clean(scheduler)


def test_roomy_encoder_cache_encodes_each_image_once() -> None:
    scheduler = Scheduler(ROOMY, eos_token_ids=[EOS])
    runner = FakeRunner(scheduler)
    reqs = workload(seed=1, n=20)
    run(scheduler, runner, {0: reqs[:10], 5: reqs[10:]})
    used = {img.mm_hash for r in reqs for img in r.images}
    assert len(used) >= 3
    assert runner.encoded == Counter(dict.fromkeys(used, 1))
    assert_clean(scheduler)


def test_encoder_budget_and_cache_size_hold_with_many_images() -> None:
    config = SchedulerConfig(
        num_blocks=200,
        block_size=4,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        encoder_cache_size=24,
        max_encoder_tokens_per_step=20,
    )
    scheduler = Scheduler(config, eos_token_ids=[EOS])
    runner = FakeRunner(scheduler)  # asserts the cache never holds more than 24 rows
    reqs = workload(seed=2, n=16)
    run(scheduler, runner, {0: reqs})
    for req in reqs:
        assert req.output_token_ids == reference_generate(req, config.max_model_len)[0]
    assert_clean(scheduler)


# --- chunked prefill does not stall decodes ------------------------------------------------------------


def test_running_decode_gets_a_token_every_step_during_a_long_prefill() -> None:
    config = SchedulerConfig(
        num_blocks=200, block_size=4, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(3)
    decoder = make_request("decode", text(rng, 4), max_tokens=60)
    long = make_request("long", text(rng, 200), max_tokens=2)

    def on_step(step: int, out: SchedulerOutput) -> None:
        by_id = {s.request.request_id: s for s in out.scheduled}
        if step >= 1 and not decoder.is_finished:
            assert by_id["decode"].num_tokens == 1
        if "long" in by_id and not by_id["long"].sample:
            assert by_id["long"].num_tokens == 15  # chunked, leaving the decode its token
            prefill_steps.append(step)

    prefill_steps: list[int] = []
    run(scheduler, runner, {0: [decoder], 2: [long]}, on_step)
    assert len(prefill_steps) >= 10
    assert decoder.output_token_ids == reference_generate(decoder, 256, eos=None)[0]
    assert long.output_token_ids == reference_generate(long, 256, eos=None)[0]
    assert_clean(scheduler)


def test_prefill_ahead_of_a_decode_leaves_it_a_token() -> None:
    """A prefill can sit ahead of a decode in the running order when an image held it back: it must still
    leave a token of the budget for every decode behind it."""
    config = SchedulerConfig(
        num_blocks=200,
        block_size=4,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        encoder_cache_size=16,
        max_encoder_tokens_per_step=16,
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(4)
    w_prompt, w_images = image_prompt([text(rng, 2), ("Y", 16), text(rng, 2)])
    p_prompt, p_images = image_prompt([text(rng, 4), ("X", 16), text(rng, 40)])
    w = make_request("w", w_prompt, w_images, max_tokens=30)
    p = make_request("p", p_prompt, p_images, max_tokens=5)
    d = make_request("d", text(rng, 3), max_tokens=40)
    seen: list[tuple[int, int]] = []

    def on_step(step: int, out: SchedulerOutput) -> None:
        by_id = {s.request.request_id: s for s in out.scheduled}
        if step == 1:  # Y fills the encoder cache: p stops before X, d gets in behind it
            assert by_id["p"].num_tokens == 4
            assert [id(r) for r in scheduler.running] == [id(w), id(p), id(d)]
        if step >= 2 and "p" in by_id and not by_id["p"].sample:
            seen.append((by_id["p"].num_tokens, by_id["d"].num_tokens))

    run(scheduler, runner, {0: [w, p, d]}, on_step)
    assert seen
    assert all(n_d == 1 for _, n_d in seen)
    assert seen[0][0] == 14  # 16 - w's decode - d's decode
    for req in (w, p, d):
        assert req.output_token_ids == reference_generate(req, 256, eos=None)[0]
    assert_clean(scheduler)


def test_long_prefill_threshold_caps_chunks() -> None:
    config = SchedulerConfig(
        num_blocks=200,
        block_size=4,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        long_prefill_token_threshold=8,
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(5)
    a = make_request("a", text(rng, 40), max_tokens=3)
    b = make_request("b", text(rng, 40), max_tokens=3)
    outputs = run(scheduler, runner, {0: [a, b]})
    first = outputs[0]
    assert [(s.request.request_id, s.num_tokens) for s in first.scheduled] == [("a", 8), ("b", 8)]
    assert all(s.num_tokens <= 8 for o in outputs for s in o.scheduled)
    assert_clean(scheduler)


# --- preemption ----------------------------------------------------------------------------------------


def test_preemption_recomputes_and_gives_the_same_tokens() -> None:
    # KV for exactly one max_model_len sequence: two long requests must take turns.
    config = SchedulerConfig(
        num_blocks=17, block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(6)
    reqs = [make_request(f"r{i}", text(rng, 20), max_tokens=40) for i in range(3)]
    outputs = run(scheduler, runner, {0: reqs})
    assert scheduler.num_preemptions > 0
    preempted = [rid for out in outputs for rid in out.preempted_request_ids]
    assert preempted
    assert all(rid not in out.finished_request_ids for out in outputs for rid in out.preempted_request_ids)
    for req in reqs:
        assert req.output_token_ids == reference_generate(req, 64, eos=None)[0]
        assert req.status is RequestStatus.FINISHED_LENGTH
    assert sum(r.num_preemptions for r in reqs) == scheduler.num_preemptions
    assert_clean(scheduler)


def test_single_request_filling_the_whole_cache_completes() -> None:
    config = SchedulerConfig(
        num_blocks=9, block_size=4, max_model_len=32, max_num_seqs=4, max_num_batched_tokens=8
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    req = make_request("only", text(random.Random(7), 30), max_tokens=None)
    run(scheduler, runner, {0: [req]})
    assert req.num_output_tokens == 2  # stopped by max_model_len
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.num_preemptions == 0
    assert_clean(scheduler)


def test_kv_cache_smaller_than_one_sequence_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"8 usable blocks.*max_model_len=64 needs 16 blocks"):
        SchedulerConfig(num_blocks=9, block_size=4, max_model_len=64)


# --- aborts --------------------------------------------------------------------------------------------


def test_abort_waiting_mid_prefill_decoding_and_preempted() -> None:
    config = SchedulerConfig(
        num_blocks=17, block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(8)
    prefill = make_request("prefill", text(rng, 40), max_tokens=5)
    decode = make_request("decode", text(rng, 3), max_tokens=50)
    waiting = make_request("waiting", text(rng, 10), max_tokens=5)
    survivor = make_request("survivor", text(rng, 6), max_tokens=10)

    def step() -> SchedulerOutput:
        out = scheduler.schedule()
        scheduler.update_from_output(out, runner.execute(out))
        return out

    scheduler.add_requests([decode, prefill])
    step()
    step()
    assert decode.num_output_tokens >= 1
    assert 0 < prefill.num_computed_tokens < prefill.num_prompt_tokens
    scheduler.add_requests([waiting, survivor])
    assert scheduler.finish_request("waiting", RequestStatus.FINISHED_ABORTED) is waiting
    assert scheduler.finish_request("prefill", RequestStatus.FINISHED_ABORTED) is prefill
    assert scheduler.finish_request("decode", RequestStatus.FINISHED_ABORTED) is decode
    assert scheduler.finish_request("decode", RequestStatus.FINISHED_ABORTED) is None  # twice: no-op
    assert scheduler.finish_request("nobody", RequestStatus.FINISHED_ABORTED) is None
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in (waiting, prefill, decode))
    assert all(r.block_ids == [] for r in (waiting, prefill, decode))
    out = step()
    assert out.finished_request_ids == ["waiting", "prefill", "decode"]
    run(scheduler, runner)
    assert survivor.output_token_ids == reference_generate(survivor, 64, eos=None)[0]
    assert_clean(scheduler)


def test_abort_between_schedule_and_update_is_ignored_by_update() -> None:
    scheduler = Scheduler(ROOMY)
    runner = FakeRunner(scheduler)
    req = make_request("a", [10, 11, 12], max_tokens=5)
    scheduler.add_request(req)
    out = scheduler.schedule()
    sampled = runner.execute(out)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update_from_output(out, sampled) == []
    assert req.output_token_ids == []
    assert_clean(scheduler)


def test_abort_a_preempted_request() -> None:
    config = SchedulerConfig(
        num_blocks=17, block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16
    )
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(9)
    reqs = [make_request(f"r{i}", text(rng, 20), max_tokens=40) for i in range(3)]
    scheduler.add_requests(reqs)
    while scheduler.num_preemptions == 0:
        out = scheduler.schedule()
        scheduler.update_from_output(out, runner.execute(out))
    victim = next(r for r in reqs if r.status is RequestStatus.PREEMPTED)
    assert victim.num_computed_tokens == 0
    assert victim.block_ids == []
    assert scheduler.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED) is victim
    run(scheduler, runner)
    assert_clean(scheduler)


# --- prefix cache and encoder cache --------------------------------------------------------------------


def test_prefix_hits_need_the_same_image_and_skip_its_encoding() -> None:
    config = SchedulerConfig(num_blocks=100, block_size=4, max_model_len=128, encoder_cache_size=8)
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    rng = random.Random(10)
    system, tail = text(rng, 10), text(rng, 5)
    prompt, cat = image_prompt([system, ("cat", 8), tail])  # 23 tokens, image [10, 18)
    _, dog = image_prompt([system, ("dog", 8), tail])
    first = make_request("first", prompt, cat, max_tokens=2)
    run(scheduler, runner, {0: [first]})
    assert first.num_cached_tokens == 0
    # Evict "cat" from the one-image encoder cache, so only the prefix cache can spare its encoding.
    other_prompt, other_images = image_prompt([text(rng, 3), ("other", 8), text(rng, 2)])
    run(scheduler, runner, {0: [make_request("evict", other_prompt, other_images, max_tokens=1)]})
    assert not scheduler.encoder_cache.is_cached("cat")

    same = make_request("same", prompt, cat, max_tokens=2)
    outputs = run(scheduler, runner, {0: [same]})
    assert same.num_cached_tokens == 20  # 5 full blocks; the last (partial) block is computed
    assert outputs[0].scheduled[0].start == 20
    assert all(not out.encoder_inputs for out in outputs)  # the image lies entirely in the hit

    different = make_request("different", prompt, dog, max_tokens=2)
    outputs = run(scheduler, runner, {0: [different]})
    assert different.num_cached_tokens == 8  # only the blocks before the image
    assert [req.images[i].mm_hash for req, i in outputs[0].encoder_inputs] == ["dog"]
    for req in (first, same, different):
        assert req.output_token_ids == reference_generate(req, 128, eos=None)[0]
    assert runner.encoded == Counter({"cat": 1, "other": 1, "dog": 1})
    stats = scheduler.stats()
    assert stats.prefix_cache_hits == 28
    assert stats.prefix_cache_queries == 23 + 13 + 23 + 23
    assert_clean(scheduler)


def test_image_cached_in_the_encoder_is_not_re_encoded_by_a_concurrent_request() -> None:
    scheduler = Scheduler(
        SchedulerConfig(num_blocks=100, block_size=4, max_model_len=128, enable_prefix_caching=False)
    )
    runner = FakeRunner(scheduler)
    rng = random.Random(11)
    reqs = []
    for i in range(4):
        prompt, images = image_prompt([text(rng, 3 + i), ("shared", 10), text(rng, 4)])
        reqs.append(make_request(f"r{i}", prompt, images, max_tokens=3))
    outputs = run(scheduler, runner, {0: reqs})
    assert [len(out.encoder_inputs) for out in outputs[:1]] == [1]
    assert runner.encoded == Counter({"shared": 1})
    assert_clean(scheduler)


def test_n_children_share_the_prompt_blocks() -> None:
    scheduler = Scheduler(ROOMY)
    runner = FakeRunner(scheduler)
    prompt, images = image_prompt([text(random.Random(12), 9), ("img", 12), [20, 21, 22]])  # 24 tokens
    engine_request = EngineRequest(
        "req", prompt, SamplingParams(n=3, temperature=0.0, max_tokens=4, seed=5), images=images
    )
    children = requests_from_engine_request(engine_request)
    assert [c.request_id for c in children] == ["req-0", "req-1", "req-2"]
    assert [c.sampling_params.seed for c in children] == [5, 6, 7]
    assert all(c.sampling_params.n == 1 and c.parent_id == "req" for c in children)
    assert [c.index for c in children] == [0, 1, 2]
    outputs = run(scheduler, runner, {0: children})
    assert [s.request.request_id for s in outputs[0].scheduled] == ["req-0"]  # siblings wait
    assert [c.num_cached_tokens for c in children] == [0, 20, 20]
    assert children[1].first_scheduled_time >= children[0].first_token_time  # type: ignore[operator]
    assert runner.encoded == Counter({"img": 1})
    for child in children:
        assert child.output_token_ids == reference_generate(child, 128, eos=None)[0]
    assert_clean(scheduler)


def test_n_children_do_not_wait_without_prefix_caching() -> None:
    config = SchedulerConfig(num_blocks=600, block_size=4, max_model_len=128, enable_prefix_caching=False)
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    children = requests_from_engine_request(
        EngineRequest("q", [10, 11, 12], SamplingParams(n=2, max_tokens=2))
    )
    outputs = run(scheduler, runner, {0: children})
    assert len(outputs[0].scheduled) == 2
    assert_clean(scheduler)


def test_n_equal_one_keeps_the_request_id() -> None:
    (req,) = requests_from_engine_request(EngineRequest("solo", [1, 2], SamplingParams(seed=3)))
    assert req.request_id == "solo"
    assert req.wait_for is None
    assert req.sampling_params.seed == 3


# --- stop conditions -----------------------------------------------------------------------------------


def run_scripted(req: Request, script: list[int], config: SchedulerConfig = ROOMY) -> list[Request]:
    """Run one request with a runner that samples `script` in order; return what update_from_output gave."""
    scheduler = Scheduler(config, eos_token_ids=[EOS])
    scheduler.add_request(req)
    returned: list[Request] = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        sampled = {
            s.request.request_id: script[s.request.num_output_tokens] for s in out.scheduled if s.sample
        }
        returned += scheduler.update_from_output(out, sampled)
    assert_clean(scheduler)
    return returned


def test_max_tokens_stops_with_length() -> None:
    req = make_request("a", [10, 11], max_tokens=3)
    returned = run_scripted(req, [20, 21, 22, 23, 24])
    assert req.output_token_ids == [20, 21, 22]
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert req.status.finish_reason == "length"
    assert returned == [req, req, req]


def test_eos_stops_and_is_kept_in_the_output() -> None:
    req = make_request("a", [10, 11], max_tokens=10)
    run_scripted(req, [20, EOS, 22])
    assert req.output_token_ids == [20, EOS]
    assert req.status is RequestStatus.FINISHED_STOPPED
    assert req.stop_reason is None


def test_ignore_eos_runs_to_max_tokens() -> None:
    req = make_request("a", [10], max_tokens=4, ignore_eos=True)
    run_scripted(req, [EOS, EOS, EOS, EOS, EOS])
    assert req.output_token_ids == [EOS] * 4
    assert req.status is RequestStatus.FINISHED_LENGTH


def test_min_tokens_delays_eos_and_stop_token_ids() -> None:
    req = make_request("a", [10], max_tokens=10, min_tokens=3)
    run_scripted(req, [EOS, EOS, EOS, EOS, 30])
    assert req.output_token_ids == [EOS] * 4  # the first min_tokens tokens never stop the request
    req = make_request("b", [10], max_tokens=10, min_tokens=2, stop_token_ids=(9,))
    run_scripted(req, [9, 9, 9, 30])
    assert req.output_token_ids == [9, 9, 9]
    assert req.stop_reason == 9


def test_stop_token_id_sets_stop_reason_and_eos_wins_when_both() -> None:
    req = make_request("a", [10], max_tokens=10, stop_token_ids=(9, 12))
    run_scripted(req, [20, 12, 9])
    assert req.output_token_ids == [20, 12]
    assert req.stop_reason == 12
    assert req.status is RequestStatus.FINISHED_STOPPED
    req = make_request("b", [10], max_tokens=1, stop_token_ids=(EOS,))
    run_scripted(req, [EOS])
    assert req.status is RequestStatus.FINISHED_STOPPED
    assert req.stop_reason is None


def test_max_model_len_stops_generation() -> None:
    config = SchedulerConfig(num_blocks=20, block_size=4, max_model_len=12)
    req = make_request("a", list(range(10, 20)), max_tokens=None)
    run_scripted(req, [20, 21, 22, 23], config)
    assert req.output_token_ids == [20, 21]
    assert req.status is RequestStatus.FINISHED_LENGTH
    full = make_request("b", list(range(10, 22)), max_tokens=5)  # prompt == max_model_len: one token
    run_scripted(full, [20, 21], config)
    assert full.output_token_ids == [20]


def test_stop_string_finish_from_the_detokenizer() -> None:
    scheduler = Scheduler(ROOMY)
    runner = FakeRunner(scheduler)
    req = make_request("a", [10, 11], max_tokens=10)
    scheduler.add_request(req)
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    finished = scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert finished is req
    assert req.stop_reason == "###"
    assert req.status.finish_reason == "stop"
    assert scheduler.schedule().finished_request_ids == ["a"]
    assert_clean(scheduler)


# --- intake errors -------------------------------------------------------------------------------------


def test_prompt_longer_than_max_model_len_names_both_numbers() -> None:
    scheduler = Scheduler(SchedulerConfig(num_blocks=20, block_size=4, max_model_len=32))
    with pytest.raises(ValueError, match=r"40 tokens.*max_model_len=32"):
        scheduler.add_request(make_request("a", [10] * 40))
    assert not scheduler.has_unfinished_requests()


def test_image_larger_than_the_encoder_limits_is_rejected() -> None:
    scheduler = Scheduler(
        SchedulerConfig(
            num_blocks=100,
            block_size=4,
            max_model_len=128,
            encoder_cache_size=16,
            max_encoder_tokens_per_step=32,
        )
    )
    prompt, images = image_prompt([[10], ("big", 20), [11]])
    with pytest.raises(ValueError, match=r"20 tokens.*encoder_cache_size=16"):
        scheduler.add_request(make_request("a", prompt, images))
    prompt, images = image_prompt([[10], ("bad", 4), [11]])
    with pytest.raises(ValueError, match="inside the prompt"):
        scheduler.add_request(make_request("b", prompt[:3], images))


def test_queue_full_and_duplicate_ids() -> None:
    scheduler = Scheduler(
        SchedulerConfig(num_blocks=100, block_size=4, max_model_len=64, max_queued_requests=2)
    )
    scheduler.add_request(make_request("a", [10]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", [10]))
    with pytest.raises(QueueFullError, match="max_queued_requests=2"):
        scheduler.add_requests([make_request("b", [10]), make_request("c", [10])])
    assert scheduler.get_request_counts() == (0, 1)  # all or nothing
    scheduler.add_request(make_request("b", [10]))
    with pytest.raises(QueueFullError):
        scheduler.add_request(make_request("c", [10]))
    scheduler.schedule()  # both admitted: the queue has room again
    scheduler.add_request(make_request("c", [10]))
    assert scheduler.get_request_counts() == (2, 1)


def test_config_errors_say_what_to_change() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        SchedulerConfig(
            num_blocks=100, block_size=4, max_model_len=64, max_num_seqs=16, max_num_batched_tokens=8
        )
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        SchedulerConfig(num_blocks=100, block_size=0)
    with pytest.raises(ValueError, match="needs a finished status"):
        Scheduler(ROOMY).finish_request("x", RequestStatus.RUNNING)
