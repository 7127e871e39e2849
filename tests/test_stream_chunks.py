"""The per-token fast path of chat streams writes exactly the bytes of the general path (pydantic chunk ->
chunk_json), for any text."""

from __future__ import annotations

import pytest

from vlmserve.api.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    ContentChunks,
    DeltaMessage,
    chunk_json,
)

TEXTS = ["", "hello", ' "quoted" \\ back', "line\nbreak\ttab", "日本語 ✓ 🙂", "\u2028\u0000\x7f", "\ue000"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_content_chunks_equal_the_general_path(include_usage: bool) -> None:
    def make(index: int, text: str) -> ChatCompletionChunk:
        choice = ChatStreamChoice(index=index, delta=DeltaMessage(content=text))
        return ChatCompletionChunk(id="chatcmpl-1", created=123, model="m", choices=[choice])

    fast = ContentChunks(make, include_usage)
    for index in (0, 2):
        for text in TEXTS:
            assert fast.json(index, text) == chunk_json(make(index, text), include_usage=include_usage)
