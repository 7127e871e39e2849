"""`vlmserve serve <dir>` on a tiny Qwen3-VL-MoE checkpoint (DeepStack, interleaved M-RoPE and MoE layers: the
family furthest from Qwen2.5-VL; the others run through the same server code, and through the engine in
tests/test_families.py): the server starts, lists the model, and answers concurrent chat requests with
images exactly as it answers them one at a time."""

from __future__ import annotations

import base64
import io
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import random_image, start_vlmserve, stop_process
from vlmserve.checkpoints.checkpoint import write_checkpoint


def _data_url(width: int, height: int, seed: int) -> str:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _request(i: int) -> dict[str, Any]:
    images = [{"type": "image_url", "image_url": {"url": _data_url(40 + 13 * i, 70 - 5 * i, i)}}] * (i % 3)
    return {
        "model": "m",
        "messages": [{"role": "user", "content": [*images, {"type": "text", "text": f"Describe it ({i})."}]}],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
    }


def _answer(url: str, body: dict[str, Any]) -> tuple[str, list[float]]:
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]


@pytest.mark.parametrize("family", ["qwen3_vl_moe"])
def test_serve_answers_batched_like_sequential(family: str, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / family, seed=2, family=family)
    process, url = start_vlmserve(
        checkpoint,
        tmp_path / "server.log",
        "--model-id", "m",
        "--dtype", "float32",
        "--max-model-len", "1024",
        "--log-level", "warning",
    )  # fmt: skip
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["m"]
        bodies = [_request(i) for i in range(6)]
        sequential = [_answer(url, body) for body in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            batched = list(pool.map(lambda body: _answer(url, body), bodies))
        for (text_a, lp_a), (text_b, lp_b) in zip(sequential, batched, strict=True):
            assert text_a == text_b
            assert lp_a == pytest.approx(lp_b, abs=1e-4)
    finally:
        assert stop_process(process) in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()
