"""Every model family in the registry against HF transformers' own class for it, on CPU in float32, plus the
registry itself and one run of each family through the engine.

For each family a tiny random checkpoint is written in the family's released layout (config.json, tensor
names, preprocessor_config.json, chat template) and loaded by vlmserve and by HF: logits within the tolerance
of tests/test_model_parity.py for text-only, one-image, several-image and multi-turn prompts, 32 greedy tokens
equal to HF's `generate`, pixel values equal to HF's image processor and M-RoPE positions equal to HF's
`get_rope_index`; the engine's batched, chunked, prefix-cached path gives the tokens of a one-request loop.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import random_image
from tests.hf_reference import hf_image_text_processor_class
from tests.test_model_parity import PROMPTS, assert_greedy_matches, assert_logits_match
from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM
from vlmserve.models import registry
from vlmserve.models.generate import greedy_generate
from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.models.loader import CheckpointError, load_model
from vlmserve.models.processor import Qwen2_5_VLProcessor

IMG_PART = {"type": "image"}

# family (the generator's name) -> HF transformers class of the same architecture.
HF_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


@pytest.fixture(scope="module", params=list(HF_CLASSES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp(family), seed=1, family=family)


@pytest.fixture(scope="module")
def models(family: str, checkpoint: Path):
    ours = load_model(checkpoint, dtype="float32", progress=False)
    ref = getattr(transformers, HF_CLASSES[family]).from_pretrained(checkpoint, dtype=torch.float32).eval()
    proc = Qwen2_5_VLProcessor.from_pretrained(checkpoint)
    hf_proc = hf_image_text_processor_class(family).from_pretrained(checkpoint)
    return ours, ref, proc, hf_proc


def _inputs(models, name: str):
    _, _, proc, hf_proc = models
    messages, sizes = PROMPTS[name]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = proc.apply_chat_template(messages)
    assert text == hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ours_in = proc.process(text, images)
    hf_in = hf_proc(text=[text], images=images or None, return_tensors="pt")
    assert ours_in.token_ids == hf_in["input_ids"][0].tolist()
    return ours_in, hf_in


# ----------------------------------------------------------------------------------------------- registry


def test_registry_maps_every_architecture_to_its_family(family: str, checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    fam = registry.family_for_config(config)
    assert config["architectures"][0] in fam.architectures
    # Without "architectures", model_type decides.
    assert registry.family_for_config({"model_type": config["model_type"]}) is fam


def test_each_supported_architecture_loads(tmp_path: Path) -> None:
    generated = {
        json.loads((write_checkpoint(tmp_path / f, family=f, weights=False) / "config.json").read_text())[
            "architectures"
        ][0]: f
        for f in ("qwen2_5_vl", *HF_CLASSES)
    }
    assert sorted(generated) == sorted(registry.supported_architectures())
    for arch, fam in generated.items():
        model = load_model(write_checkpoint(tmp_path / f"w-{fam}", family=fam), "float32", progress=False)
        assert type(model).__name__ == arch
        # --load-format dummy (benchmarks of the released sizes) builds the same class from config.json alone.
        dummy = load_model(tmp_path / fam, "float32", progress=False, load_format="dummy")
        assert type(dummy).__name__ == arch
        ids = torch.arange(8)
        cache = ContiguousKVCache(len(dummy.model.layers), dummy.model.layers[0].self_attn.head_dim ** -0.5)
        with torch.inference_mode():
            logits = dummy.compute_logits(dummy(dummy.embed(ids), ids.expand(3, -1), cache))
        assert logits.shape == (8, dummy.config.text.vocab_size) and logits.isfinite().all()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, weights=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MllamaForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(path, progress=False)
    for arch in ["MllamaForConditionalGeneration", *registry.supported_architectures()]:
        assert arch in str(err.value)


def test_a_checkpoint_saved_by_transformers_loads_the_same(models, checkpoint: Path, tmp_path: Path) -> None:
    """A local copy re-saved by transformers 5 (its config.json layout and tensor names, MoE experts in its
    (experts, out, in) layout) gives the same model."""
    ours, ref, _, _ = models
    ref.save_pretrained(tmp_path)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    again = load_model(tmp_path, "float32", progress=False)
    assert again.config.text == ours.config.text and again.config.vision == ours.config.vision
    expected = ours.state_dict()
    for name, tensor in again.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_missing_unexpected_and_misshapen_tensors_are_named(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    fused = next(k for k in tensors if k.endswith("self_attn.k_proj.weight"))  # a shard of qkv_proj
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != fused}, "lacks 1 tensor"),
        "unexpected": ({**tensors, "model.extra.weight": torch.zeros(1)}, "'model.extra.weight'"),
        "misshapen": ({**tensors, fused: tensors[fused][:-1]}, "shape mismatch for " + repr(fused)),
    }
    for name, (weights, message) in cases.items():
        path = tmp_path / name
        path.mkdir()
        for f in checkpoint.iterdir():
            if f.name != "model.safetensors":
                (path / f.name).write_bytes(f.read_bytes())
        save_file(weights, str(path / "model.safetensors"))
        with pytest.raises(CheckpointError if name == "missing" else ValueError, match=re.escape(message)):
            load_model(path, progress=False)


# ----------------------------------------------------------------------------------------- against HF


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_reference(models, prompt: str) -> None:
    ours, ref, _, _ = models
    assert_logits_match(ours, ref, *_inputs(models, prompt), prompt)


@pytest.mark.parametrize("prompt", ["one-image", "three-images"])
def test_greedy_32_tokens_match_generate(models, prompt: str) -> None:
    ours, ref, _, _ = models
    assert_greedy_matches(ours, ref, *_inputs(models, prompt))


@pytest.mark.parametrize("prompt", ["one-image", "three-images", "multi-turn-early-image"])
def test_pixel_values_and_positions_match_hf(models, prompt: str) -> None:
    _, ref, _, _ = models
    ours_in, hf_in = _inputs(models, prompt)
    pixels = torch.cat([img.data.values for img in ours_in.images])
    assert pixels.shape == hf_in["pixel_values"].shape
    assert torch.allclose(pixels, hf_in["pixel_values"], atol=1e-5, rtol=0)
    assert [tuple(img.data.grid_thw) for img in ours_in.images] == [
        tuple(g) for g in hf_in["image_grid_thw"].tolist()
    ]
    positions, delta = ref.model.get_rope_index(
        hf_in["input_ids"], hf_in["mm_token_type_ids"], image_grid_thw=hf_in["image_grid_thw"]
    )
    assert torch.equal(ours_in.mrope_positions, positions[:, 0])
    assert ours_in.mrope_delta == int(delta[0])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "count_shapes",
            "description": "Count the shapes of one colour.",
            "parameters": {"type": "object", "properties": {"colour": {"type": "string"}}},
        },
    }
]
CONVERSATIONS = {
    "system-and-images": (
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [IMG_PART, {"type": "text", "text": "Colour?"}, IMG_PART]},
        ],
        None,
    ),
    "tool-call-round-trip": (
        [
            {"role": "user", "content": [IMG_PART, {"type": "text", "text": "How many red shapes?"}]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "count_shapes", "arguments": {"colour": "red"}}}],
            },
            {"role": "tool", "content": "3"},
        ],
        TOOLS,
    ),
    "multi-turn-text": (
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "Describe a red circle."},
        ],
        None,
    ),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_like_hf(models, name: str) -> None:
    _, _, proc, hf_proc = models
    messages, tools = CONVERSATIONS[name]
    expected = hf_proc.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert proc.apply_chat_template(messages, tools=tools) == expected


# ----------------------------------------------------------------------------------------- the engine


def test_engine_batched_equals_one_at_a_time(checkpoint: Path) -> None:
    """Chunked prefill, prefix cache and encoder cache on: each request's greedy tokens equal the plain loop."""
    llm = LLM(
        str(checkpoint),
        max_model_len=512,
        max_num_batched_tokens=16,  # chunks of 16 tokens: images are split across steps
        max_num_seqs=6,
        block_size=16,
        device="cpu",
        dtype="float32",
    )
    rng = random.Random(0)
    shared = random_image(64, 64, seed=100)  # repeated: prefix-cache and encoder-cache hits
    prompts = []
    for i in range(6):
        images = (
            [shared] if i % 3 == 0 else [random_image(rng.randint(30, 90), rng.randint(30, 90), i)] * (i % 3)
        )
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"Describe it, {i}."}]
        prompts.append((llm.processor.apply_chat_template([{"role": "user", "content": parts}]), images))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    requests = [llm.make_request(text, images, params) for text, images in prompts]
    outputs = llm.run(requests)
    assert llm.engine.stats()["prefix_cache_hits"] > 0
    for req, out in zip(requests, outputs, strict=True):
        expected = greedy_generate(
            llm.engine.model, req.prompt_token_ids, req.images, req.mrope_positions, req.mrope_delta, 8
        )
        assert out.outputs[0].token_ids == expected, req.request_id


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_gpu_with_cuda_graphs_matches_the_plain_loop(checkpoint: Path) -> None:
    """On a GPU the engine decodes through CUDA graphs (and Qwen3-VL-MoE through the Triton expert kernel,
    captured in them); float32, its greedy tokens equal the one-request loop on the same GPU model."""
    # num_kv_blocks: the cache is not sized from free memory, which tests before this one may still hold.
    llm = LLM(
        str(checkpoint), max_model_len=512, max_num_seqs=4, num_kv_blocks=128, device="cuda", dtype="float32"
    )
    assert llm.engine.runner.graphs is not None
    images = [random_image(70, 50, seed=7), random_image(40, 90, seed=8)]
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What are these?"}]
    text = llm.processor.apply_chat_template([{"role": "user", "content": parts}])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    requests = [llm.make_request(text, images, params), llm.make_request("Tell me a story.", [], params)]
    outputs = llm.run(requests)
    for req, out in zip(requests, outputs, strict=True):
        expected = greedy_generate(
            llm.engine.model,
            req.prompt_token_ids,
            req.images,
            req.mrope_positions,
            req.mrope_delta,
            16,
            encoder_input=llm.processor.encoder_input,
        )
        assert out.outputs[0].token_ids == expected, req.request_id


def test_processor_fills_missing_preprocessor_fields_with_the_family_values(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, family="qwen3_vl", weights=False)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    for name in ("patch_size", "image_mean", "image_std"):
        del pre[name]
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    config = Qwen2_5_VLProcessor.from_pretrained(path).image_config
    assert (config.patch_size, config.image_mean, config.image_std) == (16, (0.5,) * 3, (0.5,) * 3)
