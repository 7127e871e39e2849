"""`vlmserve serve` as users run it: a real server process on 127.0.0.1 driven by the official openai client
(sync, async, streaming) and by curl, with images by data URL, from a local HTTP server the operator allowed,
and from an allowed local directory. Also: a stream cut mid-way frees its KV blocks (seen through /metrics).

One server process for the whole module (started through the CLI, stopped in the fixture's teardown).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import serve_directory, served

MODEL = "tiny"
MAX_BODY_BYTES = 2_000_000


def png_bytes(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("images")
    (directory / "red.png").write_bytes(png_bytes(64, 48, (220, 20, 20)))
    (directory / "blue.png").write_bytes(png_bytes(90, 120, (20, 20, 220)))
    (directory / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    return directory


@pytest.fixture(scope="module")
def image_host(image_dir: Path) -> Iterator[str]:
    """A local HTTP server holding the test images; the server under test allows 127.0.0.1."""
    with serve_directory(image_dir) as url:
        yield url


@pytest.fixture(scope="module")
def base_url(
    tiny_checkpoint: Path, image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with served(
        tiny_checkpoint,
        log,
        "--model-id", MODEL,
        "--max-model-len", "2048",
        "--num-kv-blocks", "300",
        "--limit-mm-per-prompt", '{"image": 3}',
        "--allowed-media-domains", "127.0.0.1",
        "--allowed-local-media-path", str(image_dir),
        "--max-request-body-bytes", str(MAX_BODY_BYTES),
        "--log-level", "warning",
    ) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def tp2_base_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same server with the model sharded over two ranks (`-tp 2`: a worker process, gloo)."""
    log = tmp_path_factory.mktemp("server-tp2") / "server.log"
    with served(
        tiny_checkpoint,
        log,
        "-tp", "2",
        "--model-id", MODEL,
        "--max-model-len", "2048",
        "--num-kv-blocks", "300",
        "--log-level", "warning",
    ) as url:  # fmt: skip
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    # max_retries=0: an error must surface as it is, not be retried away.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="FAKE_KEY", max_retries=0)


@pytest.fixture(params=["base_url", "tp2_base_url"], ids=["tp1", "tp2"])
def any_client(request: pytest.FixtureRequest) -> openai.OpenAI:
    """`client` of the server without and with tensor parallelism."""
    url = request.getfixturevalue(request.param)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="FAKE_KEY", max_retries=0)


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in {"model_name": MODEL, **labels}.items()):
            return float(match.group(2))
    return 0.0


# ------------------------------------------------------------------------------------------ openai client


def test_sync_client_chat_with_data_url_image(any_client: openai.OpenAI, image_dir: Path) -> None:
    client = any_client
    assert [m.id for m in client.models.list().data] == [MODEL]
    url = "data:image/png;base64," + base64.b64encode((image_dir / "red.png").read_bytes()).decode()
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [image_part(url), {"type": "text", "text": "What colour?"}]}],
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert out.object == "chat.completion"
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 4
    assert isinstance(out.choices[0].message.content, str)


def test_sync_client_stream_with_usage_and_two_choices(any_client: openai.OpenAI) -> None:
    client = any_client
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        text[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


async def test_async_client_chat_completions_and_logprobs(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="FAKE_KEY", max_retries=0) as client:
        chat = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=3,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        )
        assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
        entries = chat.choices[0].logprobs.content
        assert len(entries) == 3 and all(len(e.top_logprobs) == 3 for e in entries)

        completion = await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=3, logprobs=2, extra_body={"ignore_eos": True}
        )
        lp = completion.choices[0].logprobs
        assert lp is not None and lp.tokens is not None and len(lp.tokens) == 3
        assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)

        stream = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, stream=True)
        pieces = [c.choices[0].text async for c in stream if c.choices]
        assert len(pieces) >= 1


# ------------------------------------------------------------------------------------------ images


