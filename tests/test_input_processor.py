"""The input processor is the one path from a conversation to an EngineRequest: the HTTP server's
ModelServer.process_chat and the offline LLM build the same prompt tokens, image placeholders and positions
from the same OpenAI messages; how images travel (pixels or patches) follows the engine's config; the
API's errors name the field."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import random_image
from vlmserve.api.errors import InvalidRequestError
from vlmserve.api.protocol import ChatCompletionRequest
from vlmserve.api.serving import ModelServer
from vlmserve.config import EngineArgs, EngineConfig
from vlmserve.engine.input_processor import InputError, InputProcessor
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import build_engine_config
from vlmserve.media import MediaConfig, MediaLoader
from vlmserve.models.processor import Qwen2_5_VLProcessor


def _data_url(width: int, height: int, seed: int) -> str:
    buf = io.BytesIO()
    random_image(width, height, seed=seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CONVERSATION: list[dict[str, Any]] = [
    {"role": "developer", "content": "Answer briefly."},
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": _data_url(70, 50, 1)}},
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": _data_url(40, 90, 2), "detail": "low"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "look", "arguments": '{"where": "left"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "a square"},
]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path) -> tuple[Qwen2_5_VLProcessor, EngineConfig]:
    config = build_engine_config(EngineArgs(model=str(tiny_checkpoint), device="cpu", engine_process=False))
    return Qwen2_5_VLProcessor.from_pretrained(config.model_path), config


def _server(processor: Qwen2_5_VLProcessor, config: EngineConfig) -> ModelServer:
    # Prompt building needs no engine; nothing here starts one.
    return ModelServer(None, processor, config, MediaLoader(MediaConfig()))  # type: ignore[arg-type]


def test_server_and_llm_build_the_same_prompt(setup: tuple[Qwen2_5_VLProcessor, EngineConfig]) -> None:
    processor, config = setup
    served = asyncio.run(
        _server(processor, config).process_chat(ChatCompletionRequest(messages=CONVERSATION))
    )
    offline = InputProcessor(processor, config).chat(CONVERSATION, SamplingParams(max_tokens=4))
    assert served.token_ids == offline.prompt_token_ids
    assert [(f.mm_hash, f.offset, f.length) for f in served.images] == [
        (f.mm_hash, f.offset, f.length) for f in offline.images
    ]
    assert torch.equal(served.mrope_positions, offline.mrope_positions)
    # The template saw OpenAI's spellings normalised once: developer -> system, JSON arguments -> a mapping.
    text = processor.decode(served.token_ids, skip_special_tokens=False)
    assert "<|im_start|>system\nAnswer briefly." in text and '"where": "left"' in text
    # detail=low capped the second image's tokens.
    assert served.images[1].length <= 64


@pytest.mark.parametrize(
    ("device", "engine_process", "as_pixels"), [("cpu", False, False), ("cpu", True, True)]
)
def test_image_transfer_is_the_configs_decision(
    setup: tuple[Qwen2_5_VLProcessor, EngineConfig], device: str, engine_process: bool, as_pixels: bool
) -> None:
    processor, config = setup
    config = dataclasses.replace(config, device=device, engine_process=engine_process)
    assert config.images_as_pixels is as_pixels
    inputs = InputProcessor(processor, config)
    text = inputs.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    data = inputs.process(text, [random_image(70, 50)]).images[0].data
    assert data.as_pixels is as_pixels
    if as_pixels:
        assert data.values.dtype == torch.uint8 and data.values.shape[-1] == 3
    else:
        assert data.values.dtype == torch.float32 and data.values.dim() == 2
    grid = data.grid_thw
    assert data.values.shape[0] == (grid[1] * 14 if as_pixels else grid[0] * grid[1] * grid[2])


def test_errors_name_the_field(setup: tuple[Qwen2_5_VLProcessor, EngineConfig]) -> None:
    processor, config = setup
    inputs = InputProcessor(processor, dataclasses.replace(config, max_model_len=32))
    with pytest.raises(InputError) as info:
        inputs.check_prompt_length(32, "messages")
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"
    inputs.check_prompt_length(31, "messages")  # one token of room is enough
    wide = [{"role": "user", "content": [{"type": "image", "image": random_image(600, 2)}]}]
    with pytest.raises(InputError) as info:
        inputs.chat(wide, SamplingParams())
    assert info.value.param == "messages[0].content[0].image" and info.value.code == "invalid_image"
    server = _server(processor, config)
    body = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(600, 2, 3)}}]}
        ]
    )
    with pytest.raises(InvalidRequestError) as api_error:
        asyncio.run(server.process_chat(body))
    assert api_error.value.param == "messages[0].content[0].image_url"


def test_offline_images_load_from_every_local_form(
    setup: tuple[Qwen2_5_VLProcessor, EngineConfig], tmp_path: Path
) -> None:
    processor, config = setup
    inputs = InputProcessor(processor, config)
    image = random_image(70, 50, seed=5)
    path = tmp_path / "cat.png"
    image.save(path)
    forms: list[dict[str, Any]] = [
        {"type": "image", "image": image},
        {"type": "image", "image": str(path)},
        {"type": "image_url", "image_url": {"url": f"file://{path}"}},
        {"type": "image_url", "image_url": _data_url(70, 50, 5)},
    ]
    hashes = set()
    for part in forms:
        request = inputs.chat(
            [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], SamplingParams()
        )
        hashes.add(request.images[0].mm_hash)
    assert len(hashes) == 1
