"""The Qwen2.5-VL processor: chat template, image preprocessing, prompt tokenization and M-RoPE positions.

It serves every family in models/registry.py (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and MoE): they share the
image processor (HF's Qwen2VLImageProcessor, with the family's patch size, mean and std read from
preprocessor_config.json or the registry's defaults), the placeholder expansion and, for still images, the
M-RoPE positions; the chat template is the checkpoint's own.

Owns everything between "messages and decoded PIL images" and "token ids, encoder inputs and positions the
engine can run": rendering the checkpoint's chat template, resizing and patchifying images exactly like HF's
Qwen2-VL image processor (its PIL backend, which is our reference), expanding each <|image_pad|> into as many
placeholders as the vision encoder produces rows for that image, and Qwen2.5-VL's multimodal RoPE positions.
The numbers match HF transformers bit for bit or within float rounding; tests/test_processor.py checks that.

Does not know how images are fetched or decoded (media/), how requests are scheduled (engine/) or what the
model does with the tensors (runner/, models/qwen2_5_vl.py). No transformers import: it reads the checkpoint
files itself with `tokenizers`, jinja2, PIL, numpy and torch. Videos are not supported.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import Tokenizer

from vlmserve.engine.inputs import ImageFeature
from vlmserve.models.tool_template import QWEN2_5_VL_TOOLS_CHAT_TEMPLATE, template_handles_tools

# Defaults of HF's Qwen2VLImageProcessor, used where preprocessor_config.json leaves a field out.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

# The special-token fields of tokenizer_config.json that HF passes to chat templates (its special_tokens_map).
_SPECIAL_TOKEN_FIELDS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


# ------------------------------------------------------------------------------------------ data types


@dataclass
class ProcessedPrompt:
    """A tokenized prompt with its images, ready for `EngineRequest`."""

    token_ids: list[int]
    # One per image, in prompt order; data = (pixel_values (num_patches, C*T*P*P) float32, grid_thw tuple).
    images: list[ImageFeature]
    mrope_positions: torch.Tensor  # (3, L) int64
    mrope_delta: int  # a token at index i >= L has position i + mrope_delta on all three axes


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What preprocessor_config.json says about turning an image into patches."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(
        cls, cfg: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> ImageProcessorConfig:
        """Read both layouts: flat min_pixels / max_pixels (released checkpoints) and the "size" dict
        (transformers 5.x). Like HF's Qwen2VLImageProcessor, the flat fields win when both are present.
        `defaults` (the model family's, from models/registry.py) fill fields the file leaves out."""
        cfg = {**(defaults or {}), **cfg}
        size = cfg.get("size") or {}
        min_pixels = size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS))
        max_pixels = size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS))
        if cfg.get("min_pixels") is not None:
            min_pixels = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            max_pixels = cfg["max_pixels"]
        out = cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(cfg.get("patch_size", 14)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge_size=int(cfg.get("merge_size", 2)),
            image_mean=_three_floats(cfg.get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=_three_floats(cfg.get("image_std", OPENAI_CLIP_STD), "image_std"),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        )
        _check_pixel_range(out.min_pixels, out.max_pixels, out.patch_size * out.merge_size)
        return out


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"preprocessor_config.json: {name} must have 3 values (R, G, B), got {value!r}.")
    return values[0], values[1], values[2]


def _check_pixel_range(min_pixels: int, max_pixels: int, factor: int) -> None:
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(
            f"Invalid pixel range min_pixels={min_pixels}, max_pixels={max_pixels}: "
            "need 0 < min_pixels <= max_pixels."
        )
    if max_pixels < factor * factor:
        raise ValueError(
            f"max_pixels={max_pixels} is below one merged patch ({factor}x{factor}={factor * factor} pixels); "
            f"use max_pixels >= {factor * factor}."
        )


# ------------------------------------------------------------------------------------------ resizing


