"""`vlmserve run-batch` as users run it (a subprocess on the tiny checkpoint): chat, responses and completions
lines answered in OpenAI's batch output format, bad lines reported each in its own output line without
stopping the job, and a rerun that skips what the output already holds (also after a torn last line).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from vlmserve.api import batch
from vlmserve.api.batch import parse_line

NO_EOS = {"ignore_eos": True}


def request(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(checkpoint: Path, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vlmserve", "run-batch", "-i", str(inp), "-o", str(out), str(checkpoint)]
    cmd += ["--max-model-len", "512", "--num-kv-blocks", "64", "--no-engine-process", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def results(out: Path) -> dict[str | None, dict[str, Any]]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_id: dict[str | None, dict[str, Any]] = {}
    for record in records:
        key = record["custom_id"] if record["custom_id"] is not None else f"line{record['error']['line']}"
        assert key not in by_id, f"{key} written twice"
        by_id[key] = record
    return by_id


def test_run_batch_answers_reports_bad_lines_and_resumes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **NO_EOS}
    lines = [
        request("chat-1", "/v1/chat/completions", chat),
        request("resp-1", "/v1/responses", {"input": "hi", "max_output_tokens": 16, **NO_EOS}),
        request("cmpl-1", "/v1/completions", {"prompt": "hi", "max_tokens": 2, **NO_EOS}),
        "{not json",
        request("bad-url", "/v1/embeddings", {"input": "hi"}),
        request("bad-temp", "/v1/chat/completions", {**chat, "temperature": 3}),
        request("chat-1", "/v1/chat/completions", chat),  # a repeated custom_id
        "",
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    first = run_batch(tiny_checkpoint, inp, out)
    assert first.returncode == 1, first.stderr  # some lines failed, the job did not stop
    by_id = results(out)
    assert set(by_id) == {"chat-1", "resp-1", "cmpl-1", "line4", "bad-url", "bad-temp", "line7"}
    ok = by_id["chat-1"]["response"]
    assert ok["status_code"] == 200 and ok["body"]["usage"]["completion_tokens"] == 3
    assert ok["request_id"] == ok["body"]["id"] and by_id["chat-1"]["error"] is None
    assert by_id["resp-1"]["response"]["body"]["object"] == "response"
    assert by_id["cmpl-1"]["response"]["body"]["object"] == "text_completion"
    assert by_id["line4"]["response"] is None and "not valid JSON" in by_id["line4"]["error"]["message"]
    assert "/v1/embeddings" in by_id["bad-url"]["error"]["message"]
    bad_temp = by_id["bad-temp"]["response"]
    assert bad_temp["status_code"] == 400 and bad_temp["body"]["error"]["param"] == "temperature"
    assert "used twice" in by_id["line7"]["error"]["message"]

    # A rerun after a crash mid-write: the torn line is dropped, only the new request runs.
    with out.open("a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "cm')
    with inp.open("a") as f:
        f.write(request("chat-2", "/v1/chat/completions", chat) + "\n")
    second = run_batch(tiny_checkpoint, inp, out)
    assert "1 succeeded, 0 failed, 7 already" in second.stderr, second.stderr
    assert second.returncode == 0
    assert set(results(out)) == {*by_id, "chat-2"}


def test_parse_line_names_what_is_wrong() -> None:
    assert "custom_id" in parse_line(1, '{"url": "/v1/responses", "body": {}}').message  # type: ignore[union-attr]
    assert "method" in parse_line(2, request("a", "/v1/responses", {}).replace("POST", "GET")).message  # type: ignore[union-attr]
    assert "stream" in parse_line(3, request("a", "/v1/responses", {"stream": True})).message  # type: ignore[union-attr]
    assert "body" in parse_line(4, '{"custom_id": "a", "url": "/v1/responses"}').message  # type: ignore[union-attr]


async def test_in_flight_requests_are_bounded(tmp_path: Path) -> None:
    """However long the file, at most max_concurrency requests wait at once (the input is read no faster
    than answers come back), and every line is answered once."""
    now = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.002)
        now -= 1
        return httpx.Response(200, json={"id": json.loads(request.content)["messages"][0]["content"]})

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    body = {"messages": [{"role": "user", "content": "x"}]}
    inp.write_text("".join(request(f"r{i}", "/v1/chat/completions", body) + "\n" for i in range(200)))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as client:
        summary = await batch.run_batch(inp, out, client, max_concurrency=3, progress=False)
    assert (summary.succeeded, summary.failed, peak) == (200, 0, 3)
    assert len(out.read_text().splitlines()) == 200
