"""The one path from a prompt to an `EngineRequest`, shared by the HTTP server (api/serving.py), the Ray
replicas (which run the server's `ModelServer`) and the offline `LLM` (llm.py).

    chat messages -> image parts found -> images loaded (the caller's loader: async MediaLoader for the
    server, the trusted local loader for LLM) -> chat template rendered (the tools template when the
    conversation uses tools) -> tokenised, each image resized and its placeholder expanded -> M-RoPE
    positions -> prompt length checked -> EngineRequest

Owns: where a conversation's images are and what pixel budget each gets (limit_mm_per_prompt, the server's
pixel bounds, an image part's `detail`), the template choice, whether images reach the engine as uint8
pixels or as patches (`EngineConfig.images_as_pixels`, decided once in the config), and the prompt-length
rule (a prompt must leave room for one output token).

Does not know: HTTP or API error types (it raises `InputError`, a ValueError naming the field, which
api/ turns into a 400), how images are fetched (media/), the sampling fields of a request body, or how the
engine runs the request. The tokenizer, template sandbox and image arithmetic are models/processor.py's.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from PIL import Image

from vlmserve.config import EngineConfig
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.media.local import load_local_image
from vlmserve.models.processor import ProcessedPrompt, Qwen2_5_VLProcessor, check_aspect_ratio, uses_tools

# image_url.detail = "low": at most this many image tokens per image (OpenAI's low detail is a fixed small
# budget too); a 28x28-pixel merged patch is one token, so 64 tokens is about 220x220 pixels.
LOW_DETAIL_IMAGE_TOKENS = 64

PixelBounds = tuple[int | None, int | None]  # (min_pixels, max_pixels); None: the checkpoint's


class InputError(ValueError):
    """A prompt that cannot become an engine request; `param` names the request field to fix."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ImagePart:
    """One image of a conversation, in message order."""

    source: Any  # a URL / path / data: URL, or (offline callers) a decoded PIL image
    param: str  # where it sits, for errors: messages[1].content[0].image_url
    detail: str | None = None  # image_url.detail: "low" / "high" / "auto"


def image_parts(messages: Sequence[Mapping[str, Any]]) -> list[ImagePart]:
    """The image parts of OpenAI / HF chat messages: {"type": "image_url", "image_url": {"url", "detail"}
    or a URL}, or {"type": "image", "image": <PIL image or path>} (HF's form, offline callers)."""
    parts: list[ImagePart] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "image_url":
                info = part.get("image_url")
                if isinstance(info, Mapping):
                    parts.append(
                        ImagePart(
                            info.get("url"), f"messages[{i}].content[{j}].image_url", info.get("detail")
                        )
                    )
                else:
                    parts.append(ImagePart(info, f"messages[{i}].content[{j}].image_url"))
            elif kind == "image":
                source = part.get("image", part.get("url"))
                parts.append(ImagePart(source, f"messages[{i}].content[{j}].image"))
    return parts


