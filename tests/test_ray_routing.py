"""Image-aware replica routing (deploy/router.py): the key of a chat request and the placement policy, without
Ray. The Ray end of it (two CPU replicas, repeated images landing on one) is in tests/test_ray_deploy.py."""

from __future__ import annotations

import random

import pytest

from vlmserve.api.protocol import ChatCompletionRequest
from vlmserve.deploy.router import AffinityPolicy, affinity_key

IMG_A = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
IMG_B = "https://example.com/b.jpg"


def chat(*parts: dict[str, object], system: str | None = None, **fields: object) -> ChatCompletionRequest:
    messages: list[dict[str, object]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": list(parts)})
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **fields})


def image(url: str, detail: str | None = None) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def text(t: str) -> dict[str, object]:
    return {"type": "text", "text": t}


def test_key_is_the_image_and_system_prompt_not_the_question() -> None:
    key = affinity_key(chat(text("what is this?"), image(IMG_A)))
    assert key is not None
    # The question (before or after the image) does not matter: the encoder cache serves the image anyway.
    assert affinity_key(chat(image(IMG_A), text("and how many?"))) == key
    assert affinity_key(chat(text("something else"), image(IMG_A))) == key
    # Another image, another system prompt, another pixel budget: another cache entry, another key.
    assert affinity_key(chat(text("what is this?"), image(IMG_B))) != key
    assert affinity_key(chat(image(IMG_A), system="You are terse.")) != key
    assert affinity_key(chat(image(IMG_A, detail="low"))) != key
    assert affinity_key(chat(image(IMG_A), mm_processor_kwargs={"max_pixels": 200_000})) != key
    # Only the first image counts (a conversation keeps its first image's replica as it grows).
    assert affinity_key(chat(image(IMG_A), image(IMG_B))) == affinity_key(chat(image(IMG_A)))


def test_no_image_no_key() -> None:
    assert affinity_key(chat(text("hello"))) is None
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    )
    assert affinity_key(body) is None


def test_same_key_same_replica_new_keys_least_loaded() -> None:
    policy = AffinityPolicy(spill_margin=4, rng=random.Random(0))
    replicas = ["r1", "r2"]
    first = policy.choose("img-a", replicas)
    assert first.outcome == "miss"
    policy.routed("img-a", first.replica, first.outcome)
    other = "r2" if first.replica == "r1" else "r1"
    # A new key goes to the least loaded replica: the one without img-a's request.
    second = policy.choose("img-b", replicas)
    assert (second.replica, second.outcome) == (other, "miss")
    policy.routed("img-b", second.replica, second.outcome)
    for _ in range(3):
        again = policy.choose("img-a", replicas)
        assert (again.replica, again.outcome) == (first.replica, "hit")
        policy.routed("img-a", again.replica, again.outcome)
    assert policy.in_flight == {first.replica: 4, other: 1}
    # Completed requests leave the counts; the key keeps its replica.
    for _ in range(4):
        policy.completed(first.replica)
    assert policy.choose("img-a", replicas) == type(first)(first.replica, "hit")


def test_hot_key_spills_to_the_least_loaded_replica() -> None:
    policy = AffinityPolicy(spill_margin=3, rng=random.Random(0))
    replicas = ["r1", "r2"]
    policy.routed("hot", "r1", "miss")
    for _ in range(2):
        d = policy.choose("hot", replicas)
        assert (d.replica, d.outcome) == ("r1", "hit")
        policy.routed("hot", d.replica, d.outcome)
    # r1 now has 3 in flight, r2 none: the margin is reached, the next one goes to r2.
    d = policy.choose("hot", replicas)
    assert (d.replica, d.outcome) == ("r2", "spill")
    policy.routed("hot", d.replica, d.outcome)
    assert policy.replica_of("hot") == "r1"  # a spill does not move the key's home
    policy.completed("r1")
    assert policy.choose("hot", replicas).outcome == "hit"


def test_unkeyed_and_gone_replicas_fall_back_to_least_loaded() -> None:
    policy = AffinityPolicy(rng=random.Random(0))
    policy.routed(None, "r1", "unkeyed")
    assert policy.choose(None, ["r1", "r2"]).replica == "r2"
    policy.routed("img", "r2", "miss")
    policy.forget_replica("r2")  # scaled down or died
    d = policy.choose("img", ["r1", "r3"])
    assert (d.replica, d.outcome) == ("r3", "miss")


def test_table_is_bounded_lru() -> None:
    policy = AffinityPolicy(max_keys=2)
    policy.routed("a", "r1", "miss")
    policy.routed("b", "r1", "miss")
    policy.routed("a", "r1", "hit")  # refreshes a
    policy.routed("c", "r2", "miss")  # evicts b, the least recently used
    assert len(policy) == 2
    assert policy.replica_of("b") is None
    assert policy.replica_of("a") == "r1" and policy.replica_of("c") == "r2"


def test_bad_settings_name_the_knob() -> None:
    with pytest.raises(ValueError, match="spill_margin"):
        AffinityPolicy(spill_margin=0)
