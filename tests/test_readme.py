"""The README's examples, run as a user would, against `make serve`'s server (`vlmserve serve` with no model:
the shipped demo model); each example's output must be the one the README shows after it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_vlmserve, stop_process

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(bash|python|text)\n(.*?)```", README.read_text(), flags=re.S)


def _block(lang: str, marker: str) -> str:
    matches = [code for kind, code in BLOCKS if kind == lang and marker in code]
    assert len(matches) == 1, f"expected one {lang} block containing {marker!r} in README.md"
    return matches[0]


def _shown_output(lang: str, marker: str) -> str:
    """The text block that follows the example: what the README says it prints."""
    i = next(i for i, (kind, code) in enumerate(BLOCKS) if kind == lang and marker in code)
    assert i + 1 < len(BLOCKS) and BLOCKS[i + 1][0] == "text", f"no output shown after the {marker!r} example"
    return BLOCKS[i + 1][1].strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("readme") / "server.log"
    # What `make serve` runs: no model named, so the demo model.
    process, base_url = start_vlmserve(None, log)
    try:
        yield base_url
    finally:
        stop_process(process)


def test_readme_curl_example(server: str) -> None:
    code = _block("bash", "curl -s").replace("http://127.0.0.1:8000", server)
    # As after `source .venv/bin/activate`: this interpreter's python3 first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env
    )
    body = json.loads(out.stdout)
    assert "error" not in body, body
    assert body["object"] == "chat.completion"
    assert body["model"] == "demo"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == _shown_output("bash", "curl -s")


def test_readme_openai_client_example(server: str) -> None:
    code = _block("python", "OpenAI(").replace("http://127.0.0.1:8000", server)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _shown_output("python", "OpenAI(")


def test_readme_python_llm_example() -> None:
    code = _block("python", "LLM(")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _shown_output("python", "LLM(")


def test_readme_commands_match_ci() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in _block("bash", "make test")
    assert "make serve" in _block("bash", "make serve")


def test_readme_responses_example(server: str) -> None:
    code = _block("python", "responses.create(").replace("http://127.0.0.1:8000", server)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _shown_output("python", "responses.create(")


def test_readme_run_batch_example(tmp_path: Path) -> None:
    code = _block("bash", "vlmserve run-batch")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == ["q1", "q2"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in records)