def test_images_by_http_url_local_file_and_several_at_once(
    client: openai.OpenAI, image_host: str, image_dir: Path
) -> None:
    content = [
        image_part(f"{image_host}/red.png"),
        image_part(f"file://{image_dir / 'blue.png'}"),
        image_part(str(image_dir / "red.png")),
        {"type": "text", "text": "Describe the three images."},
    ]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
    )
    one = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content[:1] + content[-1:]}], max_tokens=2
    )
    assert out.usage is not None and one.usage is not None
    assert out.usage.prompt_tokens > one.usage.prompt_tokens


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("{host}/missing.png", "HTTP 404"),
        ("{host}/broken.png", "corrupt"),
        ("/etc/passwd", "outside the directory"),
        ("file://{dir}/../../etc/hostname", "outside the directory"),
    ],
)
def test_bad_image_sources_are_400(
    client: openai.OpenAI, image_host: str, image_dir: Path, url: str, fragment: str
) -> None:
    url = url.format(host=image_host, dir=image_dir)
    content = [image_part(f"{image_host}/red.png"), image_part(url)]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
        )
    assert info.value.status_code == 400
    message = info.value.body["message"]  # type: ignore[index]
    assert message.startswith("image 1"), message
    assert fragment in message


def test_client_errors_map_to_openai_exceptions(client: openai.OpenAI, image_host: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    too_many = [image_part(f"{image_host}/red.png")] * 4
    with pytest.raises(openai.BadRequestError, match="limit_mm_per_prompt"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": too_many}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-2
        )


# ------------------------------------------------------------------------------------------ curl

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=False)


@needs_curl
def test_curl_chat_and_stream(base_url: str, image_host: str) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [image_part(f"{image_host}/blue.png"), {"type": "text", "text": "hi"}],
            }
        ],
        "max_tokens": 3,
    }
    result = curl(
        f"{base_url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", json.dumps(body)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["object"] == "chat.completion"

    result = curl(
        "-N",
        f"{base_url}/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-H",
        "Authorization: Bearer FAKE_KEY",
        "-d",
        json.dumps({**body, "stream": True}),
    )
    assert result.returncode == 0, result.stderr
    events = [e for e in result.stdout.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


@needs_curl
def test_curl_body_over_the_cap_is_413(base_url: str, tmp_path: Path) -> None:
    payload = tmp_path / "big.json"
    blob = base64.b64encode(os.urandom(MAX_BODY_BYTES)).decode()
    payload.write_text(
        json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [image_part(f"data:image/png;base64,{blob}")]}],
            }
        )
    )
    result = curl(
        f"{base_url}/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        f"@{payload}",
        "-w",
        "\n%{http_code}",
    )
    body, _, status = result.stdout.rpartition("\n")
    assert status == "413", result
    assert json.loads(body)["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------------------------------ disconnects


def test_stream_cut_midway_aborts_and_frees_kv_blocks(base_url: str) -> None:
    aborted_before = metric(base_url, "vllm:request_success_total", finished_reason="abort")
    generated_before = metric(base_url, "vllm:generation_tokens_total")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1900,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r,
    ):
        events = 0
        lines = r.iter_lines()
        for line in lines:
            events += line.startswith("data: ")
            if events == 3:
                break
        # Still generating (1900 tokens take far longer than this check), holding KV blocks. (Breaking out
        # of iter_lines closes httpx's stream, so these are read with the generator still open.)
        assert metric(base_url, "vllm:num_requests_running") == 1
        assert metric(base_url, "vllm:kv_cache_usage_perc") > 0
        lines.close()
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 20
    while (
        metric(base_url, "vllm:num_requests_running") != 0
        or metric(base_url, "vllm:kv_cache_usage_perc") != 0
    ):
        assert time.monotonic() < deadline, "the aborted request kept its KV blocks"
        time.sleep(0.02)
    assert metric(base_url, "vllm:num_requests_waiting") == 0
    assert metric(base_url, "vllm:request_success_total", finished_reason="abort") == aborted_before + 1
    assert (
        metric(base_url, "vllm:generation_tokens_total") - generated_before < 1900
    )  # it did not run to the end
