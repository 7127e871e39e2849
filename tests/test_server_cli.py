"""The `vlmserve serve` command line: flag errors exit 2 naming the flag, an unloadable model exits 1, and a
running server (a real process) enforces --api-key, never logs it, and on SIGTERM finishes the streams in
flight before it exits."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_vlmserve, stop_process
from vlmserve import __version__, cli


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["--limit-mm-per-prompt", "{image: 3"], "--limit-mm-per-prompt"),
        (["--limit-mm-per-prompt", '{"audio": 1}'], "--limit-mm-per-prompt"),
        (["--mm-processor-kwargs", '{"min_pixels": 10, "max_pixels": 5}'], "--mm-processor-kwargs"),
        (["--dtype", "int3"], "--dtype"),
        (["--max-model-len", "many"], "--max-model-len"),
        (["--port", "70000"], "--port"),
        (["--allowed-local-media-path", "/no/such/dir"], "--allowed-local-media-path"),
        (["--allowed-media-domains", "http://images.example.com/"], "--allowed-media-domains"),
        (["demo", "--model", "other"], "--model"),
    ],
)
def test_flag_errors_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", *argv])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


def test_missing_model_exits_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "/no/such/checkpoint"]) == 1
    err = capsys.readouterr().err
    assert "/no/such/checkpoint" in err and "Traceback" not in err


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_engine_flags_follow_engine_args(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in (
        "--model-id",
        "--served-model-name",
        "--max-num-batched-tokens",
        "--no-enable-prefix-caching",
    ):
        assert flag in help_text


def test_api_keys_from_flags_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli._api_keys(["a,b", " c "]) == ["a", "b", "c"]
    monkeypatch.setattr(cli.envs, "VLMSERVE_API_KEY", "k1,k2")
    assert cli._api_keys(None) == ["k1", "k2"]
    monkeypatch.setattr(cli.envs, "VLMSERVE_API_KEY", None)
    assert cli._api_keys(None) == []


def test_python_dash_m_vlmserve() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vlmserve", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_api_key_and_sigterm_drains_the_stream_in_flight(tiny_checkpoint: Path, tmp_path: Path) -> None:
    key = "sk-test-d0n7-l0g-m3"
    log = tmp_path / "server.log"
    process, base_url = start_vlmserve(
        tiny_checkpoint,
        log,
        "--model-id", "tiny",
        "--max-model-len", "2048",
        "--num-kv-blocks", "300",
        "--api-key", key,
        "--timeout-graceful-shutdown", "60",
        "--log-level", "info",
    )  # fmt: skip
    try:
        assert httpx.get(f"{base_url}/v1/models").status_code == 401
        assert (
            httpx.get(f"{base_url}/v1/models", headers={"Authorization": "Bearer FAKE_KEY"}).status_code
            == 401
        )
        assert httpx.get(f"{base_url}/health").status_code == 200
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "A long story, please."}],
            "max_tokens": 600,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {key}"}
        events_after_sigterm: list[str] = []
        with httpx.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            process.send_signal(signal.SIGTERM)
            events_after_sigterm = [line for line in lines if line.startswith("data: ")]
        # The stream that was running when SIGTERM arrived ran to its end.
        assert events_after_sigterm[-1] == "data: [DONE]"
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events_after_sigterm[:-1]]
        assert finish[-1] == "length"
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        stop_process(process)
    output = log.read_text()
    assert "shutting down the engine of tiny" in output
    # The front froze what it held after startup (memory.py): hundreds of thousands of objects.
    frozen = re.search(r"froze (\d+) startup objects", output)
    assert frozen and int(frozen.group(1)) > 10_000, output
    assert key not in output
