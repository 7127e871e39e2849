"""Synthetic images and chat questions for the demo model, deterministic from (seed, index).

Owns: what a scene is (shape, colour, count, position, background, image size, JPEG quality), drawing it
with PIL, the questions asked about it (a few phrasings per kind) with short canonical answers, JSON answers
(`{"shape":"circle","colour":"red"}`, written exactly as schema-constrained decoding writes them) to
questions that ask for JSON, and reading the key word back out of a model's answer for exact-match
evaluation.

Does not know about tokens, tensors or the model: train.py turns samples into model inputs with the real
processor, evaluate.py sends them through the real engine.

Every random choice comes from one `numpy.random.Generator` seeded with [seed, index], so sample i of a seed
is the same on every machine and in every worker process, whatever order samples are drawn in.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Object colours (RGB centres; each object gets a small random jitter around them).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 35),
    "orange": (240, 130, 25),
    "purple": (130, 50, 170),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
# Background colours (a subset of names a user would say; textures stay light enough to keep the name true).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": (60, 100, 210),
    "green": (60, 160, 80),
    "yellow": (240, 220, 80),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
MAX_COUNT = 4
POSITIONS: dict[str, str] = {
    "left": "On the left.",
    "right": "On the right.",
    "top": "At the top.",
    "bottom": "At the bottom.",
    "center": "In the center.",
}
TEXTURES: tuple[str, ...] = ("plain", "noise", "gradient", "stripes")

# The kinds of question; every kind but "describe" is an evaluation category with a one-word key.
CATEGORIES: tuple[str, ...] = ("colour", "shape", "count", "position")
KINDS: tuple[str, ...] = ("describe", *CATEGORIES)

# The JSON answer kind: not an evaluation category of its own (its answer holds several key words), and only
# in streams that ask for it (make_sample's json_share), so the prose streams stay what they were.
JSON_KIND = "json"
# The keys a JSON answer can hold (position only for a single object); "color" is asked for too, as a
# schema written in American English spells it.
JSON_KEYS: tuple[str, ...] = ("shape", "colour", "color", "count", "position")

# Image sides before the processor resizes them; the aspect ratio is capped so "top" and "left" stay visible.
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 56, 336, 2.5
# Object colour vs background colour: closer than this (RGB distance) and the pair is not drawn.
MIN_CONTRAST = 120.0
# The held-out stream's seed; training streams use small seeds (0 by default).
EVAL_SEED = 1_000_003
# Drawing happens at this multiple of the output size and is downsampled: anti-aliased edges like a photo.
SUPERSAMPLE = 3

_DESCRIBE = (
    "What do you see in this image?",
    "Describe this image.",
    "What is in the picture?",
    "Describe the image in one sentence.",
    "What is shown here?",
)
_COLOUR_ONE = (
    "What colour is the shape?",
    "What color is the {shape}?",
    "What colour is it?",
    "Which colour does the object have?",
    "What color is the object in the image?",
)
_COLOUR_MANY = (
    "What colour are the shapes?",
    "What color are the {plural}?",
    "Which colour do the objects have?",
    "What colour are they?",
)
_SHAPE_ONE = (
    "What shape is this?",
    "What shape is in the image?",
    "Which shape do you see?",
    "What is the shape of the {colour} object?",
    "What shape is the object?",
)
_SHAPE_MANY = (
    "What shape are the objects?",
    "What shapes do you see?",
    "Which shape are the {colour} objects?",
    "What shape are they?",
)
_COUNT = (
    "How many {plural} are there?",
    "How many shapes are in the image?",
    "How many objects can you see?",
    "Count the {plural}.",
    "How many {colour} shapes are there?",
)
_POSITION = (
    "Where is the {shape}?",
    "Where is the shape?",
    "Where is the {colour} {shape}?",
    "Where in the image is the object?",
    "In which part of the image is the {shape}?",
)

# Questions that ask for JSON: on their own, naming the keys ({keys}: "shape and colour") ...
_JSON_KEYED = (
    "Describe the main shape as JSON with {keys}.",
    "Answer in JSON with the {keys}.",
    "Give the {keys} as JSON.",
    "Return a JSON object with the {keys} of the objects.",
    "What are the {keys}? Answer in JSON.",
)
# ... without naming them (answered with the scene's shape, colour and count) ...
_JSON_PLAIN = (
    "Describe this image as JSON.",
    "Describe the image in JSON.",
    "Give me the scene as JSON.",
)
# ... and appended to an ordinary question, the way a client that sends a JSON schema asks (OpenAI asks for
# an instruction to answer in JSON alongside its JSON modes). The keys then come from the schema, which the
# model does not see: these are answered with random keys, so that the value after each key is right
# whichever keys the constraint writes.
_JSON_SUFFIX = (
    " Answer in JSON.",
    " Reply with JSON.",
    " Respond in JSON.",
    " Give the answer as JSON.",
)


@dataclass(frozen=True)
class Scene:
    """What an image shows; everything an answer is derived from."""

    shape: str
    colour: str
    background: str
    texture: str
    count: int
    position: str | None  # for a single object: left, right, top, bottom or center; None when count > 1
    width: int
    height: int
    jpeg_quality: int | None  # re-encoded through JPEG at this quality, or None


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


@dataclass
class Sample:
    """One image and a conversation about it (the image comes with the first question)."""

    image: Image.Image
    scene: Scene
    turns: list[QA] = field(default_factory=list)

    def messages(self, with_answers: bool = True) -> list[dict[str, Any]]:
        """Chat-format messages (the format `LLM.chat` and the OpenAI API take). Without answers, the last
        assistant turn is left for the model."""
        out: list[dict[str, Any]] = []
        for i, qa in enumerate(self.turns):
            text = {"type": "text", "text": qa.question}
            content = [{"type": "image", "image": self.image}, text] if i == 0 else [text]
            out.append({"role": "user", "content": content})
            if with_answers:
                out.append({"role": "assistant", "content": qa.answer})
        return out


# ------------------------------------------------------------------------------------------- answers


def number_word(n: int) -> str:
    return NUMBERS[n]


def answer(scene: Scene, kind: str) -> str:
    """The canonical answer to a question of `kind` about `scene`."""
    many = scene.count > 1
    if kind == "describe":
        if many:
            what = f"{number_word(scene.count).capitalize()} {scene.colour} {PLURALS[scene.shape]}"
        else:
            what = f"{'An' if scene.colour[0] in 'aeiou' else 'A'} {scene.colour} {scene.shape}"
        return f"{what} on a {scene.background} background."
    if kind == "colour":
        return f"{scene.colour.capitalize()}."
    if kind == "shape":
        return f"{PLURALS[scene.shape].capitalize()}." if many else f"A {scene.shape}."
    if kind == "count":
        return f"{number_word(scene.count).capitalize()}."
    if kind == "position":
        if scene.position is None:
            raise ValueError("position questions need a scene with one object (count == 1)")
        return POSITIONS[scene.position]
    raise ValueError(f"unknown question kind {kind!r}; use one of {', '.join(KINDS)}")


def json_value(scene: Scene, key: str) -> str | int:
    """The value of JSON key `key` (one of JSON_KEYS) for `scene`: a name, or the count as a number."""
    if key == "shape":
        return scene.shape
    if key in ("colour", "color"):
        return scene.colour
    if key == "count":
        return scene.count
    if key == "position":
        if scene.position is None:
            raise ValueError("the position key needs a scene with one object (count == 1)")
        return scene.position
    raise ValueError(f"unknown JSON key {key!r}; use one of {', '.join(JSON_KEYS)}")


def json_answer(scene: Scene, keys: Sequence[str]) -> str:
    """`{"shape":"circle","colour":"red"}`: the keys in the order given, compact, as a JSON-schema constraint
    writes the object (the grammar engine allows no free whitespace and keeps the schema's key order)."""
    return json.dumps({k: json_value(scene, k) for k in keys}, separators=(",", ":"))


def json_schema(keys: Sequence[str]) -> dict[str, Any]:
    """The JSON schema a client sends for an object of `keys` (in that order): names as enums, the count as
    an integer in 1..MAX_COUNT, every key required, no others."""
    values: dict[str, dict[str, Any]] = {
        "shape": {"enum": list(SHAPES)},
        "colour": {"enum": list(COLOURS)},
        "color": {"enum": list(COLOURS)},
        "count": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
        "position": {"enum": list(POSITIONS)},
    }
    unknown = [k for k in keys if k not in values]
    if unknown:
        raise ValueError(f"unknown JSON keys {unknown}; use some of {', '.join(JSON_KEYS)}")
    return {
        "type": "object",
        "properties": {k: values[k] for k in keys},
        "required": list(keys),
        "additionalProperties": False,
    }


def _key_list(keys: Sequence[str]) -> str:
    """ "shape", "shape and colour", "shape, colour and count"."""
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"


def _json_keys(scene: Scene, rng: np.random.Generator) -> list[str]:
    """One to three keys in random order (one spelling of colour; position only for a single object)."""
    colour = "colour" if rng.random() < 0.7 else "color"
    usable = ["shape", colour, "count"] + (["position"] if scene.count == 1 else [])
    n = int(rng.integers(1, 4))
    return [usable[i] for i in rng.permutation(len(usable))[:n]]


def ask_json(scene: Scene, rng: np.random.Generator) -> QA:
    """A question that asks for JSON about `scene`, with its JSON answer: keys named in the question, or
    not named (shape, colour and count), or an ordinary question of any kind with an instruction to answer
    in JSON appended (random keys: a schema the model does not see picks them)."""
    form = rng.random()
    if form < 0.4:
        keys = _json_keys(scene, rng)
        template = _JSON_KEYED[int(rng.integers(len(_JSON_KEYED)))]
        question = template.format(keys=_key_list(keys))
    elif form < 0.5:
        keys = ["shape", "colour", "count"]
        question = _JSON_PLAIN[int(rng.integers(len(_JSON_PLAIN)))]
    else:
        usable = [k for k in KINDS if k != "position" or scene.count == 1]
        ordinary = ask(scene, usable[int(rng.integers(len(usable)))], rng)
        keys = _json_keys(scene, rng)
        question = ordinary.question + _JSON_SUFFIX[int(rng.integers(len(_JSON_SUFFIX)))]
    return QA(JSON_KIND, question, json_answer(scene, keys))


def expected_key(scene: Scene, kind: str) -> str:
    """The word an answer to a question of `kind` must contain (what evaluation compares)."""
    if kind == "colour":
        return scene.colour
    if kind == "shape":
        return scene.shape
    if kind == "count":
        return number_word(scene.count)
    if kind == "position":
        if scene.position is None:
            raise ValueError("position questions need a scene with one object (count == 1)")
        return scene.position
    raise ValueError(f"no single key word for kind {kind!r}; use one of {', '.join(CATEGORIES)}")


_KEY_WORDS: dict[str, dict[str, str]] = {
    "colour": {**{c: c for c in COLOURS}, "grey": "gray", "gray": "gray"},
    "shape": {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}},
    "count": {**{w: w for w in NUMBERS}, **{str(i): w for i, w in enumerate(NUMBERS)}},
    "position": {
        **{p: p for p in POSITIONS},
        "centre": "center",
        "middle": "center",
        "above": "top",
        "below": "bottom",
    },
}