class InputProcessor:
    """Prompts of one model -> EngineRequests. Thread-safe: its CPU work runs in worker threads."""

    def __init__(self, processor: Qwen2_5_VLProcessor, config: EngineConfig) -> None:
        self.processor = processor
        self.config = config
        self.max_model_len = config.max_model_len
        self.images_as_pixels = config.images_as_pixels
        self.resize_on_device = config.resize_images_on_device
        self.image_limit: int | None = config.limit_mm_per_prompt.get("image")
        # The operator's image bounds: mm_processor_kwargs, else the checkpoint's. A request may ask for
        # anything inside them, never more pixels (= more tokens, more compute) than the operator set.
        server_kwargs = config.mm_processor_kwargs
        self.bounds_set = bool(server_kwargs)
        self.min_pixels = int(server_kwargs.get("min_pixels", processor.min_pixels))
        self.max_pixels = int(server_kwargs.get("max_pixels", processor.max_pixels))
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"mm_processor_kwargs gives min_pixels={self.min_pixels} above max_pixels={self.max_pixels} "
                f"(the checkpoint's unless set); set both so that min_pixels <= max_pixels"
            )
        self._ids = itertools.count()

    # --- images -------------------------------------------------------------------------------------------

    @property
    def merged_patch(self) -> int:
        """The side in pixels of one image token (patch_size * merge_size)."""
        return self.processor.patch_size * self.processor.spatial_merge_size

    def default_bounds(self) -> PixelBounds:
        """The pixel bounds of a request that asks for none: the operator's, else the checkpoint's."""
        return (self.min_pixels, self.max_pixels) if self.bounds_set else (None, None)

    def check_image_count(self, parts: Sequence[ImagePart]) -> None:
        if self.image_limit is not None and len(parts) > self.image_limit:
            raise InputError(
                f"This request has {len(parts)} images, more than this server's limit_mm_per_prompt "
                f"{{'image': {self.image_limit}}}; send at most {self.image_limit} images per request "
                "(the operator sets the limit with --limit-mm-per-prompt).",
                param="messages",
                code="limit_mm_per_prompt",
            )

    def image_bounds(self, parts: Sequence[ImagePart], bounds: PixelBounds) -> list[PixelBounds] | None:
        """Each image's (min_pixels, max_pixels) when a part sets `detail` (else None: all use `bounds`):
        `low` at most LOW_DETAIL_IMAGE_TOKENS tokens, `high` the operator's whole range, `auto` `bounds`."""
        if not any(part.detail in ("low", "high") for part in parts):
            return None
        out: list[PixelBounds] = []
        for part in parts:
            if part.detail == "high":
                out.append((self.min_pixels, self.max_pixels))
            elif part.detail == "low":
                hi = min(self.max_pixels, LOW_DETAIL_IMAGE_TOKENS * self.merged_patch**2)
                out.append((min(self.min_pixels, hi), hi))
            else:
                out.append(bounds)
        return out

    @staticmethod
    def check_images(parts: Sequence[ImagePart], images: Sequence[Image.Image]) -> None:
        """Refuse an image the model cannot take, naming its part (the processor would refuse it later,
        unnamed)."""
        for part, image in zip(parts, images, strict=True):
            try:
                check_aspect_ratio(*image.size)
            except ValueError as e:
                raise InputError(str(e), param=part.param, code="invalid_image") from e

    def load_images(self, parts: Sequence[ImagePart]) -> list[Image.Image]:
        """A trusted local caller's images (paths, file:// and data: URLs, PIL images), synchronously."""
        images = [load_local_image(part.source) for part in parts]
        self.check_images(parts, images)
        return images

    async def aload_images(
        self,
        parts: Sequence[ImagePart],
        fetch: Callable[[list[str]], Awaitable[list[Image.Image]]],
    ) -> list[Image.Image]:
        """A server request's images through `fetch` (MediaLoader.load_images: concurrent, under the media
        policy); its errors pass through unchanged."""
        images = await fetch([str(part.source) for part in parts])
        self.check_images(parts, images)
        return images

    # --- prompts ------------------------------------------------------------------------------------------

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The conversation as prompt text: the checkpoint's chat template, or the tools template when the
        conversation uses tools (definitions, tool calls, tool results)."""
        kwargs = dict(template_kwargs or {})
        if tools:
            kwargs["tools"] = tools
        if uses_tools(messages, kwargs.get("tools")):
            return self.processor.apply_tool_chat_template(
                messages, add_generation_prompt=add_generation_prompt, **kwargs
            )
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def process(
        self,
        prompt: str,
        images: Sequence[Image.Image] = (),
        *,
        bounds: PixelBounds | None = None,
        image_bounds: Sequence[PixelBounds] | None = None,
    ) -> ProcessedPrompt:
        """Tokenise rendered prompt text with its images (one placeholder each): resize, expand, positions."""
        min_pixels, max_pixels = self.default_bounds() if bounds is None else bounds
        return self.processor.process(
            prompt,
            images,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            image_pixels=image_bounds,
            as_pixels=self.images_as_pixels,
            resize_on_device=self.resize_on_device,
        )

    def process_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[Image.Image],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        bounds: PixelBounds | None = None,
        image_bounds: Sequence[PixelBounds] | None = None,
    ) -> ProcessedPrompt:
        """Render and process a conversation whose images are loaded (CPU work: run it off an event loop)."""
        try:
            prompt = self.render(
                messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                template_kwargs=template_kwargs,
            )
            return self.process(prompt, images, bounds=bounds, image_bounds=image_bounds)
        except InputError:
            raise
        except (ValueError, jinja2.TemplateError) as e:
            raise InputError(f"Could not build the prompt from 'messages': {e}", param="messages") from e

    def check_prompt_length(self, num_tokens: int, param: str) -> None:
        """The API's prompt-length rule: a prompt must leave room for at least one output token, since a
        request's max_tokens defaults to the room left. The scheduler admits a prompt of exactly
        max_model_len (it then yields one token) and refuses a longer one: a caller that builds its
        EngineRequests by hand meets that rule instead."""
        if num_tokens >= self.max_model_len:
            raise InputError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{num_tokens} tokens, which leaves no room for output. Shorten the input (less text, fewer or "
                "smaller images; mm_processor_kwargs.max_pixels lowers an image's token count).",
                param=param,
                code="context_length_exceeded",
            )

    def make_request(
        self, processed: ProcessedPrompt, params: SamplingParams, request_id: str | None = None
    ) -> EngineRequest:
        return EngineRequest(
            request_id or f"req-{next(self._ids)}",
            processed.token_ids,
            params,
            images=processed.images,
            mrope_positions=processed.mrope_positions,
            mrope_delta=processed.mrope_delta,
        )

    # --- offline ------------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams) -> EngineRequest:
        """One conversation of a trusted local caller (LLM.chat), loaded and processed synchronously."""
        parts = image_parts(messages)
        images = self.load_images(parts)
        processed = self.process_chat(messages, images)
        return self.make_request(processed, params)
