"""The API surface beyond chat and completions, through a real `vlmserve serve` process: /tokenize and
/detokenize (vLLM's shapes, images counted), usage.prompt_tokens_details with image tokens, image_url.detail
as a pixel budget, OpenAI's parameter ranges, and the Responses API through the official openai client
(streamed and not), with the bad inputs each one must refuse.

One server for the module, started with the playground turned off (its page must then be a 404).
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import random_image, served

MODEL = "tiny"
DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana" / "vlmserve_dashboard.json"
NO_EOS = {"ignore_eos": True}


def data_url(width: int, height: int, seed: int = 0) -> str:
    buf = io.BytesIO()
    random_image(width, height, seed=seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, detail: str | None = None, text: str = "Describe.") -> dict[str, Any]:
    image: dict[str, Any] = {"url": url}
    if detail is not None:
        image["detail"] = detail
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": text}],
    }


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("surface") / "server.log"
    with served(
        tiny_checkpoint,
        log,
        "--model-id", MODEL,
        "--max-model-len", "2048",
        "--num-kv-blocks", "300",
        "--no-playground",
        "--log-level", "warning",
    ) as url:  # fmt: skip
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="FAKE_KEY", max_retries=0)


def post(base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=60)


# ------------------------------------------------------------------------------------------ tokenize


def test_tokenize_chat_with_an_image_counts_what_chat_completions_bills(
    base_url: str, client: openai.OpenAI
) -> None:
    url = data_url(100, 80)
    message = image_message(url)
    tokenized = post(base_url, "/tokenize", {"model": MODEL, "messages": [message]}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 2048
    # 100x80 resizes to 112x84 (multiples of 28): 4x3 merged patches.
    assert tokenized["image_token_counts"] == [12] and tokenized["image_tokens"] == 12
    chat = client.chat.completions.create(model=MODEL, messages=[message], max_tokens=2, extra_body=NO_EOS)
    assert chat.usage is not None and chat.usage.prompt_tokens == tokenized["count"]
    details = chat.usage.prompt_tokens_details
    assert details is not None and details.image_tokens == 12
    assert details.text_tokens == tokenized["count"] - 12
    # The same prompt again: the prefix cache holds it, image included (all but the last partial block).
    again = client.chat.completions.create(model=MODEL, messages=[message], max_tokens=2, extra_body=NO_EOS)
    again_details = again.usage.prompt_tokens_details  # type: ignore[union-attr]
    assert again_details is not None and again_details.cached_tokens > 12
    assert again_details.image_tokens == 12
    assert again_details.model_extra["cached_image_tokens"] == 12  # type: ignore[index]


def test_tokenize_text_roundtrips_through_detokenize(base_url: str) -> None:
    tokenized = post(base_url, "/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert tokenized["image_tokens"] == 0 and len(tokenized["token_strs"]) == tokenized["count"] > 0
    assert post(base_url, "/detokenize", {"tokens": tokenized["tokens"]}).json() == {"prompt": "hello world"}


def test_tokenize_bad_input_is_400(base_url: str) -> None:
    both = post(base_url, "/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    assert both.status_code == 400
    bad_id = post(base_url, "/detokenize", {"tokens": [1, 10**9]})
    assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "tokens"
    unknown = post(base_url, "/tokenize", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------------------------ detail, ranges


def test_image_detail_is_a_pixel_budget(base_url: str) -> None:
    url = data_url(600, 600)

    def image_tokens(detail: str | None) -> int:
        body = {"messages": [image_message(url, detail)], "mm_processor_kwargs": {"max_pixels": 80_000}}
        response = post(base_url, "/tokenize", body)
        assert response.status_code == 200, response.text
        return int(response.json()["image_tokens"])

    auto, low, high = image_tokens(None), image_tokens("low"), image_tokens("high")
    assert image_tokens("auto") == auto
    # low: at most 64 tokens; auto: the request's max_pixels (80k pixels, 102 tokens of 28x28 pixels); high:
    # the server's max_pixels (the tiny checkpoint's 100352, 128 tokens), not the request's.
    assert low <= 64 < auto <= 102 < high <= 128
    bad = post(base_url, "/tokenize", {"messages": [image_message(url, "medium")]})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages[0].content[0].image_url.detail"


def test_openai_ranges_are_enforced(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, temperature=2.5)  # type: ignore[arg-type]
    assert e.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", top_p=1.5)
    # vLLM's extensions keep their own ranges: top_k and repetition_penalty beyond OpenAI's fields work.
    ok = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        temperature=2.0,
        max_tokens=2,
        extra_body={"top_k": 5, "repetition_penalty": 1.5, "min_p": 0.1},
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------ responses


def test_responses_create_with_an_image(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": data_url(64, 48), "detail": "auto"},
                    {"type": "input_text", "text": "What is this?"},
                ],
            }
        ],
        max_output_tokens=16,
        temperature=0,
        extra_body=NO_EOS,
    )
    assert response.object == "response" and response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 16
    assert response.usage.input_tokens_details.model_extra["image_tokens"] > 0  # type: ignore[index]
    # The same answer as chat/completions gives for the same prompt, greedy.
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(64, 48)}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
        ],
        max_tokens=16,
        temperature=0,
        extra_body=NO_EOS,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]


def test_responses_stream_has_the_typed_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL, input="Say something.", max_output_tokens=16, stream=True, extra_body=NO_EOS
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "".join(deltas) == events[-4].text  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == 16
    # A short answer that ends on its own completes.
    done = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=16, stream=True))
    assert done[-1].type in ("response.completed", "response.incomplete")


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_json_schema_always_parses(client: openai.OpenAI, stream: bool) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "shape": {"enum": ["circle", "square"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["shape", "count"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    kwargs: dict[str, Any] = dict(
        model=MODEL, input="Describe it.", max_output_tokens=64, temperature=1.0, text={"format": fmt}
    )
    if stream:
        events = list(client.responses.create(stream=True, **kwargs))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed"
    else:
        text = client.responses.create(**kwargs).output_text
    jsonschema.validate(json.loads(text), schema)  # random weights: the constraint does the work


def test_responses_bad_input_is_400(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"max_output_tokens": 4}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
            "text.format.schema",
        ),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="hi", **extra)
        assert e.value.body["param"] == param, e.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL,
            instructions="x",
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/y.png"}]}],
        )
    assert e.value.body["param"] == "input[0].content[0].image_url"  # type: ignore[index]


# ------------------------------------------------------------------------------------------ playground off


def test_playground_off_is_404(base_url: str) -> None:
    response = httpx.get(f"{base_url}/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"


# ------------------------------------------------------------------------------------------ run-batch --url


def test_run_batch_against_a_running_server(base_url: str, tmp_path: Path) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 16, **NO_EOS}
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses", "body": body} for i in range(3)]
    lines.append(
        {"custom_id": "other-model", "method": "POST", "url": "/v1/responses", "body": {"model": "x"}}
    )
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cmd = [sys.executable, "-m", "vlmserve", "run-batch", "-i", str(inp), "-o", str(out), "--url", base_url]
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "3 succeeded, 1 failed" in done.stderr, done.stderr
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(records[f"r{i}"]["response"]["body"]["usage"]["output_tokens"] == 16 for i in range(3))
    assert records["other-model"]["response"]["status_code"] in (400, 404)


# ------------------------------------------------------------------------------------------ Grafana dashboard


def test_grafana_dashboard_reads_only_exported_series(base_url: str, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    exported = {
        line.split("{")[0].split(" ")[0] for line in httpx.get(f"{base_url}/metrics").text.splitlines()
    }
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"vllm:[a-z0-9_]+", expr)}
    assert len(used) >= 10 and used <= exported, used - exported
