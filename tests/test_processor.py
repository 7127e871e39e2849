"""Our Qwen2.5-VL processor and test tokenizer against HF transformers (the reference), on CPU.

Pixel values must match HF's PIL-backend image processor (we assert 1e-5; in practice they are bit-equal),
chat templates must render the same string, token ids must equal HF's processor input_ids and M-RoPE
positions must equal HF's Qwen2_5_VLModel.get_rope_index.

NOTE: HF's AutoProcessor cannot be built here: Qwen2_5_VLProcessor also loads a video processor, and that
one needs torchvision, which is not installed. The reference is HF's own Qwen2_5_VLProcessor class restricted
to its image processor and tokenizer (see `HFImageTextProcessor`), so the image/text code paths are HF's.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from tests.hf_reference import HFImageTextProcessor, HFPilImageProcessor
from vlmserve.checkpoints.tokenizer import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer_files,
    write_preprocessor_config,
)
from vlmserve.models.processor import ImageProcessorConfig, Qwen2_5_VLProcessor, smart_resize
from vlmserve.models.resample import torch_resize, vertical_first

MIN_PIXELS = 56 * 56
MAX_PIXELS = 512 * 28 * 28  # small enough that 1280x720 and 1600x1200 are downscaled


def _write_config(directory: Path, ids: dict[str, int], *, nested: bool = False) -> None:
    token_ids = {
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
    }
    config: dict[str, Any] = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vision_config": {
            "spatial_merge_size": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
        },
    }
    if nested:
        config["text_config"] = {"vocab_size": ids["vocab_size"], **token_ids}
    else:
        config |= {"vocab_size": ids["vocab_size"], **token_ids}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    directory = tmp_path_factory.mktemp("processor_ckpt")
    ids = build_tokenizer_files(directory, vocab_size=512, seed=0)
    write_preprocessor_config(directory, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    _write_config(directory, ids)
    return directory, ids


@pytest.fixture(scope="module")
def ours(checkpoint: tuple[Path, dict[str, int]]) -> Qwen2_5_VLProcessor:
    return Qwen2_5_VLProcessor.from_pretrained(checkpoint[0])


@pytest.fixture(scope="module")
def hf(checkpoint: tuple[Path, dict[str, int]]) -> HFImageTextProcessor:
    return HFImageTextProcessor.from_pretrained(checkpoint[0])


@pytest.fixture(scope="module")
def hf_model(checkpoint: tuple[Path, dict[str, int]]) -> Qwen2_5_VLModel:
    """A tiny random HF model, only to call its get_rope_index."""
    ids = checkpoint[1]
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["endoftext"],
        eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"],
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=16,
        spatial_merge_size=2,
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
    )
    return Qwen2_5_VLModel(config).eval()


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGBA":  # varied alpha so that compositing onto white matters
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "P+transparency":
        img = img.convert("P")
        # Make the most used palette entry transparent: those pixels turn white in HF's conversion.
        img.info["transparency"] = int(np.bincount(np.asarray(img).ravel()).argmax())
        return img
    return img if mode == "RGB" else img.convert(mode)


# ------------------------------------------------------------------------------------------ tokenizer files


def test_tokenizer_build_is_deterministic_and_ordered(tmp_path: Path) -> None:
    a = build_tokenizer_files(tmp_path / "a", vocab_size=512, seed=3)
    b = build_tokenizer_files(tmp_path / "b", vocab_size=512, seed=3)
    assert a == b
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # Specials come right after the ordinary vocabulary, in Qwen's order (endoftext = 151643 ... video = 151656).
    assert a["vocab_size"] <= 512
    assert a["endoftext"] == a["vocab_size"] - len(SPECIAL_TOKENS)
    offsets = {k: a[k] - a["endoftext"] for k in ("im_start", "im_end", "vision_start", "vision_end")}
    assert offsets == {"im_start": 1, "im_end": 2, "vision_start": 9, "vision_end": 10}
    assert (a["image_pad"] - a["endoftext"], a["video_pad"] - a["endoftext"]) == (12, 13)
    generation = json.loads((tmp_path / "a" / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": a["endoftext"],
        "eos_token_id": [a["im_end"], a["endoftext"]],
        "pad_token_id": a["endoftext"],
    }
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer_files(tmp_path / "c", vocab_size=100)


TEXTS = [
    "Describe this image in one sentence.",
    "<|im_start|>user\nWhat's  in the picture?\n\n<|vision_start|><|image_pad|><|vision_end|>12345<|im_end|>\n",
    "Café naïve — ünïcödé 😀 e\u0301 中文 テスト",
    "  leading spaces\ttabs\r\nand trailing   ",
    '{"colour": "red", "n": 3.14} def f(x): return x ** 2',
]


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_loads_and_agrees(
    checkpoint: tuple[Path, dict[str, int]], ours: Qwen2_5_VLProcessor, text: str
) -> None:
    hf_tok = AutoTokenizer.from_pretrained(checkpoint[0])
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    ids = ours.encode_text(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    # Byte-level BPE round-trips exactly, up to the NFC normalisation both tokenizers apply.
    assert (
        ours.decode(ids, skip_special_tokens=False)
        == hf_tok.decode(ids)
        == unicodedata.normalize("NFC", text)
    )
    assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_hf_image_processor_reads_preprocessor_config(checkpoint: tuple[Path, dict[str, int]]) -> None:
    ip = HFImageTextProcessor.from_pretrained(checkpoint[0]).image_processor
    assert type(ip) is HFPilImageProcessor
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (14, 2, 2)


# ------------------------------------------------------------------------------------------ images


def test_smart_resize_matches_hf() -> None:
    for h in (1, 5, 28, 29, 55, 56, 97, 480, 721, 1999, 4000):
        for w in (3, 14, 31, 56, 300, 640, 1280, 3000):
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((MIN_PIXELS, MAX_PIXELS), (4 * 28 * 28, 16 * 28 * 28), (3136, 12845056)):
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


IMAGES = {
    "barely-above-min": (57, 57, "RGB"),
    "below-min-upscaled": (10, 12, "RGB"),
    "31x97": (31, 97, "RGB"),
    "640x480": (640, 480, "RGB"),
    "1280x720-downscaled": (1280, 720, "RGB"),
    "300x2000": (300, 2000, "RGB"),
    "1600x1200-downscaled": (1600, 1200, "RGB"),
    "rgba": (200, 150, "RGBA"),
    "greyscale": (123, 77, "L"),
    "palette": (90, 160, "P"),
    "palette-transparency": (90, 60, "P+transparency"),
    "greyscale-alpha": (64, 100, "LA"),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_pixel_values_match_hf(ours: Qwen2_5_VLProcessor, hf: HFImageTextProcessor, name: str) -> None:
    width, height, mode = IMAGES[name]
    img = _image(width, height, mode)
    pixel_values, grid = ours.preprocess_image(img)
    ref = hf.image_processor(images=[img], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == ref["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
    torch.testing.assert_close(pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    h, w = (grid[1] * 14, grid[2] * 14)
    assert MIN_PIXELS <= h * w <= MAX_PIXELS
    # An engine that takes pixels patchifies them straight into the model's dtype: the same values as
    # the float32 patches cast to it (what HF's model does with its processor's output).
    pixels, _ = ours.resize_image(img)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(ours.patchify(pixels, dtype), pixel_values.to(dtype))
    # An engine that resizes on its device gets the pixels as decoded and resizes them there: the same values.
    feature = ours.process("a<|image_pad|>b", [img], as_pixels=True, resize_on_device=True).images[0]
    assert tuple(feature.data.values.shape[:2]) == (height, width)
    assert tuple(feature.data.grid_thw) == tuple(grid)
    assert torch.equal(ours.encoder_input(feature.data.values, feature.data.grid_thw), pixel_values)


@pytest.mark.parametrize(
    ("min_pixels", "max_pixels"), [(200 * 28 * 28, 400 * 28 * 28), (4 * 28 * 28, 64 * 28 * 28)]
)
def test_per_call_pixel_range(
    ours: Qwen2_5_VLProcessor, hf: HFImageTextProcessor, min_pixels: int, max_pixels: int
) -> None:
    img = _image(320, 240)
    pixel_values, grid = ours.preprocess_image(img, min_pixels=min_pixels, max_pixels=max_pixels)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    ref = hf.image_processor(images=[img], size=size, return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert grid != ours.preprocess_image(img)[1]  # the override changed the size
    torch.testing.assert_close(pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    assert ours.num_image_tokens(240, 320, min_pixels, max_pixels) == grid[1] * grid[2] // 4


def test_the_device_resize_is_pils_bit_for_bit() -> None:
    """resample.py's torch resize (what a GPU runs; on the CPU `pil_resize` calls PIL itself) against PIL's
    own: random sizes up and down, each filter it has, images taller than 100:1 (the pass order differs between
    Pillow versions, and the rule follows the installed one)."""
    rng = np.random.default_rng(0)
    cases = [
        (
            int(rng.integers(1, 160)),
            int(rng.integers(1, 160)),
            int(rng.integers(1, 200)),
            int(rng.integers(1, 200)),
        )
        for _ in range(40)
    ]
    cases += [
        (720, 1280, 728, 1288),
        (1200, 1600, 588, 784),
        (2000, 12, 168, 28),
        (301, 3, 224, 224),
        (300, 2, 400, 224),
    ]
    for i, (height, width, out_h, out_w) in enumerate(cases):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if i % 2:  # smooth content as well as noise (noise makes the first pass overshoot and clip often)
            array = np.asarray(
                Image.fromarray(array)
                .resize((max(1, width // 4), max(1, height // 4)))
                .resize((width, height))
            )
        for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.BOX):
            expected = np.asarray(Image.fromarray(array).resize((out_w, out_h), resample))
            got = torch_resize(torch.from_numpy(array.copy()), (out_h, out_w), resample).numpy()
            assert np.array_equal(got, expected), (height, width, out_h, out_w, resample)
    # Both Pillow rules of the pass order (the installed one is exercised above).
    assert vertical_first(720, 1280, 300, 1200, pillow_major=13) and not vertical_first(
        720, 1280, 300, 1200, pillow_major=12
    )
    assert not vertical_first(720, 1280, 700, 600, pillow_major=13)
    assert vertical_first(301, 3, 224, 224, pillow_major=12) and not vertical_first(
        300, 3, 224, 224, pillow_major=12
    )


def test_images_left_to_the_device_resize(ours: Qwen2_5_VLProcessor, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `resize_on_device` leaves as decoded, and the hash that keys the caches then: the same image
    twice gives one hash, another image or another target size another; an image that needs no resize,
    or one over DEVICE_RESIZE_MAX_PIXELS, is resized (or not) on the host exactly as without the option."""
    from vlmserve.models import image_processor

    def feature(img: Image.Image, **kwargs: Any) -> Any:
        return ours.process("a<|image_pad|>b", [img], as_pixels=True, resize_on_device=True, **kwargs).images[
            0
        ]

    img = _image(320, 240)
    first, again = feature(img), feature(Image.fromarray(np.asarray(img).copy()))
    assert tuple(first.data.values.shape) == (240, 320, 3)
    assert first.mm_hash == again.mm_hash
    assert first.mm_hash != feature(_image(320, 240, seed=1)).mm_hash
    smaller = feature(img, max_pixels=64 * 28 * 28)
    assert smaller.mm_hash != first.mm_hash and smaller.data.grid_thw != first.data.grid_thw
    exact = _image(28 * 8, 28 * 6)  # already a multiple of 28 inside the pixel range: nothing to resize
    assert (
        feature(exact).mm_hash == ours.process("a<|image_pad|>b", [exact], as_pixels=True).images[0].mm_hash
    )
    monkeypatch.setattr(image_processor, "DEVICE_RESIZE_MAX_PIXELS", 320 * 240 - 1)
    host = feature(img)
    assert tuple(host.data.values.shape[:2]) == tuple(n * 14 for n in host.data.grid_thw[1:])
    assert host.mm_hash == ours.image_hash(img)