def check_aspect_ratio(width: int, height: int) -> None:
    """ValueError for an image more than MAX_ASPECT_RATIO times longer than it is wide (or the reverse)."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"The image is {width}x{height}, an aspect ratio of {ratio:.1f}:1; the model takes images up to "
            f"{MAX_ASPECT_RATIO}:1. Crop or pad it to a less extreme shape."
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The size Qwen2.5-VL resizes an image to: both sides multiples of `factor`, the pixel count within
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible. Same arithmetic as HF's
    `smart_resize` (including Python's round-half-to-even), so the same image gets the same grid."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size {width}x{height} is empty; images need at least 1x1 pixels.")
    check_aspect_ratio(width, height)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def convert_rgb(image: Image.Image) -> Image.Image:
    """RGB the way HF's convert_to_rgb does it: anything with transparency (an alpha band, or a palette /
    greyscale image with a transparency entry) is composited onto white first; everything else is a plain
    `convert("RGB")`; an RGB image without transparency comes back as it is (no copy)."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------ chat template


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some templates to mark assistant tokens for
    training masks) and render its body unchanged, as HF does when it is not tracking those masks."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, minus underscore-prefixed attributes (HF's guard against sandbox escapes)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja's Namespace so that `namespace(self=...)` still works.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}."
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like HF's override: jinja's built-in tojson HTML-escapes, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def uses_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None) -> bool:
    """Whether a conversation needs a template that renders tools: tool definitions, an assistant turn with
    tool_calls, or a tool result."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment HF renders chat templates in (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, the same globals and filters), so the same messages render the same text."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = dict
    return env.from_string(source)


def _plain(value: Any) -> Any:
    # The template sees only JSON-like data: rich objects (decoded images, arrays) become an inert "<Type>"
    # placeholder, as in HF. Templates test whether media keys are present, never read their values.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI / HF chat messages as chat templates expect them, the one place this is done: what HF's
    processor does before rendering (drop keys whose value is None, as OpenAI clients send `content: null`;
    turn OpenAI {"type": "image_url", "image_url": ...} parts into {"type": "image"}), plus OpenAI's
    spellings templates do not know: the `developer` role is `system`, and tool-call arguments sent as JSON
    text become the mapping templates write with `| tojson`."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}."
            )
        msg = {k: v for k, v in message.items() if v is not None}
        if msg.get("role") == "developer":
            msg["role"] = "system"
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_tool_call(call) for call in msg["tool_calls"]]
        content = msg.get("content")
        if isinstance(content, list):
            parts: list[Any] = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image_url" and "image_url" in part:
                    info = part["image_url"]
                    url = info.get("url", "") if isinstance(info, Mapping) else info
                    parts.append({"type": "image", "url": url})
                else:
                    parts.append(part)
            msg["content"] = parts
        out.append(_plain(msg))
    return out


def _tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: the template writes it as a string
    return {**call, "function": {**function, "arguments": arguments}}


# ------------------------------------------------------------------------------------------ checkpoint files


def _read_json(directory: Path, name: str, *, required: bool, why: str = "") -> dict[str, Any] | None:
    path = directory / name
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(
            f"{name} not found in checkpoint directory {directory}{': ' + why if why else ''}. "
            "Point the model path at a complete Qwen2.5-VL checkpoint (it ships config.json, tokenizer.json, "
            "tokenizer_config.json and preprocessor_config.json)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or regenerate the checkpoint.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str:
    """The template HF's processor would use, in its order: chat_template.json (legacy processor file), then
    chat_template.jinja, then tokenizer_config.json's "chat_template" (a string, or a list of named templates
    of which "default" is taken)."""
    legacy = _read_json(directory, "chat_template.json", required=False)
    if legacy is not None:
        template = legacy.get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{directory / 'chat_template.json'} has no string field 'chat_template'.")
        return template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    raise FileNotFoundError(
        f"No chat template in checkpoint directory {directory}: none of chat_template.json, chat_template.jinja "
        "or a 'chat_template' field in tokenizer_config.json is present. Add the model's chat template to one of "
        "them (released Qwen2.5-VL checkpoints ship chat_template.json)."
    )


def _family_image_defaults(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model family's image processor defaults (patch size, mean, std), or none for a config.json the
    registry does not know (the model loader reports that one)."""
    from vlmserve.models.registry import family_for_config

    try:
        return family_for_config(config).image_defaults
    except ValueError:
        return {}


def _config_field(config: Mapping[str, Any], name: str) -> Any:
    # Text-side fields sit at the top level in released checkpoints and under "text_config" in newer saves.
    if name in config:
        return config[name]
    return (config.get("text_config") or {}).get(name)


# ------------------------------------------------------------------------------------------ processor