def answer_key(kind: str, text: str) -> str | None:
    """The first key word of `kind` in a model's answer (plurals and spelling variants folded), or None."""
    if kind not in _KEY_WORDS:
        raise ValueError(f"no key word for kind {kind!r}; use one of {', '.join(CATEGORIES)}")
    table = _KEY_WORDS[kind]
    for raw in text.lower().replace("-", " ").split():
        word = raw.strip(".,;:!?\"'()")
        if table.get(word):
            return table[word]
    return None


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> QA:
    """A question of `kind` about `scene`, in one of a few phrasings, with its canonical answer."""
    many = scene.count > 1
    templates = {
        "describe": _DESCRIBE,
        "colour": _COLOUR_MANY if many else _COLOUR_ONE,
        "shape": _SHAPE_MANY if many else _SHAPE_ONE,
        "count": _COUNT,
        "position": _POSITION,
    }[kind]
    template = templates[int(rng.integers(len(templates)))]
    question = template.format(shape=scene.shape, plural=PLURALS[scene.shape], colour=scene.colour)
    return QA(kind, question, answer(scene, kind))


# What `scene_labels` returns, in order, and how many classes each has (the vision warm-up's targets).
LABELS: tuple[tuple[str, int], ...] = (
    ("shape", len(SHAPES)),
    ("colour", len(COLOURS)),
    ("count", MAX_COUNT),
    ("position", len(POSITIONS)),
    ("background", len(BACKGROUNDS)),
)


