"""The OpenAI app in-process (httpx over ASGI, no sockets) on a tiny random checkpoint: response shapes,
images, every error status with OpenAI's error body, auth, the body cap, the queue-full 503, metrics.

The real-socket tests (official openai client, curl, streams cut mid-way, SIGTERM) are in
test_server_e2e.py and test_server_cli.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from vlmserve.api.errors import param_path
from vlmserve.api.logprobs import TokenTexts
from vlmserve.api.protocol import ChatCompletionRequest
from vlmserve.api.server import build_app
from vlmserve.api.serving import ModelServer
from vlmserve.config import EngineArgs
from vlmserve.engine.outputs import CompletionDelta
from vlmserve.media import MediaConfig

MODEL = "tiny"
IMAGE_LIMIT = 3


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(content: str | list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = "any") -> dict[str, Any]:
    """The response is `status` with exactly OpenAI's error body; returns the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def make_server(checkpoint: Path, **engine: Any) -> ModelServer:
    args = EngineArgs(
        model=str(checkpoint),
        served_model_name=MODEL,
        max_model_len=1024,
        num_kv_blocks=160,
        limit_mm_per_prompt={"image": IMAGE_LIMIT},
        **engine,
    )
    return ModelServer.from_engine_args(args, MediaConfig())


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `condition` (an engine-state check) until it holds; the timeout only catches hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ModelServer]:
    s = make_server(tiny_checkpoint)
    yield s
    asyncio.run(s.aclose())


@pytest.fixture(scope="module")
def app(server: ModelServer) -> FastAPI:
    return build_app(server, shutdown_servers=False)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        yield c


# ------------------------------------------------------------------------------------------ happy paths


async def test_chat_with_data_url_image_has_openai_shape(client: httpx.AsyncClient) -> None:
    body = chat([image_part(data_url(png_bytes(64, 48))), {"type": "text", "text": "What is this?"}])
    r = await client.post("/v1/chat/completions", json={**body, "ignore_eos": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    assert out["model"] == MODEL
    assert isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    usage = out["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)


async def test_more_images_mean_more_prompt_tokens(client: httpx.AsyncClient) -> None:
    one = chat([image_part(data_url(png_bytes(64, 48))), {"type": "text", "text": "Compare."}])
    two = chat(
        [
            image_part(data_url(png_bytes(64, 48))),
            image_part(data_url(png_bytes(120, 90, (0, 90, 200)), "image/png")),
            {"type": "text", "text": "Compare."},
        ]
    )
    r1, r2 = await asyncio.gather(
        client.post("/v1/chat/completions", json=one), client.post("/v1/chat/completions", json=two)
    )
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    assert r2.json()["usage"]["prompt_tokens"] > r1.json()["usage"]["prompt_tokens"]


async def test_smaller_max_pixels_within_bounds_gives_fewer_image_tokens(
    client: httpx.AsyncClient, server: ModelServer
) -> None:
    big = data_url(png_bytes(300, 300))
    full = await client.post("/v1/chat/completions", json=chat([image_part(big)]))
    small = await client.post(
        "/v1/chat/completions",
        json=chat([image_part(big)], mm_processor_kwargs={"max_pixels": 56 * 56}),
    )
    assert full.status_code == small.status_code == 200, (full.text, small.text)
    assert small.json()["usage"]["prompt_tokens"] < full.json()["usage"]["prompt_tokens"]


async def test_unknown_fields_are_ignored_and_developer_role_accepted(client: httpx.AsyncClient) -> None:
    body = chat("hi", some_future_field={"x": 1}, service_tier="auto")
    body["messages"].insert(0, {"role": "developer", "content": "Be brief."})
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


async def test_n_choices_and_chat_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat("hi", n=2, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=2, temperature=0.8),
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["completion_tokens"] == 8
    for choice in out["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == 4
        for entry in content:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert entry["logprob"] <= 0.0
            assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
            assert len(entry["top_logprobs"]) == 2
            # The most likely token's logprob bounds the sampled one's.
            assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-5
        # The tokens' bytes spell the message (the text is whole characters; bytes may split them).
        joined = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace")
        assert joined == choice["message"]["content"]


async def test_stream_chunks_and_include_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json=chat(
            "hi", stream=True, stream_options={"include_usage": True}, max_tokens=5, ignore_eos=True, n=2
        ),
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # One role chunk per choice first, content "" as in OpenAI's stream.
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    *body, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in body)
    finishes = {
        c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
        for c in body
        if c["choices"][0]["finish_reason"]
    }
    assert finishes == {0: "length", 1: "length"}


async def test_stream_without_include_usage_has_no_usage_key(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat("hi", stream=True))
    assert r.status_code == 200
    assert '"usage"' not in r.text
    assert r.text.endswith("data: [DONE]\n\n")


async def test_completions_text_token_ids_batch_echo_and_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": ["Hello", "World"],
            "max_tokens": 3,
            "n": 2,
            "logprobs": 2,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 12
    for choice in out["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
        assert lp["text_offset"][0] == 0
        assert all(len(top) <= 2 for top in lp["top_logprobs"])
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(3)]
        assert choice["finish_reason"] == "length"

    ids = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2}
    )
    assert ids.status_code == 200, ids.text
    assert ids.json()["usage"]["prompt_tokens"] == 5

    echo = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2, "echo": True}
    )
    assert echo.status_code == 200, echo.text
    assert echo.json()["choices"][0]["text"].startswith("Hello there")


