"""The demo model that ships with vlmserve: its files, its answers through the real engine, its training code.

The answer tests are what catches a broken image path: a wrong resize, normalisation, channel order or patch
layout, or a stale prefix / encoder cache, turns the trained model's colour answers (right on every held-out
image) into guesses (chance is 1/8). Images come from the project's generator with seeds that neither
training nor the held-out evaluation uses, in sizes and aspect ratios that take every resize path (kept,
rounded, upscaled to min_pixels, downscaled to max_pixels).

`generated_case` is the helper the HTTP end-to-end tests reuse: an image, a question and the expected key
word, with the image's PNG bytes for data URLs, files and a local HTTP server.
"""

from __future__ import annotations

import io
import json
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlmserve.checkpoints.checkpoint import tensor_shapes
from vlmserve.checkpoints.export import released_state_dict
from vlmserve.demo import PACKAGED, demo_checkpoint
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM
from vlmserve.models.generate import prompt_embeddings
from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.models.loader import cpu_has_native_bf16, load_model
from vlmserve.models.processor import Qwen2_5_VLProcessor
from vlmserve.training import data
from vlmserve.training.evaluate import run_eval, summarize
from vlmserve.training.train import (
    DEMO_MAX_PIXELS,
    DEMO_MIN_PIXELS,
    Encoder,
    SceneHeads,
    TrainArgs,
    collate,
    forward_answers,
    scene_losses,
    train,
)

# Seeds far from training (0) and evaluation (data.EVAL_SEED).
TEST_SEED = 7_000_000
# (width, height): kept as is, rounded to multiples of 28, upscaled to min_pixels, downscaled to max_pixels,
# and aspect ratios beyond the training range.
SIZES: tuple[tuple[int, int], ...] = ((224, 224), (250, 90), (90, 250), (60, 70), (640, 480), (1000, 300))
MAX_SHIPPED_BYTES = 20 * 2**20


@dataclass(frozen=True)
class DemoCase:
    """A generated image, a question about it and the key word a right answer contains."""

    kind: str  # colour, shape, count or position
    image: Image.Image
    question: str
    expected: str

    def messages(self) -> list[dict[str, Any]]:
        return [
            {
                "role": "user",
                "content": [{"type": "image", "image": self.image}, {"type": "text", "text": self.question}],
            }
        ]

    def png_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()

    def is_right(self, answer: str) -> bool:
        return data.answer_key(self.kind, answer) == self.expected


def generated_case(
    seed: int, kind: str, size: tuple[int, int] | None = None, count: int | None = None
) -> DemoCase:
    """A fresh image + question of `kind` (colour, shape, count, position); the same seed and size give the
    same image for every kind, so two kinds of one seed ask about one image."""
    image, question, expected = data.make_example(TEST_SEED + seed, kind, size=size, count=count)
    return DemoCase(kind, image, question, expected)


def score(cases: list[DemoCase], answers: list[str]) -> tuple[int, list[str]]:
    wrong = [
        f"{c.kind} {c.image.size}: {c.question!r} -> {a!r} (expected {c.expected!r})"
        for c, a in zip(cases, answers, strict=True)
        if not c.is_right(a)
    ]
    return len(cases) - len(wrong), wrong


# ------------------------------------------------------------------------------------ shipped files