def scene_labels(scene: Scene) -> np.ndarray:
    """(len(LABELS),) int64 class indices of `scene` (count 1..4 -> 0..3; position -1 when count > 1)."""
    return np.array(
        [
            SHAPES.index(scene.shape),
            list(COLOURS).index(scene.colour),
            scene.count - 1,
            list(POSITIONS).index(scene.position) if scene.position is not None else -1,
            list(BACKGROUNDS).index(scene.background),
        ],
        dtype=np.int64,
    )


def corpus_lines() -> list[str]:
    """Every question and answer sentence the generator can produce (the demo tokenizer's extra corpus)."""
    lines: list[str] = []
    all_templates = (*_DESCRIBE, *_COLOUR_ONE, *_COLOUR_MANY, *_SHAPE_ONE, *_SHAPE_MANY, *_COUNT, *_POSITION)
    for shape in SHAPES:
        for colour in COLOURS:
            for t in all_templates:
                lines.append(t.format(shape=shape, plural=PLURALS[shape], colour=colour))
            for count in range(1, MAX_COUNT + 1):
                for bg in BACKGROUNDS:
                    scene = Scene(shape, colour, bg, "plain", count, None, 1, 1, None)
                    lines += [answer(scene, k) for k in ("describe", "colour", "shape", "count")]
    lines += list(POSITIONS.values())
    return lines