async def test_completions_stream(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "Hi",
            "max_tokens": 4,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_stop_string_ends_the_choice(client: httpx.AsyncClient) -> None:
    base = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
    }
    full = (await client.post("/v1/completions", json=base)).json()["choices"][0]["text"]
    # A stop string from the middle of the greedy output, made of plain characters.
    start = next(
        (i for i in range(2, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].strip()), None
    )
    if start is None:
        pytest.skip(f"greedy output {full!r} has no plain two-character span to stop on")
    stop = full[start : start + 2]
    r = await client.post("/v1/completions", json={**base, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == stop
    assert choice["text"] == full[: full.index(stop)]


async def test_seed_makes_sampling_reproducible(client: httpx.AsyncClient) -> None:
    body = chat("Tell me a story.", temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    a = (await client.post("/v1/chat/completions", json=body)).json()
    b = (await client.post("/v1/chat/completions", json=body)).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


async def test_models_health_version_metrics(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["object"] == "model"
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/version")).json()["version"]
    await client.post("/v1/chat/completions", json=chat("hi"))
    text = (await client.get("/metrics")).text
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_per_output_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        'vllm:request_success_total{finished_reason="length",model_name="tiny"}',
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert name in text, name
    assert 'model_name="tiny"' in text


async def test_image_metrics_count_encodes_and_encoder_cache_hits(client: httpx.AsyncClient) -> None:
    def counters(text: str) -> tuple[float, float]:
        values = {}
        for line in text.splitlines():
            for name in ("vlmserve:images_encoded_total", "vlmserve:encoder_cache_hits_total"):
                if line.startswith(name + "{"):
                    values[name] = float(line.rsplit(" ", 1)[1])
        return values["vlmserve:images_encoded_total"], values["vlmserve:encoder_cache_hits_total"]

    before = counters((await client.get("/metrics")).text)
    # An image nobody sent before (a colour no other test uses: the cache key is the resized pixels), twice,
    # after different text (so the prefix cache does not cover it): encoded once, then found in the cache.
    image = png_bytes(61, 43, color=(17, 201, 113))
    body = chat([{"type": "text", "text": "Once."}, image_part(data_url(image))], max_tokens=2)
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    body["messages"][0]["content"][0]["text"] = "Again, other words."
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    text = (await client.get("/metrics")).text
    after = counters(text)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    assert "vlmserve:encoder_cache_usage_perc{" in text


# ------------------------------------------------------------------------------------------ errors: 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        (chat("hi", max_tokens="many"), "max_tokens"),
        (chat("hi", n=1.5), "n"),
        (chat("hi", stream_options={"include_usage": "sometimes"}), "stream_options.include_usage"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (chat([{"type": "input_audio", "input_audio": {}}]), "messages[0].content[0]"),
        (chat([{"type": "image_url", "image_url": {"url": 3}}]), "messages[0].content[0].image_url.url"),
        (chat("hi", mm_processor_kwargs={"min_pixels": 10, "fps": 2}), "mm_processor_kwargs.fps"),
    ],
)
async def test_schema_errors_are_400_naming_the_parameter(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = assert_error(await client.post("/v1/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b'["a", "list"]', {"content-type": "application/json"}),
        (b"model=tiny", {"content-type": "application/x-www-form-urlencoded"}),
    ],
)
async def test_body_that_is_not_a_json_object_is_400(
    client: httpx.AsyncClient, content: bytes, headers: dict[str, str]
) -> None:
    r = await client.post("/v1/chat/completions", content=content, headers=headers)
    assert "JSON" in assert_error(r, 400)["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"mm_processor_kwargs": {"max_pixels": 10**9}}, "mm_processor_kwargs.max_pixels"),
        # Output constraints and tools: a bad one is named (test_structured_server.py has the good ones).
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # auto needs the flag
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "wat"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "start: foo\nfoo: 'a' | "}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_json": {"type": "integer", "minimum": 3, "maximum": 1}}, "guided_json"),
        ({"guided_json": {"type": "string", "format": "uri-reference"}}, "guided_json"),
        ({"guided_regex": "(a"}, "guided_regex"),
        ({"guided_json": {"type": "string", "maxLength": 5, "description": "x" * 300_000}}, "guided_json"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"structured_outputs": {"grammar": 5}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": "abc"}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
        ({"structured_outputs": {"nothing": 1}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": "json_object"}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": "x"}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": "f"},
            },
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": f"f{i}",
                            "parameters": {"type": "object", "description": "x" * 3000},
                        },
                    }
                    for i in range(100)
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ],
)
async def test_bad_values_are_400_naming_the_parameter(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    assert_error(await client.post("/v1/chat/completions", json=chat("hi", **fields)), 400, param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 10**7]}, "prompt"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "a <|image_pad|> b"}, "prompt"),
        ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
        ({"prompt": "hi", "guided_grammar": "start: ("}, "guided_grammar"),
        (
            {
                "prompt": "hi",
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}},
            },
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_completions_bad_values_are_400(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    assert_error(await client.post("/v1/completions", json={"model": MODEL, **fields}), 400, param)


async def test_too_long_prompt_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat("word " * 2000))
    error = assert_error(r, 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert "1024" in error["message"]


async def test_limit_mm_per_prompt_is_400_naming_the_limit(client: httpx.AsyncClient) -> None:
    url = data_url(png_bytes(32, 32))
    r = await client.post("/v1/chat/completions", json=chat([image_part(url)] * (IMAGE_LIMIT + 1)))
    error = assert_error(r, 400, "messages")
    assert "limit_mm_per_prompt" in error["message"]
    assert str(IMAGE_LIMIT) in error["message"]


async def test_corrupt_image_is_400_naming_which_image(client: httpx.AsyncClient) -> None:
    good = data_url(png_bytes(32, 32))
    corrupt = data_url(png_bytes(32, 32)[:40])  # a truncated PNG
    r = await client.post("/v1/chat/completions", json=chat([image_part(good), image_part(corrupt)]))
    error = assert_error(r, 400, "messages[0].content[1].image_url")
    assert error["message"].startswith("image 1")


async def test_non_image_payload_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat([image_part(data_url(b"hello, not an image"))]))
    assert_error(r, 400, "messages[0].content[0].image_url")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/cat.png",
        "http://localhost/cat.png",
        "http://2130706433/cat.png",  # 127.0.0.1 as one decimal number
        "http://0x7f.1/cat.png",  # hex and short form
        "http://[::ffff:127.0.0.1]/cat.png",  # IPv4-mapped IPv6
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "http://10.0.0.1/cat.png",
    ],
)
async def test_ssrf_attempts_are_refused_by_default(client: httpx.AsyncClient, url: str) -> None:
    error = assert_error(await client.post("/v1/chat/completions", json=chat([image_part(url)])), 400)
    assert error["param"] == "messages[0].content[0].image_url"
    assert "image 0" in error["message"]