def test_demo_is_the_packaged_checkpoint_and_small() -> None:
    assert demo_checkpoint() == PACKAGED
    files = {p.name: p.stat().st_size for p in PACKAGED.iterdir() if p.is_file()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert name in files, f"{name} missing from {PACKAGED}"
    assert sum(files.values()) < MAX_SHIPPED_BYTES, files
    pre = json.loads((PACKAGED / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (DEMO_MIN_PIXELS, DEMO_MAX_PIXELS)
    with safe_open(str(PACKAGED / "model.safetensors"), framework="pt") as st:
        assert {st.get_slice(n).get_dtype() for n in st.keys()} == {"BF16"}  # noqa: SIM118


def test_weights_use_released_names_and_round_trip() -> None:
    """Saved under the released tensor names (q/k/v and gate/up separate), and re-exporting the loaded model
    gives back exactly the stored tensors."""
    config = json.loads((PACKAGED / "config.json").read_text())
    model = load_model(PACKAGED, dtype=torch.bfloat16, progress=False)
    exported = released_state_dict(model)
    assert {n: tuple(t.shape) for n, t in exported.items()} == tensor_shapes(config)
    with safe_open(str(PACKAGED / "model.safetensors"), framework="pt") as st:
        for name in st.keys():  # noqa: SIM118
            assert torch.equal(st.get_tensor(name), exported[name]), name


def test_logits_match_hf_transformers() -> None:
    """The shipped checkpoint means the same thing to HF transformers (the reference) as to us."""
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    from tests.hf_reference import HFImageTextProcessor

    ours = load_model(PACKAGED, dtype="float32", progress=False)
    ref = HFModel.from_pretrained(PACKAGED, dtype=torch.float32).eval()
    proc = Qwen2_5_VLProcessor.from_pretrained(PACKAGED)
    hf_proc = HFImageTextProcessor.from_pretrained(PACKAGED)
    case = generated_case(0, "shape", size=(250, 90))
    text = proc.apply_chat_template(case.messages())
    ours_in = proc.process(text, [case.image])
    hf_in = hf_proc(text=[text], images=[case.image], return_tensors="pt")
    assert ours_in.token_ids == hf_in["input_ids"][0].tolist()
    with torch.inference_mode():
        expected = ref(**hf_in).logits[0]  # (L, V)
        x = prompt_embeddings(ours, ours_in.token_ids, ours_in.images)
        cache = ContiguousKVCache(len(ours.model.layers), ours.model.layers[0].self_attn.head_dim ** -0.5)
        got = ours.compute_logits(ours(x, ours_in.mrope_positions, cache))
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


# ------------------------------------------------------------------------------ answers, via the engine


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", device="cpu", seed=0)


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_names_the_colour_at_every_size(llm: LLM) -> None:
    cases = [generated_case(i, "colour", size=size) for i, size in enumerate(SIZES)]
    outs = llm.chat([c.messages() for c in cases], GREEDY)
    right, wrong = score(cases, [o.text for o in outs])
    assert right >= len(cases) - 1, wrong

    # The same requests again: served from the prefix cache (image tokens included), same answers.
    again = llm.chat([c.messages() for c in cases], GREEDY)
    assert [o.text for o in again] == [o.text for o in outs]
    assert all(o.num_cached_tokens > 0 for o in again)


def test_names_the_shape_at_every_size(llm: LLM) -> None:
    cases = [generated_case(i, "shape", size=size) for i, size in enumerate(SIZES)]
    right, wrong = score(cases, [o.text for o in llm.chat([c.messages() for c in cases], GREEDY)])
    assert right >= len(cases) - 1, wrong


def test_counts_one_to_four_objects(llm: LLM) -> None:
    cases = [
        generated_case(100 + 10 * n + i, "count", size=size, count=n)
        for n in range(1, data.MAX_COUNT + 1)
        for i, size in enumerate(((224, 224), (300, 200), (160, 240)))
    ]
    right, wrong = score(cases, [o.text for o in llm.chat([c.messages() for c in cases], GREEDY)])
    assert right >= len(cases) - 1, wrong


def test_says_where_the_object_is(llm: LLM) -> None:
    cases = [generated_case(400 + i, "position", size=(280, 210)) for i in range(10)]
    assert len({c.expected for c in cases}) >= 4  # the seeds cover most positions, not one answer ten times
    right, wrong = score(cases, [o.text for o in llm.chat([c.messages() for c in cases], GREEDY)])
    assert right >= len(cases) - 1, wrong


def test_heldout_accuracy_floors(llm: LLM) -> None:
    """The evaluation the README reports, on 25 held-out questions per category: what a broken resize,
    normalisation, position encoding or cache would pull towards chance (12.5 to 25%). JSON questions are
    asked under their keys' schema and must give the whole object right."""
    table = summarize(run_eval(llm, 25, (*data.KINDS, data.JSON_KIND)))
    accuracy = {kind: row["accuracy"] for kind, row in table.items()}
    floors = {"colour": 0.96, "shape": 0.88, "count": 0.92, "position": 0.92, "describe": 0.8, "json": 0.8}
    assert all(accuracy[k] >= floor for k, floor in floors.items()), accuracy


def test_answers_in_the_form_of_each_question(llm: LLM) -> None:
    """Shape, count and position answers are one of the words the question asks for, in the trained form."""
    cases = [generated_case(i, kind, size=(280, 210)) for i in range(4) for kind in ("shape", "count")]
    cases += [generated_case(300 + i, "position", size=(280, 210)) for i in range(4)]
    for case, out in zip(cases, llm.chat([c.messages() for c in cases], GREEDY), strict=True):
        assert data.answer_key(case.kind, out.text) is not None, (case.question, out.text)
        assert out.outputs[0].finish_reason == "stop", (case.question, out.text)


def test_describes_the_scene(llm: LLM) -> None:
    samples = [
        data.make_sample(TEST_SEED + 200 + i, 0, kinds=["describe"], size=(320, 240), count=n)
        for i, n in enumerate((1, 2, 3, 4))
    ]
    outs = llm.chat([s.messages(with_answers=False) for s in samples], GREEDY)
    exact = [o.text == s.turns[0].answer for s, o in zip(samples, outs, strict=True)]
    assert sum(exact) >= len(samples) - 1, [
        (s.turns[0].answer, o.text) for s, o in zip(samples, outs, strict=True)
    ]


# ---------------------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_covers_every_category() -> None:
    a, b = data.make_sample(3, 17), data.make_sample(3, 17)
    assert a.scene == b.scene and a.turns == b.turns
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(data.make_sample(3, 18).image))

    samples = [data.make_sample(0, i, max_turns=5) for i in range(300)]
    scenes = [s.scene for s in samples]
    assert {s.shape for s in scenes} == set(data.SHAPES)
    assert {s.colour for s in scenes} == set(data.COLOURS)
    assert {s.count for s in scenes} == set(range(1, data.MAX_COUNT + 1))
    assert {s.position for s in scenes if s.count == 1} == set(data.POSITIONS)
    assert {s.background for s in scenes} == set(data.BACKGROUNDS)
    assert {s.texture for s in scenes} == set(data.TEXTURES)
    assert {s.jpeg_quality is None for s in scenes} == {True, False}
    assert {qa.kind for s in samples for qa in s.turns} == set(data.KINDS)
    widths, heights = zip(*(s.image.size for s in samples), strict=True)
    assert min(widths + heights) < 100 and max(widths + heights) > 300
    for s in samples:
        assert s.image.size == (s.scene.width, s.scene.height) and s.image.mode == "RGB"
        assert s.scene.background != s.scene.colour
        for qa in s.turns:
            if qa.kind in data.CATEGORIES:
                # Canonical answers carry their key word, which the evaluation reads back.
                assert data.answer_key(qa.kind, qa.answer) == data.expected_key(s.scene, qa.kind)


def test_json_answers_are_what_a_schema_constraint_writes() -> None:
    """Training's JSON answers are the very text that decoding under their keys' JSON schema can write (the
    grammar allows no free whitespace and keeps the schema's key order), token for token with the demo
    tokenizer, and they hold the scene's values."""
    import jsonschema
    import llguidance

    from vlmserve.engine.sampling_params import StructuredOutputsParams
    from vlmserve.engine.structured import grammar_for

    tokenizer = llguidance.LLTokenizer((PACKAGED / "tokenizer.json").read_text())
    samples = [data.make_sample(TEST_SEED, i, json_share=1.0) for i in range(60)]
    turns = [(s.scene, qa) for s in samples for qa in s.turns if qa.kind == data.JSON_KIND]
    assert len(turns) == len(samples)  # json_share 1: one JSON question in every conversation
    assert {k for _, qa in turns for k in json.loads(qa.answer)} == set(data.JSON_KEYS)
    for scene, qa in turns:
        document = json.loads(qa.answer)
        keys = list(document)
        assert document == {k: data.json_value(scene, k) for k in keys}
        schema = data.json_schema(keys)
        jsonschema.validate(document, schema)
        matcher = llguidance.LLMatcher(tokenizer, grammar_for(StructuredOutputsParams(json=schema)))
        assert matcher.consume_tokens(tokenizer.tokenize_str(qa.answer)), (qa.answer, matcher.get_error())
        assert matcher.is_accepting(), qa.answer
    # Without json_share the streams are the prose ones the first two stages were trained on.
    assert all(qa.kind != data.JSON_KIND for i in range(60) for qa in data.make_sample(TEST_SEED, i).turns)


def test_answer_key_reads_free_form_answers() -> None:
    assert data.answer_key("colour", "It is Red.") == "red"
    assert data.answer_key("shape", "Three blue stars.") == "star"
    assert data.answer_key("count", "There are 3.") == "three"
    assert data.answer_key("position", "In the centre.") == "center"
    assert data.answer_key("shape", "I don't know.") is None


# ------------------------------------------------------------------------------------------ training


def test_packed_training_forward_matches_one_sequence_at_a_time() -> None:
    """The training backend (block-causal attention over packed conversations) computes the same logits as
    the serving model run on each conversation alone."""
    model = load_model(PACKAGED, dtype="float32", progress=False)
    enc = Encoder(PACKAGED)
    samples = [data.make_sample(TEST_SEED, i, max_turns=3) for i in range(3)]
    encoded = [enc.encode(s) for s in samples]
    with torch.inference_mode():
        packed, _, _ = forward_answers(model, collate(encoded), torch.device("cpu"))
        alone = []
        for e in encoded:
            single, _, _ = forward_answers(model, collate([e]), torch.device("cpu"))
            alone.append(single)
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-4, rtol=1e-4)

    # And one conversation through the training path equals the serving path (contiguous KV cache).
    proc = Qwen2_5_VLProcessor.from_pretrained(PACKAGED)
    e, s = encoded[0], samples[0]
    p = proc.process(proc.apply_chat_template(s.messages(), add_generation_prompt=False), [s.image])
    # Training ships patches to the device in float16; round the serving input the same way to compare.
    images = [replace(f, data=f.data._replace(values=f.data.values.half().float())) for f in p.images]
    with torch.inference_mode():
        x = prompt_embeddings(model, p.token_ids, images)
        cache = ContiguousKVCache(len(model.model.layers), model.model.layers[0].self_attn.head_dim ** -0.5)
        ref = model.compute_logits(model(x, p.mrope_positions, cache))[torch.from_numpy(e.targets != -100)]
    torch.testing.assert_close(alone[0], ref, atol=1e-4, rtol=1e-4)


def test_training_script_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(
        TrainArgs(out=str(out), steps=2, vision_steps=2, batch_size=2, eval_per_category=1, log_every=1)
    )
    assert summary["steps"] == 2
    assert summary["vision_warm_up"]["steps"] == 2
    assert json.loads((out / "training.json").read_text())["steps"] == 2
    model = load_model(out, progress=False)  # declared bfloat16, as the packaged demo model
    assert next(model.parameters()).dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    proc = Qwen2_5_VLProcessor.from_pretrained(out)
    assert (proc.min_pixels, proc.max_pixels) == (DEMO_MIN_PIXELS, DEMO_MAX_PIXELS)


def test_json_stage_trains_the_language_model_only(tmp_path: Path) -> None:
    """The third stage's options: --freeze-vision leaves every vision weight as it was while the language
    model moves, and --json-share puts JSON questions in the held-out accuracy."""
    out = tmp_path / "json-stage"
    summary = train(
        TrainArgs(
            out=str(out),
            init=str(PACKAGED),
            steps=2,
            batch_size=2,
            lr=1e-3,
            eval_per_category=1,
            json_share=1.0,
            freeze_vision=True,
        )
    )
    assert "json" in summary["heldout_teacher_forced"][-1]
    before, after = PACKAGED / "model.safetensors", out / "model.safetensors"
    with safe_open(str(before), framework="pt") as a, safe_open(str(after), framework="pt") as b:
        same = {n: torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in a.keys()}  # noqa: SIM118
    assert all(v for n, v in same.items() if n.startswith("visual.")), "a vision weight changed"
    assert not all(v for n, v in same.items() if n.startswith("model.")), "the language model did not train"


def test_vision_warm_up_loss_is_finite_without_single_objects() -> None:
    """Position is a label only of one-object scenes; a batch of many-object scenes must not give NaN."""
    model_dir = Path(PACKAGED)
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    enc = Encoder(model_dir)
    batch = collate([enc.encode(data.make_sample(TEST_SEED, i, count=3)) for i in range(2)])
    heads = SceneHeads(model.config.vision.out_hidden_size)
    loss, accuracy = scene_losses(model, heads, batch, torch.device("cpu"))
    assert torch.isfinite(loss) and loss > 0
    assert accuracy["position"] == 0 and set(accuracy) == {name for name, _ in data.LABELS}
    loss.backward()
    assert all(p.grad is not None for p in model.visual.parameters())


def test_make_demo_model_commands_parse() -> None:
    """`make demo-model` (the documented way to retrain the shipped weights, GPU only) passes flags the
    training CLI still takes, with the stage settings docs/DEMO_MODEL.md gives."""
    from vlmserve.training.train import parse_args

    dry = subprocess.run(
        ["make", "-n", "demo-model", "PY=python3"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    stages = [shlex.split(line) for line in dry if "vlmserve.training.train" in line]
    assert len(stages) == 3, dry
    first, second, third = (parse_args(cmd[cmd.index("vlmserve.training.train") + 1 :]) for cmd in stages)
    assert (first.init, first.vision_minutes, first.minutes, first.lr) == (None, 4.0, 4.2, 1e-3)
    assert (second.init, second.seed, second.vision_minutes, second.minutes) == ("demo_stage1", 2, 3.0, 5.5)
    assert first.device == second.device == "cuda"
    # The JSON-answer fine-tune, as the shipped training.json records it.
    shipped = json.loads((PACKAGED / "training.json").read_text())["stage3"]["args"]
    assert (third.init, third.out) == (second.out, "demo_model")
    for name in ("seed", "device", "threads", "batch_size", "lr", "warmup", "json_share", "freeze_vision"):
        assert getattr(third, name) == shipped[name], name
    assert (third.steps, third.minutes) == (shipped["steps"], shipped["minutes"])
    assert any("vlmserve.training.evaluate" in line for line in dry)