class Qwen2_5_VLProcessor:
    """Chat template, tokenizer, image preprocessing and M-RoPE positions of one Qwen2.5-VL checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        image_config: ImageProcessorConfig,
        *,
        image_token_id: int,
        video_token_id: int,
        vision_start_token_id: int,
        tokens_per_second: float,
        eos_token_ids: Sequence[int],
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        image_token = tokenizer.id_to_token(image_token_id)
        if image_token is None:
            raise ValueError(
                f"image_token_id={image_token_id} is not in the tokenizer (vocabulary size "
                f"{tokenizer.get_vocab_size()}); config.json and tokenizer.json belong to different models."
            )
        self._tokenizer = tokenizer
        self._chat_template_source = chat_template
        self._chat_template = compile_chat_template(chat_template)
        self._compiled_tools_template: jinja2.Template | None = None
        self._image_config = image_config
        self._image_token = image_token
        self._video_token = tokenizer.id_to_token(video_token_id)
        self._image_token_id = image_token_id
        self._video_token_id = video_token_id
        self._vision_start_token_id = vision_start_token_id
        self._tokens_per_second = tokens_per_second
        self._eos_token_ids = list(eos_token_ids)
        self._special_tokens = dict(special_tokens or {})
        self._lut = torch.from_numpy(self._normalization_table(image_config))  # (3, 256) float32
        self._lut_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # Everything besides the resized pixels that decides the encoder input, for pixels_hash.
        self._hash_salt = repr(replace(image_config, min_pixels=0, max_pixels=0)).encode()

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2_5_VLProcessor:
        """Load from a local checkpoint directory (resolve hub ids first with models.loader.resolve_model_path)."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"Checkpoint directory {directory} does not exist or is not a directory; pass the local directory "
                "of a Qwen2.5-VL checkpoint (hub ids are resolved to one by vlmserve.models.loader)."
            )
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in checkpoint directory {directory}; vlmserve needs the fast-tokenizer "
                "file that released Qwen2.5-VL checkpoints ship."
            )
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer_config = _read_json(directory, "tokenizer_config.json", required=False) or {}
        special_tokens_map = _read_json(directory, "special_tokens_map.json", required=False) or {}
        chat_template = _load_chat_template(directory, tokenizer_config)
        config = _read_json(directory, "config.json", required=True, why="it holds the vision token ids")
        assert config is not None  # required=True
        preprocessor = _read_json(
            directory, "preprocessor_config.json", required=True, why="it holds the image resize parameters"
        )
        assert preprocessor is not None  # required=True
        image_config = ImageProcessorConfig.from_dict(preprocessor, _family_image_defaults(config))

        vision = config.get("vision_config") or {}
        for field, ours in (
            ("spatial_merge_size", image_config.merge_size),
            ("patch_size", image_config.patch_size),
            ("temporal_patch_size", image_config.temporal_patch_size),
        ):
            theirs = vision.get(field)
            if theirs is not None and int(theirs) != ours:
                raise ValueError(
                    f"config.json vision_config.{field}={theirs} disagrees with preprocessor_config.json "
                    f"({ours}) in {directory}; the two files must describe the same vision encoder."
                )

        def token_id(field: str, token: str) -> int:
            value = _config_field(config, field)
            if value is None:
                value = tokenizer.token_to_id(token)
            if value is None:
                raise ValueError(
                    f"config.json in {directory} has no {field} (top level or text_config) and the tokenizer has "
                    f"no {token} token; add {field} to config.json."
                )
            return int(value)

        special_tokens: dict[str, str] = {}
        for field in _SPECIAL_TOKEN_FIELDS:
            content = _token_content(tokenizer_config.get(field, special_tokens_map.get(field)))
            if content is not None:
                special_tokens[field] = content

        generation = _read_json(directory, "generation_config.json", required=False) or {}
        eos = generation.get("eos_token_id")
        if eos is None:
            eos_token = special_tokens.get("eos_token")
            eos = tokenizer.token_to_id(eos_token) if eos_token is not None else None
        if eos is None:
            raise ValueError(
                f"No end-of-sequence token in {directory}: neither generation_config.json eos_token_id nor "
                "tokenizer_config.json eos_token is set; add eos_token_id to generation_config.json."
            )
        eos_ids = [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]

        return cls(
            tokenizer,
            chat_template,
            image_config,
            image_token_id=token_id("image_token_id", "<|image_pad|>"),
            video_token_id=token_id("video_token_id", "<|video_pad|>"),
            vision_start_token_id=token_id("vision_start_token_id", "<|vision_start|>"),
            tokens_per_second=float(vision.get("tokens_per_second", 2)),
            eos_token_ids=eos_ids,
            special_tokens=special_tokens,
        )

    # ---------------------------------------------------------------- properties

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def chat_template(self) -> str:
        return self._chat_template_source

    @property
    def image_config(self) -> ImageProcessorConfig:
        return self._image_config

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def video_token_id(self) -> int:
        return self._video_token_id

    @property
    def vision_start_token_id(self) -> int:
        return self._vision_start_token_id

    @property
    def spatial_merge_size(self) -> int:
        return self._image_config.merge_size

    @property
    def patch_size(self) -> int:
        return self._image_config.patch_size

    @property
    def temporal_patch_size(self) -> int:
        return self._image_config.temporal_patch_size

    @property
    def tokens_per_second(self) -> float:
        return self._tokens_per_second

    @property
    def min_pixels(self) -> int:
        return self._image_config.min_pixels

    @property
    def max_pixels(self) -> int:
        return self._image_config.max_pixels

    # ---------------------------------------------------------------- text

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids, nothing is added around it."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (HF / OpenAI chat format) with the checkpoint's chat template; the same text
        as HF's `apply_chat_template`. Extra kwargs (e.g. add_vision_id=True) reach the template."""
        if not messages:
            raise ValueError(
                "Cannot apply the chat template to an empty conversation; pass at least one message."
            )
        return self._render(self._chat_template, messages, add_generation_prompt, tools, documents, kwargs)

    def apply_tool_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """As `apply_chat_template`, for a conversation that uses tools (definitions, assistant tool_calls,
        tool results): the checkpoint's template when it renders tools, else the Hermes-style template of
        models/tool_template.py. HF would render with the checkpoint's template and drop the tools silently
        (Qwen2.5-VL's released template ignores them); the server uses this one when a request has tools."""
        if not messages:
            raise ValueError(
                "Cannot apply the chat template to an empty conversation; pass at least one message."
            )
        template = self._chat_template
        if not template_handles_tools(self._chat_template_source):
            template = self._tools_template()
        return self._render(template, messages, add_generation_prompt, tools, None, kwargs)

    def _render(
        self,
        template: jinja2.Template,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        documents: list[dict[str, Any]] | None,
        kwargs: dict[str, Any],
    ) -> str:
        template_kwargs = {**self._special_tokens, **_plain(kwargs)}
        return template.render(
            messages=_normalize_messages(messages),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    def _tools_template(self) -> jinja2.Template:
        """The Hermes-style tools template (models/tool_template.py), compiled once on first use."""
        if self._compiled_tools_template is None:
            self._compiled_tools_template = compile_chat_template(QWEN2_5_VL_TOOLS_CHAT_TEMPLATE)
        return self._compiled_tools_template

    # ---------------------------------------------------------------- images

    def _pixel_range(self, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        lo = self._image_config.min_pixels if min_pixels is None else int(min_pixels)
        hi = self._image_config.max_pixels if max_pixels is None else int(max_pixels)
        _check_pixel_range(lo, hi, self._image_config.patch_size * self._image_config.merge_size)
        return lo, hi

    def resized_size(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        lo, hi = self._pixel_range(min_pixels, max_pixels)
        c = self._image_config
        if not c.do_resize:
            return height, width
        return smart_resize(height, width, factor=c.patch_size * c.merge_size, min_pixels=lo, max_pixels=hi)

    def num_image_tokens(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> int:
        """How many prompt tokens (<|image_pad|>) an image of this size becomes, without preprocessing it."""
        h, w = self.resized_size(height, width, min_pixels, max_pixels)
        return (h // self.patch_size) * (w // self.patch_size) // self.spatial_merge_size**2

    @staticmethod
    def _normalization_table(c: ImageProcessorConfig) -> np.ndarray:
        # Pixels are uint8, so rescale + normalise is a (3, 256) lookup table. Built with HF's exact arithmetic
        # (float64 multiply then float32; float32 subtract and divide), a lookup gives bit-identical values.
        values = np.arange(256, dtype=np.uint8)
        if c.do_rescale:
            scaled = (values.astype(np.float64) * c.rescale_factor).astype(np.float32)
        else:
            scaled = values.astype(np.float32)
        table = np.stack([scaled] * 3)  # (3, 256)
        if c.do_normalize:
            mean = np.array(c.image_mean, dtype=np.float32)[:, None]
            std = np.array(c.image_std, dtype=np.float32)[:, None]
            table = (table - mean) / std
        return np.ascontiguousarray(table, dtype=np.float32)

    def preprocess_image(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resize, rescale, normalise and patchify one image like HF's Qwen2VLImageProcessor (PIL backend).

        Returns pixel_values (grid_t*grid_h*grid_w, C*T*P*P) float32 and grid_thw = (1, grid_h, grid_w), in
        patches of `patch_size` pixels. min_pixels / max_pixels override the checkpoint's range for this call.
        """
        pixels, grid = self.resize_image(image, min_pixels, max_pixels)
        return self.patchify(pixels), grid

    def resize_image(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """`preprocess_image` up to the resized pixels: ((H, W, 3) uint8, grid_thw); `patchify` does the rest,
        on whatever device the pixels are."""
        c = self._image_config
        if c.do_convert_rgb:
            image = convert_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(
                f"Image mode {image.mode!r} is not RGB and preprocessor_config.json sets do_convert_rgb=false; "
                "convert the image to RGB first or set do_convert_rgb to true."
            )
        width, height = image.size
        resized_h, resized_w = self.resized_size(height, width, min_pixels, max_pixels)
        factor = c.patch_size * c.merge_size
        if resized_h % factor or resized_w % factor:
            raise ValueError(
                f"Image size {width}x{height} is not a multiple of {factor} and preprocessor_config.json sets "
                "do_resize=false; resize the image to multiples of patch_size*merge_size or enable do_resize."
            )
        if c.do_resize:
            image = image.resize((resized_w, resized_h), resample=Image.Resampling(c.resample))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), a writable copy
        return pixels, (1, resized_h // c.patch_size, resized_w // c.patch_size)

    def patchify(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Resized (H, W, 3) uint8 pixels -> (grid_h * grid_w, C*T*P*P) patches on the pixels' device: rescale +
        normalise by table lookup (bit-identical to HF's float32 arithmetic), then HF's patch order. In another
        `dtype` (the model's), the table is rounded once: the same values as float32 patches cast to it."""
        c = self._image_config
        key = (pixels.device, dtype)
        lut = self._lut_on.get(key)
        if lut is None:
            lut = self._lut_on[key] = self._lut.to(pixels.device).flatten().to(dtype)
        height, width, _ = pixels.shape
        p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        # HF's patch order: merge windows row-major, then the m x m patches inside a window, each patch
        # flattened as (C, T, P, P) with the single frame repeated T times. Reordered while still uint8 (a
        # quarter of the bytes), then one table lookup; channel c reads lut[256 c : 256 (c + 1)].
        ordered = pixels.view(grid_h // m, m, p, grid_w // m, m, p, 3).permute(0, 3, 1, 4, 6, 2, 5)
        offsets = torch.arange(0, 3 * 256, 256, device=pixels.device).view(3, 1, 1)
        patches = lut.take(ordered.long() + offsets)  # (gh/m, gw/m, m, m, C, P, P); take: a flat gather
        patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)
        return patches.reshape(grid_h * grid_w, 3 * t * p * p)  # copies into a contiguous tensor

    def image_hash(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> str:
        """Content hash of an image as this processor would preprocess it (`pixels_hash` of its resized pixels)."""
        return self.pixels_hash(self.resize_image(image, min_pixels, max_pixels)[0])

    def pixels_hash(self, pixels: torch.Tensor) -> str:
        """Content hash of resized (H, W, 3) uint8 pixels, the encoder's input before the fixed normalisation:
        the same hash means the same encoder input, whatever file, mode or palette the pixels came from. The
        resized pixels are also fewer bytes to hash than the decoded image (and need no copy to read)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self._hash_salt)
        h.update(f"{tuple(pixels.shape)}|".encode())
        h.update(pixels.contiguous().numpy())
        return h.hexdigest()

    # ---------------------------------------------------------------- prompts

    def process(
        self,
        prompt: str,
        images: Sequence[Image.Image],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        image_pixels: Sequence[tuple[int | None, int | None]] | None = None,
        *,
        as_pixels: bool = False,
    ) -> ProcessedPrompt:
        """Tokenize a rendered chat prompt that holds one <|image_pad|> per image, expand each placeholder
        to the image's token count and compute M-RoPE positions. Token ids equal HF's processor input_ids.
        `image_pixels`: a (min_pixels, max_pixels) per image, in place of the shared pair (per-image detail).
        `as_pixels`: images leave as resized uint8 pixels for the engine to patchify on its device (the
        engine's configuration decides, `EngineConfig.images_as_pixels`), else as float32 patches."""
        pieces = prompt.split(self._image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"The prompt has {len(pieces) - 1} image placeholder(s) ({self._image_token}) but "
                f"{len(images)} image(s) were given; each image needs exactly one placeholder, which the chat "
                "template writes for every image part of a message."
            )
        if self._video_token is not None and self._video_token in prompt:
            raise ValueError(
                f"The prompt contains a video placeholder ({self._video_token}); vlmserve does not support video "
                "inputs. Send the frames as images instead."
            )
        if image_pixels is not None and len(image_pixels) != len(images):
            raise ValueError(f"image_pixels has {len(image_pixels)} entries for {len(images)} image(s).")
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(img).__name__}.")

        # Tokenize the text between placeholders and splice the placeholders in as ids: the placeholder is a
        # special token, which the tokenizer splits on anyway, so this gives the same ids as tokenizing the
        # expanded string, without building a string of thousands of placeholders. One piece at a time, not
        # encode_batch: its thread pool costs more to wake than a few short pieces cost to encode (on a busy
        # server, milliseconds per request, waiting for pool threads that have no free core).
        encoded = [self._tokenizer.encode(piece, add_special_tokens=False) for piece in pieces]
        merge_area = self._image_config.merge_size**2
        token_ids: list[int] = list(encoded[0].ids)
        features: list[ImageFeature] = []
        grids: list[tuple[int, int, int]] = []
        for i, (img, piece) in enumerate(zip(images, encoded[1:], strict=True)):
            lo, hi = image_pixels[i] if image_pixels is not None else (min_pixels, max_pixels)
            pixels, grid = self.resize_image(img, lo, hi)
            # The encoder's input: float32 patches, or the uint8 pixels for the engine to patchify on its
            # device (`as_pixels`).
            pixel_values = pixels if as_pixels else self.patchify(pixels)
            length = grid[0] * grid[1] * grid[2] // merge_area
            features.append(
                ImageFeature(
                    mm_hash=self.pixels_hash(pixels),
                    offset=len(token_ids),
                    length=length,
                    data=(pixel_values, grid),
                )
            )
            grids.append(grid)
            token_ids.extend([self._image_token_id] * length)
            token_ids.extend(piece.ids)
        positions, delta = self.get_rope_index(token_ids, grids)
        return ProcessedPrompt(
            token_ids=token_ids, images=features, mrope_positions=positions, mrope_delta=delta
        )

    def get_rope_index(
        self, token_ids: Sequence[int], image_grid_thw: Sequence[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, int]:
        """Qwen2.5-VL multimodal RoPE positions (3, L) int64 and the delta for generated tokens.

        Text tokens advance all three axes together. An image's tokens, in grid order, get (t, h, w) positions
        offset by the position where the image starts (t stays at that offset for still images); the text
        after it resumes at that offset + max(grid_h, grid_w) / merge_size. Same as HF's get_rope_index.
        A token generated at index i >= L has position i + delta on all three axes.
        """
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)  # (L,)
        length = ids.numel()
        positions = torch.empty(3, length, dtype=torch.long)  # (3, L)
        m = self._image_config.merge_size
        image_pos = torch.nonzero(ids == self._image_token_id).flatten().tolist()
        expected = sum(t * (h // m) * (w // m) for t, h, w in image_grid_thw)
        if len(image_pos) != expected:
            raise ValueError(
                f"The prompt has {len(image_pos)} image tokens but the {len(image_grid_thw)} image grid(s) "
                f"{list(image_grid_thw)} need {expected}; expand each image placeholder to its grid's token count."
            )
        cursor = 0  # index into image_pos
        text_start = 0  # first token not yet given a position
        current = 0  # next position value
        for t, h, w in image_grid_thw:
            llm_h, llm_w = h // m, w // m
            n = t * llm_h * llm_w
            start = image_pos[cursor]
            if image_pos[cursor + n - 1] != start + n - 1:
                raise ValueError(
                    f"The {n} tokens of the image starting at index {start} are not contiguous; an image's "
                    "placeholder tokens must follow each other."
                )
            positions[:, text_start:start] = torch.arange(current, current + start - text_start)
            current += start - text_start
            grid = positions[:, start : start + n].view(3, t, llm_h, llm_w)  # (3, T, H', W')
            grid[0] = torch.arange(t).view(t, 1, 1) + current
            grid[1] = torch.arange(llm_h).view(1, llm_h, 1) + current
            grid[2] = torch.arange(llm_w).view(1, 1, llm_w) + current
            current += max(h, w) // m
            text_start = start + n
            cursor += n
        positions[:, text_start:] = torch.arange(current, current + length - text_start)
        delta = int(positions.max()) + 1 - length if length else 0
        return positions, delta
