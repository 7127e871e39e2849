"""The processor of a Qwen-VL checkpoint: its files read once, and prompts turned into engine inputs.

It serves every family in models/registry.py (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and MoE): they share the
image processor (HF's Qwen2VLImageProcessor, with the family's patch size, mean and std read from
preprocessor_config.json or the registry's defaults), the placeholder expansion and, for still images, the
M-RoPE positions; the chat template is the checkpoint's own.

Owns: reading the checkpoint's tokenizer, template, special tokens and image settings, and tokenising a
rendered prompt with each <|image_pad|> expanded to as many placeholders as the vision encoder produces rows
for that image. Its parts, one job each: chat_template.py (the template sandbox and message normalisation),
image_processor.py (resize, patchify, hash), mrope.py (positions). Token ids match HF transformers
(tests/test_processor.py).

Does not know how images are fetched or decoded (media/), how requests are scheduled (engine/) or what the
model does with the tensors (runner/, the family files). No transformers import: it reads the checkpoint
files itself with `tokenizers`, jinja2, PIL, numpy and torch. Videos are not supported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer

from vlmserve.models.chat_template import ChatTemplate, compile_chat_template, uses_tools
from vlmserve.models.image_processor import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageProcessor,
    ImageProcessorConfig,
    check_aspect_ratio,
    convert_rgb,
    smart_resize,
)
from vlmserve.models.mrope import get_rope_index
from vlmserve.multimodal import EncoderInput, ImageFeature

# Names other modules import from here (the processor's public surface before it was split by job).
__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "ImageProcessorConfig",
    "ProcessedPrompt",
    "Qwen2_5_VLProcessor",
    "check_aspect_ratio",
    "compile_chat_template",
    "convert_rgb",
    "smart_resize",
    "uses_tools",
]

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


@dataclass
class ProcessedPrompt:
    """A tokenized prompt with its images, ready for `EngineRequest`."""

    token_ids: list[int]
    images: list[ImageFeature]  # one per image, in prompt order; data: an EncoderInput
    mrope_positions: torch.Tensor  # (3, L) int64
    mrope_delta: int  # a token at index i >= L has position i + mrope_delta on all three axes


# ------------------------------------------------------------------------------------------ chat template


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
        self._chat_template = ChatTemplate(chat_template, special_tokens)
        self._images = ImageProcessor(image_config)
        self._image_config = image_config
        self._image_token = image_token
        self._video_token = tokenizer.id_to_token(video_token_id)
        self._image_token_id = image_token_id
        self._video_token_id = video_token_id
        self._vision_start_token_id = vision_start_token_id
        self._tokens_per_second = tokens_per_second
        self._eos_token_ids = list(eos_token_ids)

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
        return self._chat_template.source

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
        return self._chat_template.render(messages, add_generation_prompt, tools, documents, **kwargs)

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
        return self._chat_template.render_with_tools(messages, add_generation_prompt, tools, **kwargs)

    # ---------------------------------------------------------------- images (image_processor.py)

    def resized_size(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        return self._images.resized_size(height, width, min_pixels, max_pixels)

    def num_image_tokens(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> int:
        """How many prompt tokens (<|image_pad|>) an image of this size becomes, without preprocessing it."""
        return self._images.num_image_tokens(height, width, min_pixels, max_pixels)

    def preprocess_image(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized, normalised, patchified: ((num_patches, C*T*P*P) float32, grid_thw)."""
        return self._images.preprocess_image(image, min_pixels, max_pixels)

    def resize_image(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized pixels ((H, W, 3) uint8, grid_thw); `patchify` does the rest."""
        return self._images.resize_image(image, min_pixels, max_pixels)

    def patchify(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Resized (H, W, 3) uint8 pixels -> (grid_h * grid_w, C*T*P*P) patches on the pixels' device."""
        return self._images.patchify(pixels, dtype)

    def encoder_input(
        self, pixels: torch.Tensor, grid_thw: tuple[int, int, int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """An image's uint8 pixels as a request carries them -> its patches on the pixels' device (resized
        there first when the request left that to the device)."""
        return self._images.encoder_input(pixels, grid_thw, dtype)

    def image_hash(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> str:
        """Content hash of an image as this processor would preprocess it."""
        return self._images.image_hash(image, min_pixels, max_pixels)

    def pixels_hash(self, pixels: torch.Tensor) -> str:
        """Content hash of resized (H, W, 3) uint8 pixels (the encoder's input before normalisation)."""
        return self._images.pixels_hash(pixels)

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
        resize_on_device: bool = False,
    ) -> ProcessedPrompt:
        """Tokenize a rendered chat prompt that holds one <|image_pad|> per image, expand each placeholder
        to the image's token count and compute M-RoPE positions. Token ids equal HF's processor input_ids.
        `image_pixels`: a (min_pixels, max_pixels) per image, in place of the shared pair (per-image detail).
        `as_pixels`: images leave as uint8 pixels for the engine to patchify on its device (the engine's
        configuration decides, `EngineConfig.images_as_pixels`), else as float32 patches; with
        `resize_on_device` as well, as decoded pixels that the engine also resizes (`EngineConfig.image_resize`)."""
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
            pixels, grid, mm_hash = self._images.prepare(
                img, lo, hi, resize_on_device=as_pixels and resize_on_device
            )
            # The encoder's input: float32 patches, or the uint8 pixels for the engine to (resize and) patchify
            # on its device (`as_pixels`).
            pixel_values = pixels if as_pixels else self.patchify(pixels)
            length = grid[0] * grid[1] * grid[2] // merge_area
            features.append(
                ImageFeature(
                    mm_hash=mm_hash,
                    offset=len(token_ids),
                    length=length,
                    data=EncoderInput(pixel_values, grid, as_pixels),
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
        """Multimodal RoPE positions (3, L) int64 and the delta for generated tokens (mrope.py)."""
        return get_rope_index(
            token_ids,
            image_grid_thw,
            image_token_id=self._image_token_id,
            merge_size=self._image_config.merge_size,
        )
