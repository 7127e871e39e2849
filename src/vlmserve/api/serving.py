"""One served model: everything between a validated OpenAI request and the engine's stream of deltas.

`ModelServer` holds what serving one model id takes (the engine client, the processor, the frozen
EngineConfig, the MediaLoader) and turns requests into `EngineRequest`s through the engine's input processor
(engine/input_processor.py, the path the offline `LLM` takes too): it adds what only the API has, the
request's pixel bounds (mm_processor_kwargs, checked against the server's), the images fetched concurrently
under the media policy, prompt building in a worker thread (it is CPU work), the OpenAI / vLLM sampling
fields mapped onto `SamplingParams`, and the input processor's errors as 400s naming the field. `start()`
hands a request to the engine and surfaces the errors the engine raises before the first delta (queue full,
engine dead) as API errors, so that a stream never begins with a 200 that then fails.

An app routes by model id over several `ModelServer`s (server.py), which is how one process, or a Ray Serve
deployment, can serve more than one model. Engine construction lives in `from_engine_args`, not in routes.

Does not know: HTTP (FastAPI objects), response shapes, SSE, metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from PIL import Image

from vlmserve.api.errors import APIError, InvalidRequestError, RequestTooLargeError, ServiceUnavailableError
from vlmserve.api.logprobs import TokenTexts
from vlmserve.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelCard,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmserve.api.tools import ToolPlan, plan_tools
from vlmserve.config import EngineArgs, EngineConfig
from vlmserve.engine.async_engine import AsyncEngine, EngineDeadError
from vlmserve.engine.build_config import build_engine_config
from vlmserve.engine.client import EngineClient, EngineHealth
from vlmserve.engine.core import EngineCore
from vlmserve.engine.engine_process import EngineProcess
from vlmserve.engine.input_processor import ImagePart, InputError, InputProcessor, PixelBounds, image_parts
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta
from vlmserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from vlmserve.engine.scheduler import QueueFullError
from vlmserve.engine.structured import StructuredOutputError, check_structured_outputs
from vlmserve.media import MediaConfig, MediaError, MediaLoader
from vlmserve.models.processor import ProcessedPrompt, Qwen2_5_VLProcessor

logger = logging.getLogger(__name__)

# OpenAI's own cap on `n`; beyond it one request could flood the engine with sequences.
MAX_N = 128
# Prompts in one /v1/completions batch.
MAX_PROMPTS = 1024
# A client-chosen request id (body `request_id` or the X-Request-Id header) longer than this is replaced.
MAX_CLIENT_ID_CHARS = 256

# The name of the field a SamplingParams error is about (its message starts with it) -> the API parameter.
_CHAT_PARAM = {"logprobs": "top_logprobs"}


class ModelServer:
    """The engine, processor, config and media loader of one model id."""

    def __init__(
        self,
        engine: EngineClient,
        processor: Qwen2_5_VLProcessor,
        config: EngineConfig,
        media: MediaLoader,
        *,
        model_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.processor = processor
        self.config = config
        self.media = media
        self.model_id = model_id or config.served_model_name
        self.created = int(time.time())
        self.token_texts = TokenTexts(processor.tokenizer)
        self._vocab_size = processor.tokenizer.get_vocab_size(with_added_tokens=True)
        # Prompt building (template, images, tokens, positions) is the engine's input processor, shared
        # with the offline LLM; this class adds the API's fields and errors around it.
        self.inputs = InputProcessor(processor, config)
        self.enable_auto_tool_choice = config.enable_auto_tool_choice
        self.tool_call_parser = config.tool_call_parser

    @classmethod
    def from_engine_args(cls, args: EngineArgs, media_config: MediaConfig | None = None) -> ModelServer:
        """Build everything for one model: config, processor, engine (loads the weights), media loader."""
        return cls.from_config(build_engine_config(args), media_config)

    @classmethod
    def from_config(cls, config: EngineConfig, media_config: MediaConfig | None = None) -> ModelServer:
        processor = Qwen2_5_VLProcessor.from_pretrained(config.model_path)
        engine: EngineClient
        if config.engine_process:
            engine = EngineProcess(config, stall_timeout_s=config.engine_stall_timeout_s)
        else:
            engine = AsyncEngine(EngineCore(config, processor), stall_timeout_s=config.engine_stall_timeout_s)
        return cls(engine, processor, config, MediaLoader(media_config or MediaConfig()))

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self.engine.is_alive

    def health(self) -> EngineHealth:
        return self.engine.health()

    def stats(self) -> dict[str, float]:
        return self.engine.stats() | {"seconds_since_progress": self.engine.health().seconds_since_progress}

    def model_card(self) -> ModelCard:
        return ModelCard(
            id=self.model_id,
            created=self.created,
            root=self.config.model_path,
            max_model_len=self.config.max_model_len,
        )

    async def aclose(self) -> None:
        """Stop the engine (its thread finishes the step it is in) and close the media connection pool."""
        await asyncio.to_thread(self.engine.shutdown)
        await self.media.aclose()

    # --- chat ----------------------------------------------------------------------------------------------

    async def prepare_chat(self, body: ChatCompletionRequest, request_id: str) -> EngineRequest:
        _refuse_unsupported_chat(body)
        plan = await asyncio.to_thread(
            plan_tools,
            body,
            enable_auto_tool_choice=self.enable_auto_tool_choice,
            tool_call_parser=self.tool_call_parser,
        )
        structured = await _structured_outputs(body, plan)
        processed = await self.process_chat(body)
        num_prompt = len(processed.token_ids)
        self._check_prompt_length(num_prompt, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs=true; set logprobs to true or drop top_logprobs.",
                param="top_logprobs",
            )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._sampling_params(
            body,
            num_prompt=num_prompt,
            max_tokens=max_tokens,
            max_tokens_param=max_tokens_param,
            max_tokens_default=None,
            logprobs=logprobs,
            rename=_CHAT_PARAM,
            structured=structured,
        )
        return self.inputs.make_request(processed, params, request_id)

    async def process_chat(self, body: ChatCompletionRequest) -> ProcessedPrompt:
        """The prompt of a chat request: images checked and loaded, template rendered, tokenized and
        preprocessed (engine/input_processor.py). Shared by /v1/chat/completions, /v1/responses and
        /tokenize."""
        inputs = self.inputs
        messages = _template_messages(body.messages)
        parts = image_parts(messages)
        try:
            inputs.check_image_count(parts)
            bounds = self._pixel_bounds(body)
            image_bounds = inputs.image_bounds(parts, bounds)
            images = await inputs.aload_images(parts, self._fetch(parts))
            return await asyncio.to_thread(
                inputs.process_chat,
                messages,
                images,
                add_generation_prompt=body.add_generation_prompt,
                tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
                template_kwargs=body.chat_template_kwargs,
                bounds=bounds,
                image_bounds=image_bounds,
            )
        except InputError as e:
            raise InvalidRequestError(str(e), param=e.param, code=e.code) from e

    def _pixel_bounds(self, body: ChatCompletionRequest) -> PixelBounds:
        """The request's (min_pixels, max_pixels), checked against the server's bounds."""
        kwargs = body.mm_processor_kwargs
        lo, hi = self.inputs.min_pixels, self.inputs.max_pixels
        if kwargs is None or (kwargs.min_pixels is None and kwargs.max_pixels is None):
            return self.inputs.default_bounds()
        for name in ("min_pixels", "max_pixels"):
            value = getattr(kwargs, name)
            if value is not None and value > hi:
                raise InvalidRequestError(
                    f"mm_processor_kwargs.{name}={value} exceeds this server's max_pixels={hi}; ask for at "
                    f"most {hi} pixels per image (the operator sets the bound with --mm-processor-kwargs).",
                    param=f"mm_processor_kwargs.{name}",
                )
        req_hi = kwargs.max_pixels if kwargs.max_pixels is not None else hi
        # A request that lowers max_pixels below the server's min_pixels lowers the minimum with it.
        req_lo = kwargs.min_pixels if kwargs.min_pixels is not None else min(lo, req_hi)
        factor = self.inputs.merged_patch
        if req_hi < factor * factor:
            raise InvalidRequestError(
                f"mm_processor_kwargs.max_pixels={req_hi} is below one {factor}x{factor} patch "
                f"({factor * factor} pixels); ask for at least {factor * factor}.",
                param="mm_processor_kwargs.max_pixels",
            )
        if req_lo > req_hi:
            raise InvalidRequestError(
                f"mm_processor_kwargs.min_pixels={req_lo} exceeds max_pixels={req_hi}.",
                param="mm_processor_kwargs.min_pixels",
            )
        return req_lo, req_hi

    def _fetch(self, parts: list[ImagePart]) -> Callable[[list[str]], Awaitable[list[Image.Image]]]:
        """MediaLoader.load_images, with a MediaError turned into an API error naming the failing part."""

        async def fetch(urls: list[str]) -> list[Image.Image]:
            try:
                return await self.media.load_images(urls)
            except MediaError as e:
                param = parts[e.index].param if e.index is not None and e.index < len(parts) else "messages"
                error_cls: type[APIError] = (
                    RequestTooLargeError if e.status_code == 413 else InvalidRequestError
                )
                raise error_cls(e.message, param=param, code="invalid_image") from e

        return fetch

    # --- completions ----------------------------------------------------------------------------------------

    async def prepare_completions(self, body: CompletionRequest, request_id: str) -> list[EngineRequest]:
        """One engine request per prompt of the batch, with ids f"{request_id}-{i}"."""
        _refuse_unsupported_completion(body)
        structured = await _structured_outputs(body, ToolPlan())
        prompts = _prompt_list(body.prompt)
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequestError(
                f"'prompt' holds {len(prompts)} prompts, more than {MAX_PROMPTS}; split the batch.",
                param="prompt",
            )
        requests = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                try:
                    processed = await asyncio.to_thread(self.inputs.process, prompt)
                except ValueError as e:
                    raise InvalidRequestError(f"Invalid {param}: {e}", param=param) from e
                token_ids, positions, delta = (
                    processed.token_ids,
                    processed.mrope_positions,
                    processed.mrope_delta,
                )
            else:
                token_ids, positions, delta = self._check_token_prompt(prompt, param), None, 0
            if not token_ids:
                raise InvalidRequestError(f"{param} is empty; it needs at least one token.", param=param)
            self._check_prompt_length(len(token_ids), param)
            explicit = "max_tokens" in body.model_fields_set and body.max_tokens is not None
            params = self._sampling_params(
                body,
                num_prompt=len(token_ids),
                max_tokens=body.max_tokens if explicit else None,
                max_tokens_param="max_tokens",
                max_tokens_default=None if explicit else 16,
                logprobs=body.logprobs,
                rename={},
                structured=structured,
            )
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            requests.append(
                EngineRequest(rid, token_ids, params, mrope_positions=positions, mrope_delta=delta)
            )
        return requests

    def _check_token_prompt(self, ids: list[int], param: str) -> list[int]:
        for i, t in enumerate(ids):
            if not 0 <= t < self._vocab_size:
                raise InvalidRequestError(
                    f"{param}[{i}] = {t} is not a token id of this model (0 <= id < {self._vocab_size}).",
                    param=param,
                )
            if t == self.processor.image_token_id:
                raise InvalidRequestError(
                    f"{param}[{i}] is the image placeholder token {t}; /v1/completions takes no images, send "
                    "them as image_url parts to /v1/chat/completions.",
                    param=param,
                )
        return list(ids)

    # --- tokenize ----------------------------------------------------------------------------------------

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's /tokenize: the prompt's token ids as the engine would see them, image placeholders expanded
        to each image's token count (images are loaded and preprocessed, never encoded)."""
        if body.messages is not None:
            chat = ChatCompletionRequest(
                messages=body.messages,
                mm_processor_kwargs=body.mm_processor_kwargs,
                add_generation_prompt=body.add_generation_prompt,
                chat_template_kwargs=body.chat_template_kwargs,
            )
            processed = await self.process_chat(chat)
        else:
            assert body.prompt is not None  # TokenizeRequest holds one of the two
            try:
                processed = await asyncio.to_thread(self.inputs.process, body.prompt)
            except ValueError as e:
                raise InvalidRequestError(f"Invalid prompt: {e}", param="prompt") from e
        tokens = processed.token_ids
        counts = [img.length for img in processed.images]
        token_strs = None
        if body.return_token_strs:
            tokenizer = self.processor.tokenizer
            token_strs = [tokenizer.id_to_token(t) or "" for t in tokens]
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=self.config.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
            image_tokens=sum(counts),
            image_token_counts=counts,
        )

    def detokenize(self, tokens: list[int]) -> str:
        check_token_ids(tokens, self._vocab_size, "tokens")
        return self.processor.decode(tokens, skip_special_tokens=False)

    def prompt_text(self, request: EngineRequest) -> str:
        """The prompt as text (for `echo`)."""
        return self.processor.decode(request.prompt_token_ids, skip_special_tokens=False)

    # --- shared --------------------------------------------------------------------------------------------

    def _check_prompt_length(self, num_prompt: int, param: str) -> None:
        try:
            self.inputs.check_prompt_length(num_prompt, param)
        except InputError as e:
            raise InvalidRequestError(str(e), param=e.param, code=e.code) from e

    def _sampling_params(
        self,
        body: SamplingFields,
        *,
        num_prompt: int,
        max_tokens: int | None,
        max_tokens_param: str,
        max_tokens_default: int | None,
        logprobs: int | None,
        rename: dict[str, str],
        structured: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        room = self.config.max_model_len - num_prompt
        if max_tokens is None:
            max_tokens = room if max_tokens_default is None else min(max_tokens_default, room)
        elif max_tokens > room:
            raise InvalidRequestError(
                f"'{max_tokens_param}' is too large: {max_tokens}. This model's maximum context length is "
                f"{self.config.max_model_len} tokens and the prompt has {num_prompt} tokens, so at most {room} "
                f"can be generated; lower {max_tokens_param}.",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        if not 1 <= body.n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {body.n}.", param="n")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            name = rename.get("logprobs", "logprobs")
            raise InvalidRequestError(
                f"{name} must be between 0 and {MAX_LOGPROBS}, got {logprobs}.", param=name
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        for i, t in enumerate(body.stop_token_ids or ()):
            if not 0 <= t < self._vocab_size:
                raise InvalidRequestError(
                    f"stop_token_ids[{i}] = {t} is not a token id of this model (0 <= id < {self._vocab_size}).",
                    param="stop_token_ids",
                )
        try:
            return SamplingParams(
                n=body.n,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                min_p=0.0 if body.min_p is None else body.min_p,
                seed=body.seed,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                max_tokens=max_tokens,
                min_tokens=body.min_tokens,
                ignore_eos=body.ignore_eos,
                stop=tuple(stop),
                stop_token_ids=tuple(body.stop_token_ids or ()),
                include_stop_str_in_output=body.include_stop_str_in_output,
                logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens,
                structured_outputs=structured,
            )
        except ValueError as e:
            # SamplingParams' messages start with the field's name: that is the parameter to fix.
            field = str(e).split(" ", 1)[0].strip("'")
            if field == "max_tokens":
                field = max_tokens_param
            param = rename.get(field, field) if field.isidentifier() else None
            raise InvalidRequestError(str(e), param=param) from e

    async def start(self, request: EngineRequest) -> DeltaStream:
        """Hand `request` to the engine and wait for its first delta; return the stream of all its deltas.

        Errors the engine raises before it runs the request become API errors here. Closing the returned
        stream (or cancelling its consumer) aborts the request and frees its KV blocks.
        """
        deltas = self.engine.generate(request)
        try:
            first = await anext(deltas)
        except BaseException as e:
            # Also when cancelled (the client left): the add may already be queued in the engine, and an abort
            # queued after it removes it again. Aborting an unknown id is a no-op.
            self.engine.abort(request.request_id)
            await deltas.aclose()
            if isinstance(e, QueueFullError):
                raise ServiceUnavailableError(str(e), code="queue_full") from e
            if isinstance(e, EngineDeadError):
                raise ServiceUnavailableError(str(e), code="engine_dead") from e
            if isinstance(e, ValueError):
                raise InvalidRequestError(str(e)) from e
            raise
        return DeltaStream(first, deltas)


class DeltaStream:
    """The deltas of one running engine request. Not a generator on purpose: `aclose()` aborts the request
    (if unfinished) even when nobody ever iterated the stream, e.g. when the client left between the first
    token and the start of the response."""

    def __init__(self, first: CompletionDelta, rest: AsyncGenerator[CompletionDelta, None]) -> None:
        self._first: CompletionDelta | None = first
        self._rest = rest  # AsyncEngine.generate, started: closing it runs its abort-if-unfinished cleanup

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> CompletionDelta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


def check_token_ids(tokens: Sequence[int], vocab_size: int, param: str) -> None:
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"{param}[{i}] = {t} is not a token id of this model (0 <= id < {vocab_size}).", param=param
            )


def new_request_id(prefix: str, client_id: str | None) -> str:
    """`chatcmpl-<uuid>` / `cmpl-<uuid>`, or with the client's own id (vLLM's request_id / X-Request-Id) when
    it is a sensible length."""
    if client_id and len(client_id) <= MAX_CLIENT_ID_CHARS:
        return f"{prefix}-{client_id}"
    return f"{prefix}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------ message conversion


def _template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The request's messages as the plain dicts the input processor takes (the fields a chat template may
    read; unknown fields a client sent are not passed on)."""
    return [m.model_dump(include=_MESSAGE_FIELDS, exclude_none=True) for m in messages]


_MESSAGE_FIELDS: Any = {
    "role": True,
    "content": {"__all__": {"type", "text", "image_url"}},
    "name": True,
    "tool_call_id": True,
    "tool_calls": {"__all__": {"id", "type", "function"}},
}


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError(
            "'prompt' is empty; send a string, a list of strings or token ids.", param="prompt"
        )
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    """Fields whose meaning we cannot honour: refused, because silently ignoring them gives wrong output."""
    _refuse_logit_bias(body)


# ------------------------------------------------------------------------------------------ structured outputs

_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


async def _structured_outputs(body: SamplingFields, plan: ToolPlan) -> StructuredOutputsParams | None:
    """The request's output constraint (response_format, structured_outputs, guided_*, or a forced tool
    call), checked by the grammar engine; a bad one is a 400 naming its field."""
    found = _constraints(body)
    if plan.constraint is not None:
        found.append(("tool_choice", "tool_choice", plan.constraint))
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise InvalidRequestError(
            f"This request sets more than one output constraint ({names}); send only one.", param=found[1][0]
        )
    if not found:
        return None
    _, param, params = found[0]
    if param == "tool_choice":
        return params  # checked function by function when it was built
    try:
        await asyncio.to_thread(check_structured_outputs, params)
    except StructuredOutputError as e:
        raise InvalidRequestError(f"Invalid {param}: {e}", param=param, code="invalid_constraint") from e
    return params


def _constraints(body: SamplingFields) -> list[tuple[str, str, StructuredOutputsParams]]:
    """(field, parameter to name in errors, constraint) for every constraint field the body sets."""
    found: list[tuple[str, str, StructuredOutputsParams]] = []

    def make(field: str, param: str, **kwargs: Any) -> None:
        try:
            found.append((field, param, StructuredOutputsParams(**kwargs)))
        except ValueError as e:
            raise InvalidRequestError(f"Invalid {param}: {e}", param=param, code="invalid_constraint") from e

    response_format = body.response_format
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            make("response_format", "response_format", json_object=True)
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None and isinstance(spec, dict):
                schema = spec.get("json_schema")  # an older spelling some clients send
            if not isinstance(schema, dict | bool):
                raise InvalidRequestError(
                    "response_format of type 'json_schema' needs json_schema.schema, a JSON Schema object: "
                    '{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}.',
                    param="response_format.json_schema.schema",
                )
            make("response_format", "response_format.json_schema.schema", json=schema)
        elif kind != "text":
            raise InvalidRequestError(
                f"response_format type {_show_type(response_format)} is not supported; use 'text', "
                "'json_object' or 'json_schema'.",
                param="response_format",
            )
    if body.structured_outputs is not None:
        so = body.structured_outputs
        if "structural_tag" in so and so["structural_tag"] is not None:
            raise InvalidRequestError(
                "structured_outputs.structural_tag is not supported; use json, regex, choice or grammar.",
                param="structured_outputs.structural_tag",
            )
        given = {k: so[k] for k in _STRUCTURED_KEYS if so.get(k) not in (None, False)}
        param = f"structured_outputs.{next(iter(given))}" if len(given) == 1 else "structured_outputs"
        make("structured_outputs", param, **given)
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(body, name)
        if value is not None:
            make(name, name, **{key: value})
    return found


def _show_type(response_format: Any) -> str:
    if isinstance(response_format, dict):
        return repr(response_format.get("type"))
    return f"{type(response_format).__name__} (it must be an object with a 'type')"


def _refuse_unsupported_completion(body: CompletionRequest) -> None:
    if body.suffix:
        raise InvalidRequestError("'suffix' is not supported by this server.", param="suffix")
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError(
            "echo together with logprobs needs prompt logprobs, which this server does not compute; drop one.",
            param="echo",
        )
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError(
            f"best_of={body.best_of} differs from n={body.n}; this server only supports best_of == n.",
            param="best_of",
        )
    _refuse_logit_bias(body)


def _refuse_logit_bias(body: SamplingFields) -> None:
    if body.logit_bias:
        raise InvalidRequestError("'logit_bias' is not supported by this server.", param="logit_bias")
