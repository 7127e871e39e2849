"""Hostile input: never a 500, never a crash, always OpenAI's error shape.

Three fuzzers against a real server on 127.0.0.1 (tests/stress/soak.py's LiveServer):
  - schemathesis, from the app's own OpenAPI schema: bodies that follow the schema and bodies that break
    it, for every operation;
  - a zoo of broken and unusual images through /v1/chat/completions (corrupt, truncated, oversized,
    zero-size, palette, 16-bit, CMYK, animated, decompression bombs, extreme shapes);
  - byte-level mutations of valid images of every allowed format, straight into the decoder, whose contract
    is "an RGB image or a MediaError" (anything else would surface as a 500).

Bounded: a fixed number of examples each, derandomized so that CI runs the same cases every time. Image URLs
that schemathesis invents are never fetched: name resolution is switched off for the media layer, so no
traffic leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import random_image
from tests.stress.soak import LiveServer, engine_leaks, wait_until
from vlmserve.api.server import build_app
from vlmserve.api.serving import ModelServer
from vlmserve.config import EngineArgs
from vlmserve.media import MediaConfig, MediaError, ssrf
from vlmserve.media.decode import ALLOWED_FORMATS, decode_image

MODEL = "tiny"
MAX_IMAGE_BYTES = 256 * 1024
MAX_IMAGE_PIXELS = 4_000_000
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ModelServer]:
    # A short context bounds the work any accepted request can ask for (n * max_tokens <= 128 * 128).
    args = EngineArgs(
        model=str(tiny_checkpoint), served_model_name=MODEL, max_model_len=128, num_kv_blocks=1200
    )
    media = MediaConfig(max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)
    s = ModelServer.from_engine_args(args, media)
    yield s
    asyncio.run(s.aclose())


@pytest.fixture(scope="module")
def live(server: ModelServer) -> Iterator[LiveServer]:
    async def no_dns(host: str, port: int) -> list[str]:
        raise OSError("name resolution is off while fuzzing")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssrf, "resolve_host", no_dns)
        # 1 MiB bodies: an oversized image is refused by the media layer, not by the body cap.
        with LiveServer(build_app(server, max_request_body_bytes=2**20, shutdown_servers=False)) as s:
            yield s


def assert_openai_answer(status: int, headers: Any, text: str) -> None:
    """No server error; an error is OpenAI's shape; a stream has no error event and ends with [DONE]."""
    assert status < 500, f"{status}: {text[:500]}"
    if status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"}, text
        assert set(body["error"]) == {"message", "type", "param", "code"}, text
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], text
        return
    content_type = headers.get("content-type", "")
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if content_type.startswith("text/event-stream"):
        # Split on "\n" only, as SSE does: generated text may hold U+2028 or U+0085, which splitlines() takes
        # for line breaks.
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
        if events and events[0].startswith('{"type":"response.created"'):
            # A Responses API stream: typed events, no [DONE]; it ends completed or incomplete, never failed.
            assert json.loads(events[-1])["type"] in ("response.completed", "response.incomplete"), text[
                -500:
            ]
            return
        assert events[-1] == "[DONE]", text[-500:]
        assert all("error" not in json.loads(e) for e in events if e != "[DONE]"), text[-500:]


# ------------------------------------------------------------------------------------------ schemathesis

POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# (method, path, examples per mode). Negative cases are generated for the request bodies.
OPERATIONS = [
    ("POST", "/v1/chat/completions", 120),  # its schema is big: generating a case costs ~0.1 s
    ("POST", "/v1/completions", 200),
    ("POST", "/v1/responses", 60),
    ("POST", "/tokenize", 60),
    ("POST", "/detokenize", 30),
    ("GET", "/v1/models/{model_id}", 20),
    ("GET", "/v1/models", 2),
    ("GET", "/health", 2),
    ("GET", "/version", 2),
    ("GET", "/metrics", 2),
]
# Schema-valid bodies rarely hold a prompt the model accepts (random roles, content part types, token ids),
# so most stop at validation; "sampling" keeps every generated field but swaps in a valid model and prompt,
# so that the sampling fields (n, max_tokens, seed, penalties, stop, logprobs, ...) reach the engine.
VALID_INPUT = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": MODEL, "prompt": "hi"},
    "/v1/responses": {"model": MODEL, "input": "hi", "previous_response_id": None, "conversation": None},
    "/tokenize": {"model": MODEL, "prompt": "hi", "messages": None},
    "/detokenize": {"model": MODEL, "tokens": [1, 2]},
}
CASES = [
    pytest.param(method, path, examples, mode, id=f"{method} {path} {mode}")
    for method, path, examples in OPERATIONS
    for mode in (["positive", "negative", "sampling"] if method == "POST" else ["positive"])
]


@pytest.fixture(scope="module")
def api_schema(live: LiveServer) -> Any:
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")
    # schemathesis stops reading a stream after 20 events by default; read every stream whole, so that an
    # error event or a missing [DONE] late in it is seen (n * max_tokens <= 128 * 128 bounds the events).
    schema.config.max_stream_events = 20_000
    return schema


def test_schema_lists_exactly_the_fuzzed_operations(api_schema: Any) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == {(method, path) for method, path, _ in OPERATIONS}