async def test_local_files_are_refused_without_allowed_path(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(32, 32))
    r = await client.post("/v1/chat/completions", json=chat([image_part(f"file://{path}")]))
    assert "--allowed-local-media-path" in assert_error(r, 400)["message"]


# ------------------------------------------------------------------------------------------ errors: others


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**chat("hi"), "model": "gpt-4o"})
    error = assert_error(r, 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(await client.get("/v1/models/gpt-4o"), 404, "model")
    assert_error(await client.get("/v1/nothing-here"), 404)


async def test_model_may_be_left_out(client: httpx.AsyncClient) -> None:
    body = chat("hi")
    del body["model"]
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["model"] == MODEL


async def test_api_keys(server: ModelServer) -> None:
    app = build_app(server, api_keys=["key-one", "key-two"], shutdown_servers=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        assert_error(await c.get("/v1/models"), 401)
        wrong = await c.get("/v1/models", headers={"Authorization": "Bearer FAKE_KEY"})
        error = assert_error(wrong, 401)
        assert error["type"] == "authentication_error"
        assert "FAKE_KEY" not in wrong.text
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer key-two"})).status_code == 200
        r = await c.post("/v1/chat/completions", json=chat("hi"), headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200
        # Probes and scrapers need no key.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/version")).status_code == 200


async def test_without_keys_any_bearer_is_accepted(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers={"Authorization": "Bearer FAKE_KEY"})
    assert r.status_code == 200


async def test_body_over_the_cap_is_413(server: ModelServer) -> None:
    app = build_app(server, max_request_body_bytes=2000, shutdown_servers=False)
    big = chat([image_part(data_url(png_bytes(200, 200, (1, 2, 3)) + b"\0" * 4000))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        # Declared by Content-Length: refused before reading.
        assert (
            assert_error(await c.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"
        )

        # Chunked (no Content-Length): refused while counting the streamed bytes.
        payload = json.dumps(big).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 500):
                yield payload[i : i + 500]

        r = await c.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in r.request.headers
        assert_error(r, 413)
        # Small requests still pass.
        assert (await c.post("/v1/chat/completions", json=chat("hi"))).status_code == 200


async def test_queue_full_is_503_with_retry_after(tiny_checkpoint: Path) -> None:
    server = make_server(tiny_checkpoint, max_num_seqs=1, max_queued_requests=1)
    app = build_app(server, shutdown_servers=False)
    # Each of these would run for 900 tokens; they are cancelled once the queue state has been checked.
    long = chat("hi", max_tokens=900, ignore_eos=True)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            running = asyncio.create_task(c.post("/v1/chat/completions", json=long))
            await wait_for(lambda: server.stats()["num_requests_running"] == 1)
            waiting = asyncio.create_task(c.post("/v1/chat/completions", json=long))
            await wait_for(lambda: server.stats()["num_requests_waiting"] == 1)
            r = await c.post("/v1/chat/completions", json=chat("hi"))
            error = assert_error(r, 503)
            assert r.headers["retry-after"] == "1"
            assert error["code"] == "queue_full"
            assert "max_queued_requests" in error["message"]
            # Callers that give up abort their engine requests: nothing keeps running.
            running.cancel()
            waiting.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
            await wait_for(
                lambda: server.stats()["num_requests_running"] + server.stats()["num_requests_waiting"] == 0
            )
            assert server.stats()["kv_cache_usage"] == 0.0
    finally:
        await server.aclose()


async def test_closing_a_stream_nobody_read_aborts_its_request(server: ModelServer) -> None:
    # The client can leave between the first token and the first byte of the response: the stream is closed
    # without ever being iterated, and its request must still be aborted.
    body = ChatCompletionRequest.model_validate(chat("hi", max_tokens=900, ignore_eos=True))
    stream = await server.start(await server.prepare_chat(body, "chatcmpl-never-read"))
    assert server.stats()["num_requests_running"] == 1
    await stream.aclose()
    await wait_for(lambda: server.stats()["num_requests_running"] == 0)
    assert server.stats()["kv_cache_usage"] == 0.0


async def test_engine_error_is_500_or_an_sse_error_event(
    client: httpx.AsyncClient, server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_start(request: Any) -> AsyncIterator[CompletionDelta]:
        async def deltas() -> AsyncIterator[CompletionDelta]:
            yield CompletionDelta(request.request_id, 0, "", [], None, "error", error="step failed: boom")

        return deltas()

    monkeypatch.setattr(server, "start", failing_start)
    error = assert_error(await client.post("/v1/chat/completions", json=chat("hi")), 500)
    assert "boom" in error["message"] and error["type"] == "server_error"

    r = await client.post("/v1/chat/completions", json=chat("hi", stream=True))
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "boom" in json.loads(events[-2][6:])["error"]["message"]


async def test_dead_engine_fails_health_and_requests_with_503(
    client: httpx.AsyncClient, server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.engine, "dead_reason", "3 consecutive step failures")
    assert_error(await client.get("/health"), 503)
    r = await client.post("/v1/chat/completions", json=chat("hi"))
    assert assert_error(r, 503)["code"] == "engine_dead"
    assert "retry-after" in r.headers


# ------------------------------------------------------------------------------------------ helpers


def test_param_path_drops_pydantic_union_labels() -> None:
    loc = ("body", "messages", 0, "content", "list[ContentPart]", 1, "image_url", "ImageURL", "url")
    assert param_path(loc) == "messages[0].content[1].image_url.url"
    assert param_path(("body",)) is None


def test_token_bytes_reassemble_split_characters(server: ModelServer) -> None:
    texts = TokenTexts(server.processor.tokenizer)
    word = "naïve 中文"
    ids = server.processor.encode_text(word)
    assert b"".join(texts.get(i)[1] for i in ids) == word.encode()
    im_end = server.processor.encode_text("<|im_end|>")
    assert texts.get(im_end[0]) == ("<|im_end|>", b"<|im_end|>")