def test_image_hash(ours: Qwen2_5_VLProcessor) -> None:
    img = _image(64, 48)
    same = Image.fromarray(np.asarray(img).copy())
    assert ours.image_hash(img) == ours.image_hash(same)
    assert ours.image_hash(img) != ours.image_hash(_image(64, 48, seed=1))
    # A pixel range that changes the resized size changes the input; one that does not, does not.
    big = _image(320, 240)
    assert ours.image_hash(big) != ours.image_hash(big, max_pixels=64 * 28 * 28)
    assert ours.image_hash(img) == ours.image_hash(img, max_pixels=64 * 28 * 28)
    # The hash is of the encoder's input: an opaque RGBA copy gives the same RGB pixels, so the same hash.
    assert ours.image_hash(img) == ours.image_hash(img.convert("RGBA"))
    translucent = img.convert("RGBA")
    translucent.putalpha(128)
    assert ours.image_hash(img) != ours.image_hash(translucent)
    # What process() gives the engine carries the same hash.
    prompt = ours.process("a<|image_pad|>b", [img])
    assert prompt.images[0].mm_hash == ours.image_hash(img)
    # Same palette indices, different palette: different RGB pixels, so a different hash.
    pal = _image(64, 48, "P")
    recoloured = pal.copy()
    recoloured.putpalette(bytes(255 - b for b in pal.getpalette()))
    assert ours.image_hash(pal) != ours.image_hash(recoloured)