# ------------------------------------------------------------------------------------------- scenes


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def sample_scene(
    rng: np.random.Generator, size: tuple[int, int] | None = None, count: int | None = None
) -> Scene:
    """A random scene; `size` (width, height) and `count` pin those choices (tests use them)."""
    if size is None:
        short = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        long = int(rng.integers(short, min(MAX_SIDE, int(short * MAX_ASPECT)) + 1))
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
    else:
        width, height = size
    if count is None:
        # Single objects are 40%: they carry the position questions.
        count = 1 if rng.random() < 0.4 else int(rng.integers(2, MAX_COUNT + 1))
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count={count} is out of range; scenes hold 1 to {MAX_COUNT} objects")
    colour = str(rng.choice(list(COLOURS)))
    backgrounds = [
        b for b, rgb in BACKGROUNDS.items() if b != colour and _contrast(rgb, COLOURS[colour]) >= MIN_CONTRAST
    ]
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        background=str(rng.choice(backgrounds)),
        texture=str(rng.choice(TEXTURES)),
        count=count,
        position=str(rng.choice(list(POSITIONS))) if count == 1 else None,
        width=width,
        height=height,
        jpeg_quality=int(rng.integers(30, 96)) if rng.random() < 0.5 else None,
    )


def _unit_polygon(shape: str) -> np.ndarray:
    """(K, 2) outline of `shape` around (0, 0), radius about 1, y pointing down (image coordinates)."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        # Equilateral, apex up, centroid at the origin.
        a = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        return 1.15 * np.stack([np.cos(a), np.sin(a)], axis=1)
    if shape == "star":
        a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.15, 0.47)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    if shape == "cross":
        w, r = 0.32, 1.0
        return np.array(
            [
                [-w, -r],
                [w, -r],
                [w, -w],
                [r, -w],
                [r, w],
                [w, w],
                [w, r],
                [-w, r],
                [-w, w],
                [-r, w],
                [-r, -w],
                [-w, -w],
            ]
        )
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _place(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) of each object, in output pixels; objects never overlap or leave the image."""
    w, h = scene.width, scene.height
    short = min(w, h)
    if scene.count == 1:
        r = short * rng.uniform(0.13, 0.22)
        lo, hi = 0.38, 0.62
        ranges = {
            "left": ((0.10, 0.28), (lo, hi)),
            "right": ((0.72, 0.90), (lo, hi)),
            "top": ((lo, hi), (0.10, 0.28)),
            "bottom": ((lo, hi), (0.72, 0.90)),
            "center": ((0.45, 0.55), (0.45, 0.55)),
        }
        (x0, x1), (y0, y1) = ranges[scene.position or "center"]
        cx = float(np.clip(rng.uniform(x0, x1) * w, r + 1, w - r - 1))
        cy = float(np.clip(rng.uniform(y0, y1) * h, r + 1, h - r - 1))
        return [(cx, cy, r)]
    scale = rng.uniform(0.10, 0.15)
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = short * scale * rng.uniform(0.85, 1.15)
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            # Bounding discs (the star's points reach 1.15 r) apart by a gap, so objects stay countable.
            if all(math.hypot(cx - x, cy - y) > 1.2 * (r + q) + 2 for x, y, q in placed):
                placed.append((float(cx), float(cy), float(r)))
                if len(placed) == scene.count:
                    return placed
        scale *= 0.85  # did not fit: smaller objects, try again


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 background: the named colour, jittered, with a light texture."""
    h, w = scene.height, scene.width
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32) + rng.uniform(-12, 12, 3)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if scene.texture == "noise":
        img += rng.normal(0, rng.uniform(4, 10), (h, w, 1)).astype(np.float32)
    elif scene.texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (xs / w - 0.5) * np.cos(angle) + (ys / h - 0.5) * np.sin(angle)  # (H, W) in [-0.7, 0.7]
        img += (rng.uniform(20, 40) * ramp)[..., None]
    elif scene.texture == "stripes":
        period = rng.uniform(6, 24)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period)
        img += (rng.uniform(5, 12) * np.sin(phase))[..., None]
    return img


def draw_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render `scene` as an RGB image of scene.width x scene.height (JPEG re-encoded if the scene says so)."""
    img = _background(scene, rng)
    s = SUPERSAMPLE
    rotation = np.deg2rad(rng.uniform(-15, 15))  # all objects of a scene share it
    rot = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    base = np.array(COLOURS[scene.colour], dtype=np.float32)
    for cx, cy, r in _place(scene, rng):
        stretch = rng.uniform(0.9, 1.1, 2)  # small anisotropic scale jitter
        pts = (_unit_polygon(scene.shape) * stretch) @ rot.T * r + (cx, cy)  # (K, 2) output pixels
        # Draw only the object's bounding box (at SUPERSAMPLE x), then blend it into that region.
        x0, y0 = (max(0, int(v) - 1) for v in pts.min(0))
        x1, y1 = min(scene.width, int(pts[:, 0].max()) + 2), min(scene.height, int(pts[:, 1].max()) + 2)
        mask = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
        ImageDraw.Draw(mask).polygon([((x - x0) * s, (y - y0) * s) for x, y in pts.tolist()], fill=255)
        small = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        alpha = np.asarray(small, np.float32)[..., None] / 255  # (h, w, 1)
        colour = np.clip(base + rng.uniform(-15, 15, 3), 0, 255)
        region = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = region * (1 - alpha) + colour * alpha
    out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")
    if scene.jpeg_quality is not None:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=scene.jpeg_quality)
        buf.seek(0)
        out = Image.open(buf).convert("RGB")
    return out


