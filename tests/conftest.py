"""Shared fixtures: tiny random-weight checkpoints built once per session, offline; helpers that run
`vlmserve serve` as a subprocess for end-to-end tests, and a loopback HTTP server for image files."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmserve.checkpoints.checkpoint import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


# ------------------------------------------------------------------------------------------ server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM (graceful shutdown), then SIGKILL if it hangs; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def served(checkpoint: Path | str | None, log: Path, *flags: str) -> Iterator[str]:
    """`start_vlmserve` for a with-block: its base URL inside; on leaving, the server is stopped, and when the
    block ended normally it must have exited cleanly (uvicorn re-raises the SIGTERM it handled once shutdown
    is complete: -SIGTERM is a clean exit)."""
    process, url = start_vlmserve(checkpoint, log, *flags)
    try:
        yield url
    finally:
        code = stop_process(process)
    assert code in (0, -signal.SIGTERM), log.read_text()


def start_vlmserve(
    checkpoint: Path | str | None, log: Path, *flags: str, timeout: float = 120.0
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m vlmserve serve [CHECKPOINT] --port <free> *flags`, output to `log`; returns once /health
    answers 200, with the process and its base URL. The caller stops it with stop_process."""
    port = free_port()
    model = [] if checkpoint is None else [str(checkpoint)]
    cmd = [sys.executable, "-m", "vlmserve", "serve", *model, "--port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vlmserve serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    return process, base_url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vlmserve serve was not healthy after {timeout} s:\n{log.read_text()}")
            time.sleep(0.1)
    except BaseException:
        stop_process(process)
        raise


# ------------------------------------------------------------------------------------------ image files by http


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The server under test cancels a request's other fetches when one image fails: a closed
        # connection mid-response is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a free port) while the block runs; yields its base URL."""
    httpd = _FileServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