# ------------------------------------------------------------------------------------------ chat template

IMG = {"type": "image"}


def _text(s: str) -> dict[str, str]:
    return {"type": "text", "text": s}


CHATS: dict[str, list[dict[str, Any]]] = {
    "text-only": [{"role": "user", "content": "Describe a red circle."}],
    "one-image": [{"role": "user", "content": [IMG, _text("What is in this image?")]}],
    "three-images": [
        {"role": "user", "content": [IMG, _text("and"), IMG, IMG, _text("Compare them.")]},
    ],
    "multi-turn-early-image": [
        {"role": "user", "content": [_text("Look:"), IMG, _text("What colour?")]},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": [_text("And its shape?")]},
    ],
    "system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": [IMG, _text("Shape?")]},
    ],
    "openai-image-url": [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                _text("Describe."),
            ],
            "name": None,
        },
    ],
}


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(
    ours: Qwen2_5_VLProcessor, hf: HFImageTextProcessor, name: str, add_generation_prompt: bool
) -> None:
    messages = CHATS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_vision_ids(ours: Qwen2_5_VLProcessor, hf: HFImageTextProcessor) -> None:
    messages = CHATS["three-images"]
    text = ours.apply_chat_template(messages, add_vision_id=True)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in text
    assert "Picture 3: " in text