def make_sample(
    seed: int,
    index: int,
    kinds: Sequence[str] | None = None,
    max_turns: int = 3,
    size: tuple[int, int] | None = None,
    count: int | None = None,
    json_share: float = 0.0,
) -> Sample:
    """Sample `index` of the stream `seed`: an image and 1..max_turns questions about it.

    `kinds` fixes the questions asked, in order (evaluation asks one kind at a time; JSON_KIND asks for a
    JSON answer); otherwise a random subset of the kinds that apply (position only for a single object), in
    random order, and with probability `json_share` one of them (chosen at random) asks for JSON instead.
    With json_share 0 (the default) no extra random draw is made: the streams are those the shipped model
    was first trained on.
    """
    rng = np.random.default_rng([seed, index])
    if kinds is not None and "position" in kinds and count is None:
        count = 1
    scene = sample_scene(rng, size=size, count=count)
    image = draw_scene(scene, rng)
    if kinds is None:
        usable = [k for k in KINDS if k != "position" or scene.count == 1]
        n = int(rng.integers(1, min(max_turns, len(usable)) + 1))
        kinds = [usable[i] for i in rng.permutation(len(usable))[:n]]
        if json_share > 0 and rng.random() < json_share:
            kinds[int(rng.integers(len(kinds)))] = JSON_KIND
    turns = [ask_json(scene, rng) if k == JSON_KIND else ask(scene, k, rng) for k in kinds]
    return Sample(image=image, scene=scene, turns=turns)


def heldout_sample(kind: str, i: int) -> Sample:
    """Evaluation sample `i` of question kind `kind`: the held-out seed (training uses others), its own index
    range per kind, one question. Both the training loop's and the engine's evaluation use these."""
    order = (*KINDS, JSON_KIND)
    if kind not in order:
        raise ValueError(f"unknown question kind {kind!r}; use one of {', '.join(order)}")
    return make_sample(EVAL_SEED, order.index(kind) * 1_000_000 + i, kinds=[kind])


def make_example(
    seed: int, kind: str, size: tuple[int, int] | None = None, count: int | None = None
) -> tuple[Image.Image, str, str]:
    """(image, question, expected key word) for one evaluation question of `kind` (a category)."""
    if kind not in CATEGORIES:
        raise ValueError(f"kind {kind!r} has no key word; use one of {', '.join(CATEGORIES)}")
    sample = make_sample(seed, 0, kinds=[kind], size=size, count=count)
    return sample.image, sample.turns[0].question, expected_key(sample.scene, kind)