@pytest.mark.parametrize(("method", "path", "examples", "mode"), CASES)
def test_schemathesis_never_gets_a_server_error(
    live: LiveServer, server: ModelServer, api_schema: Any, method: str, path: str, examples: int, mode: str
) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=NEGATIVE if mode == "negative" else POSITIVE)
    if mode == "sampling":

        def with_valid_input(case: Any) -> Any:
            case.body = {**case.body, **VALID_INPUT[path]}
            return case

        strategy = strategy.map(with_valid_input)
    statuses: Counter[int] = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(base_url=live.base_url, timeout=60)
        statuses[response.status_code] += 1
        assert not response.stream_cut_short
        assert_openai_answer(response.status_code, response.headers, response.text)

    check()
    print(f"{method} {path} {mode}: {dict(statuses)}")
    if method == "POST" and mode != "positive":
        # Each kind of case did what it is for: "sampling" bodies reached the engine, "negative" ones were
        # refused by validation. (Some "negative" bodies are valid after all: pydantic takes "5" for an int,
        # as OpenAI does.) "positive" bodies follow the schema but may all be refused on meaning (a tool
        # message without content, an unknown model): which share is depends on what the generator draws.
        assert statuses[400 if mode == "negative" else 200] > 0, statuses
    assert wait_until(lambda: not engine_leaks(server), 20), engine_leaks(server)


# ------------------------------------------------------------------------------------------ image zoo


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_with_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height, with `idat` as its only pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [random_image(40, 30, seed) for seed in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_with_transparency() -> bytes:
    image = random_image(40, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def sixteen_bit() -> bytes:
    ramp = np.linspace(0, 65535, 48 * 32, dtype=np.uint16).reshape(32, 48)
    return encode(Image.fromarray(ramp), "PNG")  # read back as mode I;16


PNG = encode(random_image(64, 48), "PNG")
JPEG = encode(random_image(64, 48), "JPEG")

# (name, image bytes, media type, expected status)
ZOO: list[tuple[str, bytes, str, int]] = [
    ("palette+transparency", palette_with_transparency(), "image/png", 200),
    ("16-bit grey png", sixteen_bit(), "image/png", 200),
    ("cmyk jpeg", encode(random_image(40, 30).convert("CMYK"), "JPEG"), "image/jpeg", 200),
    ("animated gif", animated("GIF"), "image/gif", 200),
    ("animated webp", animated("WEBP"), "image/webp", 200),
    ("greyscale+alpha", encode(random_image(40, 30).convert("LA"), "PNG"), "image/png", 200),
    ("1-bit bmp", encode(random_image(40, 30).convert("1"), "BMP"), "image/bmp", 200),
    (
        "float tiff",
        encode(Image.fromarray(np.full((20, 30), 0.5, np.float32), "F"), "TIFF"),
        "image/tiff",
        200,
    ),
    ("1x1 pixel", encode(random_image(1, 1), "PNG"), "image/png", 200),
    ("corrupt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "image/png", 400),
    ("truncated png", PNG[: len(PNG) // 2], "image/png", 400),
    ("truncated jpeg", JPEG[: len(JPEG) // 2], "image/jpeg", 400),
    ("zero bytes", b"", "image/png", 400),
    ("zero width", png_with_header(0, 10), "image/png", 400),
    ("text", b"just some text, not an image", "image/png", 400),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", 400),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "application/pdf", 400),
    ("extreme aspect ratio", encode(random_image(3000, 2), "PNG"), "image/png", 400),
    ("oversized bytes", encode(random_image(400, 300), "BMP"), "image/bmp", 413),
    (
        "bomb: header claims 50000x50000",
        png_with_header(50_000, 50_000, zlib.compress(b"\0" * 1000)),
        "image/png",
        413,
    ),
    ("bomb: 2 kB of PNG, 16 Mpx", encode(Image.new("1", (4000, 4000)), "PNG"), "image/png", 413),
]


@pytest.mark.parametrize(("name", "payload", "media_type", "status"), ZOO, ids=[z[0] for z in ZOO])
def test_image_zoo_gets_an_answer_or_an_openai_error(
    live: LiveServer, name: str, payload: bytes, media_type: str, status: int
) -> None:
    url = f"data:{media_type};base64,{base64.b64encode(payload).decode()}"
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ],
        "max_tokens": 2,
    }
    r = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=60)
    assert_openai_answer(r.status_code, r.headers, r.text)
    assert r.status_code == status, r.text
    if status != 200:
        # Every refusal names the image: the media layer's, and a shape the processor could not take.
        assert r.json()["error"]["param"] == "messages[0].content[0].image_url", r.text


# ------------------------------------------------------------------------------------------ decoder mutations


def _seeds() -> list[bytes]:
    image = random_image(24, 16, seed=3)
    out = []
    for fmt in ALLOWED_FORMATS:
        try:
            out.append(encode(image, fmt))
        except (KeyError, OSError):  # a format this Pillow build cannot write (AVIF without libavif)
            continue
    out.append(animated("GIF"))
    out.append(palette_with_transparency())
    out.append(sixteen_bit())
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "zero run"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + draw(st.integers(1, 64))] = bytes(64)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF and TIFF tags
@settings(FUZZ, max_examples=1500)
@given(data=mutated_images())
def test_mutated_images_decode_or_raise_media_error(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=MAX_IMAGE_PIXELS)
    except MediaError:
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