# ------------------------------------------------------------------------------------------ prompts


PROMPT_IMAGES: dict[str, list[tuple[int, int]]] = {
    "text-only": [],
    "one-image": [(640, 480)],
    "three-images": [(64, 48), (31, 97), (300, 500)],
    "multi-turn-early-image": [(120, 200)],
}


@pytest.mark.parametrize("name", list(PROMPT_IMAGES))
def test_tokens_and_positions_match_hf(
    ours: Qwen2_5_VLProcessor, hf: HFImageTextProcessor, hf_model: Qwen2_5_VLModel, name: str
) -> None:
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(PROMPT_IMAGES[name])]
    prompt = ours.apply_chat_template(CHATS[name])
    processed = ours.process(prompt, images)
    ref = hf(text=[prompt], images=images or None, return_tensors="pt")

    assert processed.token_ids == ref["input_ids"][0].tolist()
    grids = [feature.data.grid_thw for feature in processed.images]
    if images:
        assert grids == [tuple(g) for g in ref["image_grid_thw"].tolist()]
        pixel_values = torch.cat([feature.data.values for feature in processed.images])
        torch.testing.assert_close(pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    for feature in processed.images:
        span = processed.token_ids[feature.offset : feature.offset + feature.length]
        assert span == [ours.image_token_id] * feature.length
        assert processed.token_ids[feature.offset - 1] == ours.vision_start_token_id
        assert processed.token_ids[feature.offset + feature.length] != ours.image_token_id
    assert len({f.mm_hash for f in processed.images}) == len(images)

    with torch.no_grad():
        positions, deltas = hf_model.get_rope_index(
            ref["input_ids"],
            mm_token_type_ids=ref["mm_token_type_ids"],
            image_grid_thw=ref["image_grid_thw"] if images else None,
        )
    assert processed.mrope_positions.dtype == torch.int64
    assert processed.mrope_positions.shape == (3, len(processed.token_ids))
    assert torch.equal(processed.mrope_positions, positions[:, 0])
    assert processed.mrope_delta == int(deltas[0, 0])
    if not images:
        assert processed.mrope_delta == 0


def test_process_rejects_placeholder_mismatch(ours: Qwen2_5_VLProcessor) -> None:
    prompt = ours.apply_chat_template(CHATS["three-images"])
    with pytest.raises(ValueError, match="3 image placeholder"):
        ours.process(prompt, [_image(56, 56)])
    with pytest.raises(ValueError, match="0 image placeholder"):
        ours.process(ours.apply_chat_template(CHATS["text-only"]), [_image(56, 56)])


def test_get_rope_index_rejects_wrong_grid(ours: Qwen2_5_VLProcessor) -> None:
    processed = ours.process(ours.apply_chat_template(CHATS["one-image"]), [_image(56, 56)])
    with pytest.raises(ValueError, match="image tokens"):
        ours.get_rope_index(processed.token_ids, [(1, 8, 8)])


# ------------------------------------------------------------------------------------------ checkpoint variants


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint, directory)
    return directory


def _drop_tokenizer_config_template(directory: Path) -> None:
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


