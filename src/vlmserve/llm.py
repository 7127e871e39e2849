"""Offline use of the engine from Python, and the one place that turns `EngineArgs` into an `EngineConfig`.

from vlmserve import LLM, SamplingParams
llm = LLM("Qwen/Qwen2.5-VL-7B-Instruct")
out = llm.chat([{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "file:///path/cat.jpg"}},
    {"type": "text", "text": "What is in this image?"}]}], SamplingParams(max_tokens=64, temperature=0))
print(out[0].text)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlmserve.config import EngineArgs
from vlmserve.engine.build_config import build_engine_config
from vlmserve.engine.core import EngineCore
from vlmserve.engine.input_processor import InputProcessor
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta, TokenLogprob
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.processor import Qwen2_5_VLProcessor


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text


class LLM:
    """Run the engine in this process, synchronously: batch many prompts, return when all are done."""

    def __init__(self, model: str = "demo", **engine_kwargs: Any) -> None:
        # The engine runs in this process, whatever engine_process says (that is how a server runs it).
        config = build_engine_config(EngineArgs(model=model, **engine_kwargs))
        self.config = dataclasses.replace(config, engine_process=False)
        self.processor = Qwen2_5_VLProcessor.from_pretrained(self.config.model_path)
        self.inputs = InputProcessor(self.processor, self.config)
        self.engine = EngineCore(self.config, self.processor)

    def make_request(
        self, prompt: str, images: list[Image.Image], params: SamplingParams, request_id: str | None = None
    ) -> EngineRequest:
        return self.inputs.make_request(self.inputs.process(prompt, images), params, request_id)

    def generate(
        self,
        prompts: list[str | tuple[str, list[Image.Image]]] | str,
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Prompts are raw text (already chat-formatted if needed), optionally with their images."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        requests = []
        for p in prompts:
            text, images = (p, []) if isinstance(p, str) else p
            requests.append(self.make_request(text, list(images), params))
        return self.run(requests)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation, or a list of them). Images as image_url parts with a
        file path / file:// URL or a data: URL, or as PIL images in {"type": "image", "image": img}."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = sampling_params or SamplingParams()
        return self.run([self.inputs.chat(conv, params) for conv in conversations])  # type: ignore[arg-type]

    def run(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        results = {
            r.request_id: RequestOutput(
                r.request_id,
                r.prompt_token_ids,
                [CompletionOutput(i, "", [], None, None, None) for i in range(r.sampling_params.n)],
            )
            for r in requests
        }
        for r in requests:
            self.engine.add_request(r)
        while self.engine.has_unfinished_requests():
            for d in self.engine.step():
                self._accumulate(results[d.request_id], d)
        return [results[r.request_id] for r in requests]

    @staticmethod
    def _accumulate(res: RequestOutput, d: CompletionDelta) -> None:
        out = res.outputs[d.index]
        out.text += d.text
        out.token_ids += d.token_ids
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + d.logprobs
        if d.finished:
            out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason
            res.num_cached_tokens = d.num_cached_tokens
            if d.error:
                raise RuntimeError(d.error)
