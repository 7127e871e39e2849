"""The playground page in a real headless browser (Debian's Chromium driven by Playwright): a person chooses
or pastes a generated image, asks the demo model about it, and the right answer streams into the page.

Skipped where Playwright or Chromium is missing (`pip install playwright`; `apt-get install chromium`; the
test uses the system browser, never a downloaded one). The page served with --no-playground is a 404:
tests/test_surface_e2e.py.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import served
from tests.test_demo_model import generated_case

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = (
    os.environ.get("VLMSERVE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
if CHROMIUM is None:
    pytest.skip("no Chromium installed (apt-get install chromium)", allow_module_level=True)

# The flags that keep Chromium off the network: a closed machine refuses its background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with served("demo", log, "--log-level", "warning") as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{base_url}/")
            yield page
        finally:
            browser.close()


def api_answer(base_url: str, png: bytes, question: str) -> str:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 128, "temperature": 0}
    return str(
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
            "content"
        ]
    )


def ask(page: Any, question: str) -> tuple[str, int]:
    """Type the question, press Ask, wait until the answer is complete; the answer and how many times its
    text changed while it streamed."""
    page.evaluate(
        """() => {
            window.answerUpdates = 0;
            new MutationObserver((records) => { window.answerUpdates += records.length; }).observe(
                document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=60_000)
    return page.inner_text("#answer"), page.evaluate("window.answerUpdates")


def test_choose_an_image_ask_and_see_the_answer_stream(page: Any, base_url: str) -> None:
    assert page.title() == "vlmserve playground"
    page.wait_for_function("document.getElementById('model').options.length > 0")
    assert page.eval_on_selector("#model", "s => s.value") == "demo"
    case = generated_case(11, "colour", size=(224, 224))
    png = case.png_bytes()
    page.set_input_files("#file", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": png}])
    page.wait_for_selector("#drop.has-image")
    answer, updates = ask(page, case.question)
    assert case.is_right(answer), (case.question, answer, case.expected)
    assert answer == api_answer(base_url, png, case.question)  # the page sends what a client sends
    assert updates >= 2  # streamed in pieces, not one block at the end
    assert "prompt tokens" in page.inner_text("#status")


def test_paste_an_image(page: Any, base_url: str) -> None:
    case = generated_case(12, "shape", size=(200, 200))
    png = case.png_bytes()
    page.click("#clear-image")
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
        }""",
        base64.b64encode(png).decode(),
    )
    page.wait_for_selector("#drop.has-image")
    answer, _ = ask(page, case.question)
    assert case.is_right(answer), (case.question, answer, case.expected)


def test_page_is_packaged(base_url: str) -> None:
    response = httpx.get(f"{base_url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    # Nothing is loaded from elsewhere: the machine may be offline.
    assert "http://" not in response.text and "https://" not in response.text
    assert Path(__file__).parent.parent.joinpath("src/vlmserve/api/static/playground.html").is_file()