# Multi-line, indented and filter-using, so that it renders the same only in HF's jinja environment
# (trim_blocks, lstrip_blocks, the non-escaping tojson, the {% generation %} tag); its image test sees only {"type": "image"} parts, so
# OpenAI image_url parts must be normalised first, as HF's processor does.
JINJA_TEMPLATE = """\
{% set ns = namespace(images=0) %}
<|im_start|>system
You are a jinja file. {{ {"tag": "<b>", "word": "café"} | tojson }}<|im_end|>
{% for message in messages %}
    {% if message['content'] is string %}
<|im_start|>{{ message['role'] }}
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
        {% for part in message['content'] %}
            {% if part['type'] == 'image' %}
                {% set ns.images = ns.images + 1 %}
<|vision_start|><|image_pad|><|vision_end|>
            {% elif part['type'] == 'text' %}
    {{ part['text'] }}
            {% endif %}
        {% endfor %}
<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant ({{ ns.images }} images)
{% endif %}
"""
JSON_TEMPLATE = QWEN2_5_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You are a json file.")


@pytest.mark.parametrize("variant", ["jinja", "json", "tokenizer_config", "json-over-jinja"])
def test_chat_template_sources(checkpoint: tuple[Path, dict[str, int]], tmp_path: Path, variant: str) -> None:
    directory = _copy(checkpoint[0], tmp_path)
    (directory / "chat_template.json").unlink()
    expected = "You are a helpful assistant."
    if variant in ("jinja", "json-over-jinja"):
        _drop_tokenizer_config_template(directory)
        (directory / "chat_template.jinja").write_text(JINJA_TEMPLATE)
        expected = "You are a jinja file."
    if variant in ("json", "json-over-jinja"):
        _drop_tokenizer_config_template(directory)
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": JSON_TEMPLATE}))
        expected = "You are a json file."
    processor = Qwen2_5_VLProcessor.from_pretrained(directory)
    for name in ("one-image", "openai-image-url", "multi-turn-early-image"):
        messages = CHATS[name]
        text = processor.apply_chat_template(messages)
        assert expected in text
        assert text.count("<|image_pad|>") == 1
        if (
            variant == "tokenizer_config"
        ):  # HF's processor reads only the two template files; its tokenizer this
            reference = AutoTokenizer.from_pretrained(directory).apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:
            reference = HFImageTextProcessor.from_pretrained(directory).apply_chat_template(
                messages, add_generation_prompt=True
            )
        assert text == reference


def test_config_variants(
    checkpoint: tuple[Path, dict[str, int]], tmp_path: Path, ours: Qwen2_5_VLProcessor
) -> None:
    directory, ids = checkpoint
    directory = _copy(directory, tmp_path)
    _write_config(directory, ids, nested=True)  # ids under text_config
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    del pre["min_pixels"], pre["max_pixels"]  # only the "size" dict is left
    (directory / "preprocessor_config.json").write_text(json.dumps(pre))
    (directory / "generation_config.json").unlink()
    processor = Qwen2_5_VLProcessor.from_pretrained(directory)
    assert (processor.image_token_id, processor.video_token_id, processor.vision_start_token_id) == (
        ids["image_pad"],
        ids["video_pad"],
        ids["vision_start"],
    )
    assert (processor.min_pixels, processor.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    assert processor.eos_token_ids == [ids["im_end"]]  # tokenizer_config's eos_token
    assert ours.eos_token_ids == [ids["im_end"], ids["endoftext"]]  # generation_config.json
    assert (ours.spatial_merge_size, ours.patch_size, ours.temporal_patch_size, ours.tokens_per_second) == (
        2,
        14,
        2,
        2,
    )


def test_flat_pixel_fields_win_over_size() -> None:
    cfg = ImageProcessorConfig.from_dict(
        {"min_pixels": 1000, "max_pixels": 90000, "size": {"shortest_edge": 5, "longest_edge": 6}}
    )
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 90000)


@pytest.mark.parametrize("missing", ["tokenizer.json", "config.json", "preprocessor_config.json"])
def test_missing_file_is_named(checkpoint: tuple[Path, dict[str, int]], tmp_path: Path, missing: str) -> None:
    directory = _copy(checkpoint[0], tmp_path)
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError) as err:
        Qwen2_5_VLProcessor.from_pretrained(directory)
    assert missing in str(err.value)
    assert str(directory) in str(err.value)


def test_missing_chat_template_is_named(checkpoint: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    directory = _copy(checkpoint[0], tmp_path)
    (directory / "chat_template.json").unlink()
    _drop_tokenizer_config_template(directory)
    with pytest.raises(FileNotFoundError, match=r"chat_template\.jinja"):
        Qwen2_5_VLProcessor.from_pretrained(directory)
