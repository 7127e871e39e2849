"""Structured outputs and tool calling through `vlmserve serve` and the official openai client, with random
weights (the constraint does the work): response_format json_schema, vLLM's extra fields, tools with
tool_choice required / named / auto, streaming and not, a second turn carrying the tool result, and bad
inputs answered 400 in OpenAI's error shape while the server keeps serving. Also the Hermes parser on its own.

One server process for the module, started with --enable-auto-tool-choice --tool-call-parser hermes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import served
from vlmserve.api.tools import ToolCallStream, parse_tool_calls

MODEL = "tiny"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}

ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["invoice", "receipt", "form"]},
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["qty"],
                "additionalProperties": False,
            },
            "maxItems": 2,
        },
    },
    "required": ["label", "total", "lines"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with served(
        tiny_checkpoint,
        log,
        "--model-id", MODEL,
        "--max-model-len", "2048",
        "--num-kv-blocks", "300",
        "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes",
        "--log-level", "warning",
    ) as url:  # fmt: skip
        yield url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="FAKE_KEY", max_retries=0)


def _check_calls(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    for seed, temperature in [(0, 0.0), (1, 0.8), (2, 1.3)]:
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Read the document."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "doc", "schema": ITEM_SCHEMA, "strict": True},
            },
            max_tokens=200,
            seed=seed,
            temperature=temperature,
            n=2,
        )
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), ITEM_SCHEMA)


def test_vllm_fields_and_completions(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick."}],
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
    )
    assert out.choices[0].message.content in ("alpha", "beta")
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Code?"}],
        max_tokens=20,
        extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"},
    )
    assert len(out.choices[0].message.content or "") == 6
    text = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=20, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert text.choices[0].text in ("yes", "no")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=200,
        stream=True,
        extra_body={"guided_json": ITEM_SCHEMA},
    )
    chunks = list(stream)
    body = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(body), ITEM_SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_cut_by_max_tokens_says_length(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=4,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "doc", "schema": ITEM_SCHEMA}},
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and (text.startswith('{"label":') or '{"label":'.startswith(text)), text


def test_tool_choice_required_gives_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=120,
            seed=seed,
            temperature=1.0,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls or [])
        assert len(choice.message.tool_calls or []) == 1


def test_named_tool_choice_streamed_then_second_turn(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Oslo, three days?"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    first_with_call = None
    finish = None
    for i, chunk in enumerate(stream):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            if call.id:
                assert not entry["id"], "the id comes once"
                entry["id"] = call.id
            if call.function and call.function.name:
                assert not entry["arguments"], "the name comes before the arguments"
                entry["name"] = call.function.name
            if call.function and call.function.arguments:
                entry["arguments"] += call.function.arguments
            first_with_call = i if first_with_call is None else first_with_call
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"  # a named choice, as OpenAI answers it
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS["get_weather"])

    # Second turn: the assistant's call and the tool's result go back; the model answers (auto: may call).
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0]["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": calls[0]["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temperature": 7, "sky": "grey"}'},
    ]
    short = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=1, tools=[WEATHER])
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt: it is longer than the first turn's by their tokens.
    assert out.usage is not None and short.usage is not None
    assert out.usage.prompt_tokens > short.usage.prompt_tokens + 20


def test_required_streaming_and_parallel(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Time and weather?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=400,
        seed=3,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            if call.function and call.function.name:
                entry["name"] = call.function.name
            if call.function and call.function.arguments:
                entry["arguments"] += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert calls and list(calls) == list(range(len(calls)))
    if finish == "tool_calls":
        for entry in calls.values():
            jsonschema.validate(json.loads(entry["arguments"]), PARAMETERS[entry["name"]])
    else:  # random weights may keep adding calls until max_tokens
        assert finish == "length"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex"),
        ({"extra_body": {"guided_grammar": "start: x\nx: ("}}, "guided_grammar"),
        ({"extra_body": {"guided_json": {"type": "string", "format": "uri-reference"}}}, "guided_json"),
        ({"extra_body": {"guided_json": {"type": "array", "minItems": 4, "maxItems": 2}}}, "guided_json"),
        # Beyond the engine's size limit (engine/structured.py MAX_SPEC_CHARS: 256 KiB of schema text).
        ({"extra_body": {"guided_json": {"enum": ["x" * 100] * 3000}}}, "guided_json"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
    ],
)
def test_bad_inputs_are_400_and_the_server_keeps_serving(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **fields
        )
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"
    assert body["message"]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------ the parser alone


def test_parse_tool_calls() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", "days": 2}}\n'
        "</tool_call>"
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1].function.arguments) == {"city": "Oslo", "unit": "celsius", "days": 2}
    assert len({c.id for c in calls}) == 2
    content, calls = parse_tool_calls(text, parallel=False)
    assert [c.function.name for c in calls] == ["get_time"]
    # Not JSON: stays content, no call.
    assert parse_tool_calls("<tool_call>\n{oops\n</tool_call>") == ("<tool_call>\n{oops\n</tool_call>", [])
    assert parse_tool_calls("plain") == ("plain", [])


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_stream_parser_matches_whole_parse(piece: int) -> None:
    text = (
        'Sure <tool_c is not a call. <tool_call>\n{"name": "get_weather", "arguments": {"city": "A}b", '
        '"nested": {"k": [1, 2]}}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    parser = ToolCallStream()
    content = ""
    calls: dict[int, dict[str, str]] = {}
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    for i, chunk in enumerate(pieces):
        c, deltas = parser.feed(chunk, final=i == len(pieces) - 1)
        content += c
        for d in deltas:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            if d.function and d.function.name:
                assert entry["arguments"] == ""
                entry["name"] = d.function.name
            if d.function and d.function.arguments:
                entry["arguments"] += d.function.arguments
    whole_content, whole_calls = parse_tool_calls(text)
    assert content.strip() == whole_content
    assert [calls[i]["name"] for i in sorted(calls)] == [c.function.name for c in whole_calls]
    for i, call in enumerate(whole_calls):
        assert json.loads(calls[i]["arguments"]) == json.loads(call.function.arguments)


def test_auto_tool_choice_streams_the_same_content_as_the_whole_answer(client: openai.OpenAI) -> None:
    """With tools parsed (auto), text that holds no call streams through unchanged."""
    messages: Any = [{"role": "user", "content": "Tell me about the weather <tool_c in Oslo."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=24, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=24, temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        whole.choices[0].message.content or ""
    )
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# ------------------------------------------------------------------------------------------ the chat template


def test_tools_template_renders_hermes_blocks_and_matches_the_vl_template_without_tools(
    tiny_checkpoint: Path,
) -> None:
    from vlmserve.models.processor import Qwen2_5_VLProcessor, compile_chat_template
    from vlmserve.models.tool_template import QWEN2_5_VL_TOOLS_CHAT_TEMPLATE

    processor = Qwen2_5_VLProcessor.from_pretrained(tiny_checkpoint)
    tools_template = compile_chat_template(QWEN2_5_VL_TOOLS_CHAT_TEMPLATE)
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
        ],
    ]
    for conversation in conversations:  # no tools: exactly what the checkpoint's own template writes
        expected = processor.apply_chat_template(conversation)
        assert tools_template.render(messages=conversation, add_generation_prompt=True) == expected

    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"zone": "UTC"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c2", "content": "13:00"},
    ]
    # apply_chat_template stays HF's rendering (the released template drops tools); the server renders
    # conversations with tools through apply_tool_chat_template.
    assert "<tools>" not in processor.apply_chat_template(conversation, tools=[TIME])
    text = processor.apply_tool_chat_template(conversation, tools=[TIME])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n")
    assert "<tools>\n" + json.dumps(TIME, ensure_ascii=False) + "\n</tools>" in text
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12:00\n</tool_response>\n<tool_response>\n13:00\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
