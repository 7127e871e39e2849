"""Media loading: data: URLs, local files and http(s) from a loopback server, decoded safely to RGB.

The SSRF address policy has its own table in test_ssrf.py; here the loopback server is reached through the
operator options that allow it.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, features

from vlmserve import __version__
from vlmserve.media import MediaConfig, MediaError, MediaLoader, PinnedAsyncClient, decode_image, to_rgb
from vlmserve.media import sources as media_sources

# ---------------------------------------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but that carries no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int32)  # (H, W, 3)


RED_PNG = encode(Image.new("RGB", (8, 6), (10, 200, 30)), "PNG")


@pytest.fixture
async def loader() -> AsyncIterator[MediaLoader]:
    async with MediaLoader(MediaConfig()) as media_loader:
        yield media_loader


async def load_error(loader: MediaLoader, url: str, index: int = 0) -> MediaError:
    with pytest.raises(MediaError) as caught:
        await loader.load_image(url, index)
    return caught.value


# --------------------------------------------------------------------------------- data: URLs, formats


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 6),
        pytest.param(
            "WEBP",
            {"lossless": True},
            0,
            marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow without WebP"),
        ),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
    ],
)
async def test_data_url_formats_decode_to_rgb(
    loader: MediaLoader, fmt: str, params: dict[str, object], tolerance: int
) -> None:
    source = Image.new("RGB", (12, 7), (255, 0, 0))
    image = await loader.load_image(data_url(encode(source, fmt, **params), f"image/{fmt.lower()}"), 0)
    assert image.mode == "RGB"
    assert image.size == (12, 7)
    assert np.abs(pixels(image) - [255, 0, 0]).max() <= tolerance


@pytest.mark.parametrize(
    "fmt",
    [
        "GIF",
        pytest.param("WEBP", marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP")),
    ],
)
async def test_animation_gives_first_frame(loader: MediaLoader, fmt: str) -> None:
    frames = [Image.new("RGB", (5, 5), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert Image.open(io.BytesIO(data)).n_frames == 3  # really animated
    image = await loader.load_image(data_url(data), 0)
    assert pixels(image)[0, 0].tolist() == [255, 0, 0]


async def test_data_url_tolerates_missing_media_type_wrapping_urlsafe_and_padding(
    loader: MediaLoader,
) -> None:
    payload = base64.b64encode(RED_PNG).decode()
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    urlsafe = base64.urlsafe_b64encode(RED_PNG).decode().rstrip("=")
    for url in (
        f"data:;base64,{payload}",
        f"data:base64,{payload}",
        f"data:application/octet-stream;base64,{payload}",
        f"data:image/png;base64,{wrapped}",
        f"data:image/png;base64,{urlsafe}",
        f"data:image/png;base64,{urllib.parse.quote(payload, safe='')}",
    ):
        image = await loader.load_image(url, 0)
        assert pixels(image)[0, 0].tolist() == [10, 200, 30], url[:40]


async def test_data_url_errors_are_clear(loader: MediaLoader) -> None:
    not_base64 = await load_error(loader, "data:image/png,%89PNG", index=2)
    assert not_base64.status_code == 400
    assert not_base64.index == 2
    assert "base64" in not_base64.message
    assert not_base64.message.startswith("image 2 (")

    invalid = await load_error(loader, "data:image/png;base64,@@@@not*base64")
    assert invalid.status_code == 400
    assert "not valid base64" in invalid.reason

    assert "media type 'text/plain'" in (await load_error(loader, data_url(RED_PNG, "text/plain"))).reason
    assert "no ','" in (await load_error(loader, "data:image/png;base64")).reason
    assert "empty" in (await load_error(loader, "data:image/png;base64,")).reason


async def test_error_message_never_echoes_a_data_payload(loader: MediaLoader) -> None:
    payload = base64.b64encode(os.urandom(30_000)).decode()
    error = await load_error(loader, f"data:image/png;base64,{payload}", index=1)
    assert payload[:200] not in error.message
    assert "data:image/png;base64,..." in error.message
    assert len(error.message) < 400


async def test_oversized_data_url_is_refused_before_base64_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("base64 was decoded although the payload was already known to be too large")

    monkeypatch.setattr(media_sources.base64, "b64decode", must_not_decode)
    async with MediaLoader(MediaConfig(max_image_bytes=1000)) as small:
        error = await load_error(small, data_url(os.urandom(2000)))
    assert error.status_code == 413
    assert "max_image_bytes" in error.reason
    assert "1000" in error.reason


# ------------------------------------------------------------------------------------- pixel modes


def hf_convert_to_rgb(image: Image.Image) -> np.ndarray:
    image_transforms = pytest.importorskip("transformers.image_transforms")
    return image_transforms.convert_to_rgb(image, return_numpy=True)


def transparent_sources() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.putpixel((2, 0), (0, 255, 0, 255))
    la = Image.new("LA", (3, 1), (40, 64))
    palette = Image.new("P", (3, 1), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    grey_keyed = Image.new("L", (2, 1), 9)
    grey_keyed.putpixel((1, 0), 7)
    grey_keyed.info["transparency"] = 7
    return {"RGBA": rgba, "LA": la, "P+transparency": palette, "L+transparency": grey_keyed}


@pytest.mark.parametrize("name", list(transparent_sources()))
async def test_transparency_is_composited_on_white_like_hf(loader: MediaLoader, name: str) -> None:
    source = transparent_sources()[name]
    params = {"transparency": source.info["transparency"]} if "transparency" in source.info else {}
    data = encode(source, "PNG", **params)
    image = await loader.load_image(data_url(data), 0)
    np.testing.assert_array_equal(np.asarray(image), hf_convert_to_rgb(Image.open(io.BytesIO(data))))


async def test_transparency_values(loader: MediaLoader) -> None:
    image = await loader.load_image(data_url(encode(transparent_sources()["RGBA"], "PNG")), 0)
    assert pixels(image)[0, :3].tolist() == [[255, 127, 127], [255, 255, 255], [0, 255, 0]]
    palette = await loader.load_image(data_url(encode(transparent_sources()["P+transparency"], "PNG")), 0)
    assert pixels(palette)[0].tolist() == [[255, 0, 0], [255, 255, 255], [255, 0, 0]]


async def test_cmyk_greyscale_and_bilevel(loader: MediaLoader) -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    image = await loader.load_image(data_url(encode(cmyk, "TIFF")), 0)
    assert pixels(image)[0].tolist() == [[255, 255, 255], [255, 0, 0]]

    grey = await loader.load_image(data_url(encode(Image.new("L", (2, 2), 77), "PNG")), 0)
    assert pixels(grey)[0, 0].tolist() == [77, 77, 77]

    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    image = await loader.load_image(data_url(encode(bilevel, "PNG")), 0)
    assert pixels(image)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


async def test_16_bit_png_is_scaled_not_clipped(loader: MediaLoader) -> None:
    source = Image.fromarray(np.array([[0, 1000, 32896, 65535]], dtype=np.uint16))
    data = encode(source, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = await loader.load_image(data_url(data), 0)
    assert pixels(image)[0, :, 0].tolist() == [0, 4, 128, 255]  # round(v / 257)
    assert (pixels(image)[..., 0] == pixels(image)[..., 2]).all()


async def test_16_bit_png_with_transparent_grey(loader: MediaLoader) -> None:
    source = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16))
    image = await loader.load_image(data_url(encode(source, "PNG", transparency=1000)), 0)
    assert pixels(image)[0, :, 0].tolist() == [0, 255, 255]  # the transparent sample is white


async def test_32_bit_integer_and_float_tiffs(loader: MediaLoader) -> None:
    integers = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32))
    assert integers.mode == "I"
    image = await loader.load_image(data_url(encode(integers, "TIFF")), 0)
    assert pixels(image)[0, :, 0].tolist() == [0, 1, 255, 255, 0]

    unit_floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    image = await loader.load_image(data_url(encode(unit_floats, "TIFF")), 0)
    assert pixels(image)[0, :, 0].tolist() == [0, 128, 255, 0]

    byte_floats = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    image = await loader.load_image(data_url(encode(byte_floats, "TIFF")), 0)
    assert pixels(image)[0, :, 0].tolist() == [0, 100, 255]


def test_to_rgb_big_endian_16_bit() -> None:
    source = Image.frombytes("I;16B", (2, 1), struct.pack(">HH", 257, 65535))
    assert np.asarray(to_rgb(source))[0, :, 0].tolist() == [1, 255]


async def test_exif_orientation_is_applied(loader: MediaLoader) -> None:
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    image = await loader.load_image(data_url(data, "image/jpeg"), 0)
    assert image.size == (10, 20)
    top, bottom = pixels(image)[3, 5], pixels(image)[16, 5]
    assert top[0] > 200
    assert top[2] < 50
    assert bottom[2] > 200
    assert bottom[0] < 50


# ------------------------------------------------------------------------------------ bad payloads


async def test_corrupt_truncated_and_non_image_payloads(loader: MediaLoader) -> None:
    png = encode(noise(64, 64), "PNG")
    jpeg = encode(noise(64, 64), "JPEG")
    corrupt = bytearray(png)
    corrupt[200:260] = b"\x00" * 60  # inside the first IDAT chunk
    cases = {
        "truncated PNG": png[: len(png) * 6 // 10],
        "truncated JPEG": jpeg[: len(jpeg) // 2],
        "corrupt PNG": bytes(corrupt),
        "text": b"hello, this is not an image",
        "header only": png[:30],
        "zero size": png_header_only(0, 10),
    }
    for name, data in cases.items():
        error = await load_error(loader, data_url(data))
        assert error.status_code == 400, name
    truncated = await load_error(loader, data_url(cases["truncated JPEG"]))
    assert "corrupt or truncated" in truncated.reason
    assert "not an image in a supported format" in (await load_error(loader, data_url(cases["text"]))).reason


async def test_formats_outside_the_allow_list_are_refused(loader: MediaLoader) -> None:
    for fmt in ("PPM", "PCX", "ICO"):
        error = await load_error(loader, data_url(encode(Image.new("RGB", (4, 4)), fmt)))
        assert "not an image in a supported format" in error.reason, fmt


async def test_decompression_bombs_are_refused_from_the_header(loader: MediaLoader) -> None:
    # 10^10 pixels: refused by Pillow's own guard while opening, before any allocation.
    huge = await load_error(loader, data_url(png_header_only(100_000, 100_000)))
    assert huge.status_code == 413
    # 81 M pixels: under Pillow's guard, over our 64 M default; refused before decoding (no pixel data here).
    large = await load_error(loader, data_url(png_header_only(9000, 9000)))
    assert large.status_code == 413
    assert "9000x9000" in large.reason
    assert "max_image_pixels" in large.reason


async def test_pixel_limit_is_configurable() -> None:
    async with MediaLoader(MediaConfig(max_image_pixels=100)) as strict:
        error = await load_error(strict, data_url(encode(noise(20, 20), "PNG")))
        assert error.status_code == 413
        assert "400 pixels" in error.reason
        assert (await strict.load_image(data_url(encode(noise(10, 10), "PNG")), 0)).size == (10, 10)


def test_decode_image_returns_a_detached_loaded_copy() -> None:
    image = decode_image(encode(noise(6, 4), "PNG"), max_pixels=1000)
    assert image.mode == "RGB"
    assert image.size == (6, 4)
    assert not hasattr(image, "fp") or image.fp is None


# ------------------------------------------------------------------------------------- local files


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "red.png").write_bytes(RED_PNG)
    (tmp_path / "secret.png").write_bytes(RED_PNG)
    return root


async def test_local_files_inside_the_allowed_dir(media_dir: Path) -> None:
    path = media_dir / "red.png"
    os.symlink(path, media_dir / "alias.png")  # a symlink that stays inside is fine
    async with MediaLoader(MediaConfig(allowed_local_media_path=media_dir)) as local:
        for url in (
            str(path),
            f"file://{path}",
            f"file://localhost{path}",
            f"file://{urllib.parse.quote(str(path))}",
            str(media_dir / "alias.png"),
        ):
            image = await local.load_image(url, 0)
            assert pixels(image)[0, 0].tolist() == [10, 200, 30], url


async def test_local_files_cannot_escape_the_allowed_dir(media_dir: Path) -> None:
    os.symlink(media_dir.parent / "secret.png", media_dir / "escape.png")
    async with MediaLoader(MediaConfig(allowed_local_media_path=media_dir)) as local:
        for url in (
            f"{media_dir}/../secret.png",
            f"file://{media_dir}/../secret.png",
            str(media_dir / "escape.png"),
            "/etc/passwd",
            f"{media_dir}/../does-not-exist.png",  # refused the same way: existence cannot be probed
        ):
            error = await load_error(local, url)
            assert error.status_code == 400
            assert "outside the directory allowed" in error.reason, url


async def test_local_file_errors(media_dir: Path) -> None:
    (media_dir / "subdir").mkdir()
    os.mkfifo(media_dir / "pipe.png")
    (media_dir / "big.png").write_bytes(encode(noise(64, 64), "PNG"))
    config = MediaConfig(allowed_local_media_path=media_dir, max_image_bytes=5000)
    async with MediaLoader(config) as local:
        assert "does not exist" in (await load_error(local, str(media_dir / "missing.png"))).reason
        assert "not a regular file" in (await load_error(local, str(media_dir / "subdir"))).reason
        assert "not a regular file" in (await load_error(local, str(media_dir / "pipe.png"))).reason
        too_big = await load_error(local, str(media_dir / "big.png"))
        assert too_big.status_code == 413
        assert "host 'evil'" in (await load_error(local, f"file://evil{media_dir}/red.png")).reason
        assert "relative path" in (await load_error(local, "red.png")).reason


async def test_local_files_disabled_by_default(media_dir: Path, loader: MediaLoader) -> None:
    for url in (str(media_dir / "red.png"), f"file://{media_dir}/red.png"):
        error = await load_error(loader, url, index=4)
        assert "--allowed-local-media-path" in error.reason
        assert error.index == 4
        assert error.status_code == 400


def test_allowed_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed_local_media_path"):
        MediaLoader(MediaConfig(allowed_local_media_path=tmp_path / "nope"))


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_image_pixels": 10**9}, "max_image_pixels"),
        ({"max_image_bytes": 0}, "max_image_bytes"),
        ({"fetch_timeout_s": 0}, "fetch_timeout_s"),
        ({"max_redirects": -1}, "max_redirects"),
        ({"allowed_media_domains": ("https://images.example",)}, "allowed_media_domains"),
        ({"allowed_media_domains": ("images.example:8080",)}, "allowed_media_domains"),
        ({"allowed_media_domains": ["images.example"]}, "allowed_media_domains"),
        ({"allowed_local_media_path": Path("relative/dir")}, "allowed_local_media_path"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MediaConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_host_patterns() -> None:
    config = MediaConfig(allowed_media_domains=("*.corp.example", "10.0.0.5", "::1", "[fe80::1]", "x.y."))
    assert len(config.allowed_media_domains) == 5


# -------------------------------------------------------------------------------------------- http

HUGE_TOTAL = 256 * 1024 * 1024


class ImageServer:
    """A loopback HTTP server with the behaviours (and misbehaviours) an image fetcher meets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.huge_sent = 0
        self.huge_done = threading.Event()
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers.items())))
                owner.route(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients that hang up mid-response are part of the tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def route(self, handler: BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        if path == "/img.png":
            self.reply(handler, 200, RED_PNG, {"Content-Type": "image/png"})
        elif path == "/text":
            self.reply(handler, 200, b"hello, not an image", {"Content-Type": "text/plain"})
        elif path == "/gzip":
            self.reply(handler, 200, gzip.compress(RED_PNG), {"Content-Encoding": "gzip"})
        elif path == "/redirect":
            self.reply(handler, 302, b"", {"Location": query["to"][0]})
        elif path.startswith("/chain/"):
            hops = int(path.rsplit("/", 1)[1])
            if hops == 0:
                self.reply(handler, 200, RED_PNG, {"Content-Type": "image/png"})
            else:
                self.reply(handler, 301, b"", {"Location": f"/chain/{hops - 1}"})
        elif path == "/huge":
            self.stream_huge(handler)
        elif path == "/declared-huge":
            handler.send_response(200)
            handler.send_header("Content-Length", str(10**10))
            handler.end_headers()
            handler.wfile.write(b"\x00" * 1024)
            self.release.wait(5)
        elif path == "/stall":
            self.release.wait(5)
        elif path == "/trickle":
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            for _ in range(1000):
                if self.release.wait(0.05):
                    break
                handler.wfile.write(b"\x00")
                handler.wfile.flush()
        else:
            self.reply(handler, 404, b"not found", {})

    def stream_huge(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()  # no Content-Length: the body ends when the connection closes
        chunk = b"\x00" * 65536
        try:
            while self.huge_sent < HUGE_TOTAL:
                handler.wfile.write(chunk)
                self.huge_sent += len(chunk)
        except OSError:
            pass  # the client hung up, as it should
        finally:
            self.huge_done.set()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    image_server = ImageServer()
    yield image_server
    image_server.close()


def private_ok(**kwargs: object) -> MediaConfig:
    return MediaConfig(allow_private_network=True, **kwargs)  # type: ignore[arg-type]


async def test_loopback_server_is_refused_by_default(server: ImageServer, loader: MediaLoader) -> None:
    error = await load_error(loader, server.url("/img.png"))
    assert "SSRF" in error.reason
    assert "--allow-private-network" in error.reason
    assert server.requests == []


@pytest.mark.parametrize(
    ("config", "host"),
    [
        (MediaConfig(allow_private_network=True), "127.0.0.1"),
        (MediaConfig(allowed_media_domains=("127.0.0.1",)), "127.0.0.1"),
        (MediaConfig(allowed_media_domains=("localhost",)), "localhost"),
        (MediaConfig(allowed_media_domains=("LOCALHOST.",)), "localhost"),
    ],
)
async def test_operator_options_allow_the_loopback_server(
    server: ImageServer, config: MediaConfig, host: str
) -> None:
    async with MediaLoader(config) as allowed:
        image = await allowed.load_image(server.url("/img.png", host), 0)
    assert pixels(image)[0, 0].tolist() == [10, 200, 30]
    (path, headers), *_ = server.requests
    assert path == "/img.png"
    assert headers["User-Agent"] == f"vlmserve/{__version__}"
    assert headers["Accept-Encoding"] == "identity"


async def test_an_exempt_domain_does_not_exempt_other_spellings(server: ImageServer) -> None:
    async with MediaLoader(MediaConfig(allowed_media_domains=("localhost",))) as allowed:
        error = await load_error(allowed, server.url("/img.png", "127.0.0.1"))
    assert "loopback" in error.reason
    assert server.requests == []


async def test_byte_cap_cuts_a_huge_body_short(server: ImageServer) -> None:
    async with MediaLoader(private_ok(max_image_bytes=1024 * 1024)) as capped:
        started = time.monotonic()
        error = await load_error(capped, server.url("/huge"))
        assert time.monotonic() - started < 5
    assert error.status_code == 413
    assert "max_image_bytes" in error.reason
    assert server.huge_done.wait(5)
    # Socket buffers let the server get a few MB ahead; it must be nowhere near the 256 MB it offered.
    assert server.huge_sent < 64 * 1024 * 1024


async def test_declared_content_length_over_the_cap_is_refused_before_reading(server: ImageServer) -> None:
    async with MediaLoader(private_ok()) as capped:
        error = await load_error(capped, server.url("/declared-huge"))
    assert error.status_code == 413
    assert str(10**10) in error.reason


async def test_redirects_are_followed_and_limited(server: ImageServer) -> None:
    async with MediaLoader(private_ok(max_redirects=3)) as allowed:
        assert (await allowed.load_image(server.url("/redirect?to=/img.png"), 0)).size == (8, 6)
        assert (await allowed.load_image(server.url("/chain/3"), 0)).size == (8, 6)
        error = await load_error(allowed, server.url("/chain/4"))
    assert "too many redirects" in error.reason
    assert "max_redirects=3" in error.reason


async def test_each_redirect_hop_is_vetted_again(server: ImageServer) -> None:
    async with MediaLoader(MediaConfig(allowed_media_domains=("localhost",))) as allowed:
        for target, why in (
            (server.url("/img.png", "127.0.0.1"), "loopback"),  # same server, but not an exempt name
            ("http://10.0.0.1/img.png", "private"),  # vetted and refused without connecting
            ("file:///etc/passwd", "scheme 'file'"),
            ("gopher://localhost:70/", "scheme 'gopher'"),
        ):
            redirect = server.url(f"/redirect?to={urllib.parse.quote(target, safe='')}", "localhost")
            error = await load_error(allowed, redirect)
            assert "redirected to" in error.reason, target
            assert why in error.reason, target
    assert [path for path, _ in server.requests if path == "/img.png"] == []


async def test_a_redirect_is_followed_once_its_target_is_allowed_too(server: ImageServer) -> None:
    """The other half of the test above: exempting the redirect's target as well, or the private network,
    lets the same redirect through."""
    target = server.url("/img.png", "127.0.0.1")
    redirect = server.url(f"/redirect?to={urllib.parse.quote(target, safe='')}", "localhost")
    for config in (
        MediaConfig(allowed_media_domains=("localhost", "127.0.0.1")),
        MediaConfig(allow_private_network=True),
    ):
        async with MediaLoader(config) as loader:
            assert (await loader.load_image(redirect, 0)).size == (8, 6)
    hosts = [headers["Host"] for path, headers in server.requests if path == "/img.png"]
    assert hosts == [f"127.0.0.1:{server.port}"] * 2  # fetched from the target, once per configuration


async def test_http_errors(server: ImageServer) -> None:
    async with MediaLoader(private_ok(fetch_timeout_s=0.3)) as allowed:
        assert "HTTP 404 Not Found" in (await load_error(allowed, server.url("/missing"))).reason
        assert "Content-Encoding 'gzip'" in (await load_error(allowed, server.url("/gzip"))).reason
        not_image = await load_error(allowed, server.url("/text"))
        assert "not an image" in not_image.reason
        started = time.monotonic()
        stalled = await load_error(allowed, server.url("/stall"))
        assert "fetch_timeout_s=0.3" in stalled.reason
        assert time.monotonic() - started < 3


async def test_total_fetch_deadline_stops_a_trickling_server(server: ImageServer) -> None:
    config = private_ok(fetch_timeout_s=2.0, fetch_total_timeout_s=0.5)
    async with MediaLoader(config) as allowed:
        started = time.monotonic()
        error = await load_error(allowed, server.url("/trickle"))
        assert time.monotonic() - started < 3
    assert "fetch_total_timeout_s=0.5" in error.reason


# --------------------------------------------------------------------------------- load_images


async def test_load_images_keeps_order(loader: MediaLoader) -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    urls = [data_url(encode(Image.new("RGB", (3, 3), color), "PNG")) for color in colors]
    images = await loader.load_images(urls)
    assert [pixels(image)[0, 0].tolist() for image in images] == [list(color) for color in colors]
    assert await loader.load_images([]) == []


async def test_load_images_names_the_failing_image_and_cancels_the_rest(server: ImageServer) -> None:
    async with MediaLoader(private_ok(fetch_timeout_s=10.0)) as allowed:
        urls = [data_url(RED_PNG), server.url("/stall"), "ftp://example.com/cat.png"]
        started = time.monotonic()
        with pytest.raises(MediaError) as caught:
            await allowed.load_images(urls)
        assert time.monotonic() - started < 3  # the stalled fetch was cancelled, not waited for
    assert caught.value.index == 2
    assert caught.value.message.startswith("image 2 (ftp://example.com/cat.png): URL scheme 'ftp'")


async def test_loader_takes_only_a_pinned_client() -> None:
    async with httpx.AsyncClient() as plain:
        with pytest.raises(TypeError, match="PinnedAsyncClient"):
            MediaLoader(MediaConfig(), http_client=plain)  # type: ignore[arg-type]


async def test_shared_client_is_not_closed_by_the_loader(server: ImageServer) -> None:
    config = private_ok()
    async with PinnedAsyncClient(timeout_s=5.0, user_agent="shared") as client:
        for _ in range(2):
            async with MediaLoader(config, http_client=client) as loader:
                assert (await loader.load_image(server.url("/img.png"), 0)).size == (8, 6)
        assert not client.is_closed
    assert [headers["User-Agent"] for _, headers in server.requests] == ["shared", "shared"]
