"""`vlmserve bench` against a real `vlmserve serve` process (the tiny checkpoint): every request completes with
exactly max_tokens tokens under ignore_eos, the timings are consistent (TTFT <= end-to-end, percentiles in
order, one inter-token gap per token after the first), Poisson arrivals follow the seeded schedule, the
duration limit stops issuing, and failures are counted and reported instead of ending the run. Also the
synthetic requests and the statistics on their own, and the flag errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port, start_vlmserve, stop_process
from vlmserve import cli
from vlmserve.bench.serving import (
    BenchConfig,
    BenchReport,
    RequestResult,
    build_bodies,
    poisson_loop,
    send_request,
    summarize,
)

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("bench") / "server.log"
    process: subprocess.Popen[bytes]
    process, url = start_vlmserve(tiny_checkpoint, log, "--model-id", MODEL, "--max-model-len", "1024")
    yield f"{url}/v1"
    stop_process(process)


def run_bench(
    base_url: str, out: Path, *flags: str
) -> tuple[int, dict[str, Any], subprocess.CompletedProcess[str]]:
    """`vlmserve bench ...` as a user runs it, in its own process; returns the exit status, the JSON report
    and the process (the table on stdout, the progress bar on stderr)."""
    cmd = [sys.executable, "-m", "vlmserve", "bench", "--base-url", base_url, "--json", str(out), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(out.read_text()), done


def assert_consistent(report: dict[str, Any], output_len: int) -> None:
    """Per-request timings agree with each other and with the summary."""
    for r in report["requests"]:
        assert r["ok"], r["error"]
        assert r["output_tokens"] == output_len
        assert len(r["itl_ms"]) == r["output_tokens"] - 1
        assert 0 < r["ttft_ms"] <= r["latency_ms"]
        assert r["ttft_ms"] + sum(r["itl_ms"]) <= r["latency_ms"] + 1e-6
    metrics = report["metrics"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        stats = metrics[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert metrics["ttft_ms"]["p99"] <= metrics["e2e_latency_ms"]["p99"]


def test_closed_loop_counts_every_token(server: str, tmp_path: Path) -> None:
    flags = ["--model", MODEL, "--num-requests", "8", "--concurrency", "4", "--output-len", "8"]
    flags += ["--ignore-eos", "--image-size", "64x48", "--prompt-words", "6", "--warmup", "2"]
    code, report, done = run_bench(server, tmp_path / "out.json", *flags)
    assert code == 0
    metrics = report["metrics"]
    assert (metrics["completed"], metrics["failed"], metrics["not_issued"]) == (8, 0, 0)
    assert metrics["total_output_tokens"] == 8 * 8
    assert metrics["total_input_tokens"] == sum(r["prompt_tokens"] for r in report["requests"])
    assert all(r["prompt_tokens"] > 0 for r in report["requests"])
    assert metrics["request_throughput"] == pytest.approx(8 / metrics["duration_s"])
    assert_consistent(report, output_len=8)
    # At most 4 in flight: the 5th request starts only after one of the first 4 finished.
    starts = sorted((r["start_s"], r["start_s"] + r["latency_ms"] / 1e3) for r in report["requests"])
    first_end = min(end for _, end in starts[:4])
    assert starts[4][0] >= first_end - 1e-6
    assert all(start < first_end for start, _ in starts[:4])  # ... and 4 were in flight, not fewer
    assert re.search(r"completed / failed / not issued +8 / 0 / 0\n", done.stdout)
    assert re.search(r"TTFT( +\d+\.\d){4}\n", done.stdout)
    assert "bench: 100%" in done.stderr and "8/8" in done.stderr  # the progress bar


def test_poisson_arrivals_follow_the_seeded_schedule(server: str, tmp_path: Path) -> None:
    rate, n, seed = 8.0, 5, 3
    flags = ["--model", MODEL, "--num-requests", str(n), "--request-rate", str(rate), "--seed", str(seed)]
    flags += ["--output-len", "4", "--ignore-eos", "--image-size", "32x32", "--warmup", "0"]
    code, report, _ = run_bench(server, tmp_path / "out.json", *flags)
    assert code == 0
    assert report["metrics"]["completed"] == n
    assert_consistent(report, output_len=4)
    # Arrivals are open loop: request i is sent at the sum of the first i seeded exponential gaps, whether or
    # not earlier requests finished.
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    expected = np.concatenate([[0.0], np.cumsum(gaps)])
    # A request is never sent early (the schedule is absolute), and late only by event-loop delays: on a
    # 2-core machine that also runs the server, up to a few hundred ms (the tight bound is checked without a
    # server below).
    lateness = np.array([r["start_s"] for r in report["requests"]]) - expected
    assert np.all(lateness > -0.005) and np.all(lateness < 0.5), lateness


async def test_poisson_loop_sends_on_schedule_while_earlier_requests_run() -> None:
    """Without a server: each fake request takes longer than the gaps between arrivals, so an open loop must
    have several in flight and still send each one at its scheduled time."""
    rate, n, seed = 50.0, 8, 5
    started: list[float] = []

    async def slow_send(body: bytes) -> RequestResult:
        started.append(time.perf_counter())
        await asyncio.sleep(0.2)  # ~10 mean gaps
        return RequestResult(ok=True, start=started[-1], latency=0.2)

    t0 = time.perf_counter()
    results = await poisson_loop([b"x"] * n, rate, t0 + 60, slow_send, np.random.default_rng(seed))
    assert len(results) == n
    expected = np.concatenate([[0.0], np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n - 1))])
    lateness = np.array(started) - t0 - expected
    assert np.all(lateness > -0.005) and np.all(lateness < 0.05), lateness
    assert started[-1] - started[0] < 0.2  # the last was sent before the first finished


def test_same_image_is_served_from_the_prefix_cache(server: str, tmp_path: Path) -> None:
    # Distinct images (the default) share only the chat template's first block with earlier requests; one
    # image sent again is answered from the server's prefix cache, which the report shows.
    base = ["--model", MODEL, "--num-requests", "3", "--concurrency", "1", "--output-len", "2"]
    base += ["--image-size", "224x224", "--prompt-words", "0", "--warmup", "0", "--seed", "7"]
    _, distinct, first = run_bench(server, tmp_path / "distinct.json", *base)
    _, same, _ = run_bench(server, tmp_path / "same.json", *base, "--same-image")
    prompt_tokens = distinct["requests"][0]["prompt_tokens"]
    assert all(r["cached_tokens"] < prompt_tokens // 2 for r in distinct["requests"])
    assert all(r["cached_tokens"] >= prompt_tokens // 2 for r in same["requests"][1:])
    assert same["metrics"]["total_cached_tokens"] == sum(r["cached_tokens"] for r in same["requests"])
    # The same seed again sends the same requests: all cached, and the table says why.
    _, again, second = run_bench(server, tmp_path / "again.json", *base)
    assert all(r["cached_tokens"] >= prompt_tokens // 2 for r in again["requests"])
    assert "prefix cache" not in first.stdout and "use another --seed" in second.stdout


def test_text_only_completions_endpoint(server: str, tmp_path: Path) -> None:
    flags = ["--model", MODEL, "--endpoint", "completions", "--num-requests", "4", "--concurrency", "2"]
    flags += ["--prompt-words", "12", "--output-len", "6", "--ignore-eos", "--warmup", "1"]
    code, report, _ = run_bench(server, tmp_path / "out.json", *flags)
    assert code == 0
    assert report["config"]["images_per_request"] == 0
    assert report["metrics"]["total_output_tokens"] == 4 * 6
    assert_consistent(report, output_len=6)


def test_json_schema_load_is_constrained_by_the_server(server: str, tmp_path: Path) -> None:
    """--json-schema sends response_format: a schema that closes after a few tokens ends every request
    before --output-len even under --ignore-eos (the structure is complete), where free requests run to it."""
    flags = ["--model", MODEL, "--num-requests", "4", "--concurrency", "2", "--output-len", "24"]
    flags += ["--ignore-eos", "--image-size", "64x48", "--prompt-words", "4", "--warmup", "0"]
    code, report, _ = run_bench(server, tmp_path / "out.json", *flags, "--json-schema", '{"const": "yes"}')
    assert code == 0
    assert report["config"]["json_schema"] == {"const": "yes"}
    assert all(0 < r["output_tokens"] < 24 for r in report["requests"]), report["requests"]


def test_duration_limit_stops_issuing_and_lets_in_flight_finish(server: str, tmp_path: Path) -> None:
    flags = ["--model", MODEL, "--num-requests", "400", "--concurrency", "2", "--duration-limit", "0.3"]
    flags += ["--output-len", "4", "--ignore-eos", "--image-size", "32x32", "--warmup", "0"]
    code, report, _ = run_bench(server, tmp_path / "out.json", *flags)
    assert code == 0
    metrics = report["metrics"]
    assert metrics["failed"] == 0 and metrics["completed"] >= 1
    assert metrics["not_issued"] == 400 - metrics["completed"] > 0
    assert all(r["start_s"] < 0.3 for r in report["requests"])


def test_failures_are_counted_and_summarised(server: str, tmp_path: Path) -> None:
    flags = ["--model", "no-such-model", "--num-requests", "3", "--concurrency", "2", "--warmup", "1"]
    flags += ["--image-size", "32x32", "--output-len", "4"]
    code, report, _ = run_bench(server, tmp_path / "out.json", *flags)
    assert code == 1
    metrics = report["metrics"]
    assert (metrics["completed"], metrics["failed"]) == (0, 3)
    [(message, count)] = metrics["errors"].items()
    assert count == 3 and message.startswith("HTTP 404") and "no-such-model" in message
    assert metrics["ttft_ms"]["p50"] is None
    assert metrics["warmup_failed"] == 1  # counted apart from the measured requests


def test_unreachable_server_is_a_failed_run_not_a_crash(tmp_path: Path) -> None:
    flags = ["--model", MODEL, "--num-requests", "2", "--warmup", "0", "--request-timeout", "10"]
    code, report, _ = run_bench(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "out.json", *flags)
    assert code == 1
    assert report["metrics"]["failed"] == 2
    assert "ConnectError" in next(iter(report["metrics"]["errors"]))


# ------------------------------------------------------------------------------------------ without a server


def _images(body: bytes) -> list[Image.Image]:
    content = json.loads(body)["messages"][0]["content"]
    urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) for url in urls]


def test_bodies_have_distinct_images_of_the_given_sizes() -> None:
    config = BenchConfig(
        "http://x/v1",
        "m",
        image_sizes=((64, 48), (40, 30)),
        images_per_request=2,
        prompt_words=5,
        output_len=7,
    )
    bodies = build_bodies(config, 3, seed=0)
    images = [image for body in bodies for image in _images(body)]
    assert [im.size for im in images] == [(64, 48), (40, 30)] * 3
    assert all(im.format == "JPEG" for im in images)
    assert len({im.tobytes() for im in images}) == 6
    body = json.loads(bodies[0])
    assert body["max_tokens"] == 7 and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert len(body["messages"][0]["content"][-1]["text"].split()) == 5
    assert build_bodies(config, 3, seed=0) == bodies  # seeded: the same run twice sends the same bytes


def test_same_image_and_ignore_eos() -> None:
    config = BenchConfig(
        "http://x/v1", "m", same_image=True, ignore_eos=True, output_len=9, image_sizes=((32, 32),)
    )
    bodies = build_bodies(config, 3, seed=1)
    assert len({im.tobytes() for body in bodies for im in _images(body)}) == 1
    assert len({json.loads(b)["messages"][0]["content"][-1]["text"] for b in bodies}) > 1  # prompts differ
    body = json.loads(bodies[0])
    assert (body["ignore_eos"], body["min_tokens"], body["max_tokens"]) == (True, 9, 9)


def test_image_pool_repeats_a_few_images() -> None:
    config = BenchConfig("http://x/v1", "m", image_pool=3, image_sizes=((32, 32),))
    bodies = build_bodies(config, 24, seed=2)
    images = [im.tobytes() for body in bodies for im in _images(body)]
    assert len(images) == 24 and len(set(images)) == 3
    with pytest.raises(ValueError, match="same_image is image_pool=1"):
        BenchConfig("http://x/v1", "m", image_pool=3, same_image=True)


@pytest.mark.parametrize("separate_finish_chunk", [True, False])
async def test_token_chunks_of_either_stream_shape(separate_finish_chunk: bool) -> None:
    # OpenAI closes a stream with a finish chunk of its own (no token); vlmserve and vLLM send the finish
    # reason with the last token. Either way: 3 tokens, 2 gaps, the role chunk before them not a token.
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    ]
    for i, text in enumerate(["a", "", "c"]):
        finish = "length" if i == 2 and not separate_finish_chunk else None
        events.append({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
    if separate_finish_chunk:
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    config = BenchConfig("http://x/v1", "m")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        result = await send_request(client, config, b"{}", {})
    assert result.ok, result.error
    assert (result.prompt_tokens, result.output_tokens, len(result.itls)) == (5, 3, 2)
    assert result.ttft is not None and 0 < result.ttft <= result.latency


def test_summary_statistics() -> None:
    results = [
        RequestResult(
            ok=True,
            start=0.0,
            latency=0.1 * (i + 1) + 0.03,
            ttft=0.1 * (i + 1),
            itls=[0.01] * 3,
            prompt_tokens=10,
            output_tokens=4,
        )
        for i in range(10)
    ]
    results.append(RequestResult(ok=False, start=0.0, latency=0.01, error="HTTP 500: boom"))
    m = summarize(results, duration_s=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (10, 1, {"HTTP 500: boom": 1})
    assert m["request_throughput"] == 5.0
    assert m["output_throughput"] == 20.0 and m["total_token_throughput"] == 70.0
    assert m["ttft_ms"]["mean"] == pytest.approx(550.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(550.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(910.0)  # linear interpolation between 900 and 1000
    assert m["tpot_ms"]["p99"] == pytest.approx(10.0)
    assert m["itl_ms"]["mean"] == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--endpoint", "completions", "--images-per-request", "1"], "--images-per-request"),
        (["--image-size", "640by480"], "--image-size"),
        (["--concurrency", "4", "--request-rate", "2"], "--request-rate"),
        (["--concurrency", "0"], "--concurrency"),
        (["--image-size", "64x64", "--images-per-request", "0", "--prompt-words", "0"], "--prompt-words"),
        (["--warmup", "abc"], "--warmup: 'abc' is not an integer"),
        (["--request-rate", "fast"], "--request-rate: 'fast' is not a number"),
    ],
)
def test_flag_errors_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--model", MODEL, *argv])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_json_report_never_holds_the_api_key() -> None:
    config = BenchConfig("http://x/v1", "m", api_key="sk-very-secret")
    result = RequestResult(ok=True, start=1.0, latency=0.2, ttft=0.1, itls=[0.1], output_tokens=2)
    report = BenchReport(config, [result], duration_s=0.2, started_at="2026-01-01T00:00:00+00:00")
    text = json.dumps(report.to_json())
    assert "sk-very-secret" not in text
    assert report.to_json()["config"]["api_key"] == "<set>"


def test_load_spread_over_client_processes(server: str, tmp_path: Path) -> None:
    # 3 processes sharing a concurrency of 5 (2 + 2 + 1): every request is sent once, by one of them, and at
    # no moment are more than 5 in flight; the merged report counts them all.
    n, concurrency = 9, 5
    flags = ["--model", MODEL, "--num-requests", str(n), "--concurrency", str(concurrency)]
    flags += ["--num-clients", "3", "--output-len", "4", "--ignore-eos", "--image-size", "32x32"]
    code, report, done = run_bench(server, tmp_path / "out.json", *flags, "--warmup", "3")
    assert code == 0
    metrics = report["metrics"]
    assert (metrics["completed"], metrics["failed"], metrics["num_clients"]) == (n, 0, 3)
    assert metrics["total_output_tokens"] == n * 4
    assert 0 < metrics["client_cpu_max"] < 2
    assert_consistent(report, output_len=4)
    # Distinct images: each request had its own prompt (no two served from one another's prefix).
    assert metrics["total_cached_tokens"] < metrics["total_input_tokens"]
    spans = [(r["start_s"], r["start_s"] + r["latency_ms"] / 1e3) for r in report["requests"]]
    peak = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert 1 < peak <= concurrency
    assert re.search(r"client processes \(busiest's CPU\) +3 \(\d+% of a core\)", done.stdout)


def test_more_client_processes_than_concurrency_is_refused() -> None:
    cmd = [
        sys.executable,
        "-m",
        "vlmserve",
        "bench",
        "--model",
        "m",
        "--concurrency",
        "2",
        "--num-clients",
        "3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--num-clients (3) exceeds --concurrency (2)" in done.stderr
