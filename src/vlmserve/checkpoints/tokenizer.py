"""Build the tokenizer and preprocessor files of a tiny test checkpoint, offline and deterministic.

Owns: training a small byte-level BPE tokenizer with the same pipeline as Qwen2's (NFC normaliser, the Qwen2
pre-tokenizer regex, byte-level pre-tokenizer and decoder), appending the Qwen special tokens in their real
relative order, and writing tokenizer.json, tokenizer_config.json and chat_template.json (with the real
Qwen2.5-VL chat template), generation_config.json and preprocessor_config.json laid out as released Qwen2.5-VL checkpoints lay them out.
HF transformers loads these files with AutoTokenizer / AutoProcessor, which the tests check.

Does not know about model weights or config.json (the checkpoint generator writes those from the ids this
module returns), nor how the files are used at serving time (that is models/processor.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The released Qwen2.5-VL chat template, verbatim (tokenizer_config.json / chat_template.json of
# Qwen/Qwen2.5-VL-7B-Instruct).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen3-VL Instruct chat template: no default system prompt, content rendered by one macro, tool calls and
# tool responses, and a plain "<|im_start|>assistant\n" generation prompt.
QWEN3_VL_CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Appended after the ordinary vocabulary in this order, as in Qwen2.5-VL (151643 ... 151656).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Names of the ids returned by build_tokenizer_files (what config.json and generation_config.json need).
_RETURNED_IDS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
}

# The same pre-tokenizer regex as Qwen2's tokenizer (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
# NOTE: transformers 5.x rebuilds the Qwen2 pipeline from vocab + merges and ignores the one in tokenizer.json,
# so ours must be identical or HF and `tokenizers` would split text differently.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_MAX_LENGTH = 32768

# Training text: varied everyday English plus the words test prompts use (image, colours, shapes, numbers).
_CORPUS = """\
Describe this image in one sentence.
What is in the picture? There is a red circle next to a blue square.
The image shows a green triangle on a white background.
A small yellow star sits above a large purple rectangle.
How many shapes are in the image? I count three: a circle, a square and a triangle.
The colours are red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown and pink.
Please answer with a single word.
The cat sat on the mat, and the dog slept by the door.
She counted one, two, three, four, five, six, seven, eight, nine, ten.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 2025 appear in text.
The quick brown fox jumps over the lazy dog.
Is the sky blue or grey today? It looks cloudy, so it is mostly grey.
A photo of a busy street with cars, buses, bicycles and people walking.
The left half of the picture is dark; the right half is bright.
What colour is the largest shape? The largest shape is blue.
Compare the two images and list the differences.
In the first image the ball is red; in the second image it is green.
Write a short poem about the ocean, the moon and the stars.
The model reads the image, then answers the question.
Where is the square? It is in the top-left corner of the image.
An orange ellipse overlaps a teal hexagon near the centre.
There are 12 apples, 7 oranges and 3 bananas on the table.
Explain step by step: first, look at the picture; second, find the objects; third, count them.
"Hello, world!" she said. "How are you?" he asked.
Yes. No. Maybe. I don't know. It's fine; we'll see. They're here, aren't they?
Colour, color, grey, gray: both spellings are common in English.
The weather report said: sunny in the morning, rain in the afternoon.
Draw a line from point A to point B, then a circle with radius 5.
A pentagon has five sides, a hexagon has six, and an octagon has eight.
The chart shows sales rising from 10% in January to 35% in June.
Use short sentences. Be precise. Be helpful and honest.
The assistant describes what it sees: a white cup on a wooden desk, a black pen, and a green plant.
My favourite colours are blue and green, but my sister likes purple.
Tell me a story about a robot who learns to paint pictures.
The train leaves at 9:45 and arrives at 13:20, after a journey of 3 hours and 35 minutes.
Shapes: circle, square, rectangle, triangle, star, diamond, oval, heart, arrow, cross.
The big red box is on the left; the small blue box is on the right.
Can you read the text in this image? It says "OPEN" in bold letters.
The mountain was covered with snow, and the lake below was calm and clear.
Question: what is 2 + 2? Answer: 4.
Question: what is 7 * 8? Answer: 56.
A list: apples, bread, cheese, dates, eggs, flour, grapes, honey.
The picture is blurry, so it is hard to tell what the object is.
A person in a yellow jacket is riding a bicycle across a bridge.
Summarise the document in three bullet points.
- The first point is short.
- The second point is longer and explains the idea in more detail.
- The third point ends the list.
I think the answer is probably correct, but please check it again.
Look closely at the bottom-right corner of the image: there is a tiny signature.
Each pixel has a red, green and blue value between 0 and 255.
The video shows a ball bouncing three times before it stops.
There is nothing in the image except a plain grey background.
Thank you! You're welcome. Good morning, good evening, good night.
def add(a, b): return a + b
for i in range(10): print(i)
{"name": "circle", "colour": "red", "radius": 3}
The children played in the park until the sun went down behind the hills.
The library opens at eight and closes at six, except on Sundays.
Photographs, paintings, drawings and diagrams are all kinds of images.
A white dog with brown spots chases a red ball across the green grass.
The answer is: yes, there are two circles and one square in the image.
"""


def _training_text(seed: int, extra_corpus: Sequence[str] = ()) -> list[str]:
    # BPE counts are order-independent, so the seed varies how often each line is seen: different seeds give
    # different merges (a different tokenizer), the same seed always gives the same one.
    rng = random.Random(seed)
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    return [line for line in lines for _ in range(rng.randint(1, 3))] + list(extra_corpus)


def build_tokenizer_files(
    out_dir: Path,
    vocab_size: int = 1024,
    seed: int = 0,
    extra_corpus: Sequence[str] = (),
    chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE,
) -> dict[str, int]:
    """Train a byte-level BPE tokenizer; write tokenizer.json, tokenizer_config.json, chat_template.json and
    generation_config.json.

    `extra_corpus` lines are added to the built-in training text as given (a model trained on a known
    vocabulary, like the demo model, passes its own sentences so that its words become single tokens); the
    default leaves the tokenizer exactly as before.

    `vocab_size` is the total including the 14 special tokens; the ordinary vocabulary is trained up to
    `vocab_size - 14` entries (fewer when the corpus runs out of merges). Returns the special token ids by name
    ("endoftext", "im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad") and
    "vocab_size", the real total, for config.json.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(byte_alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE tokenizer needs {len(byte_alphabet)} byte "
            f"tokens plus {len(SPECIAL_TOKENS)} special tokens; pass vocab_size >= {min_size}."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=0,
        show_progress=False,
        initial_alphabet=byte_alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator(_training_text(seed, extra_corpus), trainer=trainer)
    # Added after training so that they take the ids right after the ordinary vocabulary, as in Qwen.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in SPECIAL_TOKENS
        ]
    )
    tok.save(str(out / "tokenizer.json"))

    ids: dict[str, int] = {}
    for name, token in _RETURNED_IDS.items():
        token_id = tok.token_to_id(token)
        assert token_id is not None, token  # added just above
        ids[name] = token_id
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)

    added_tokens_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    # Field for field what Qwen2.5-VL ships, with a smaller model_max_length.
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    # Released checkpoints also ship the template as chat_template.json, which is where HF's *processor* (as
    # opposed to its tokenizer) reads it from.
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2))

    generation_config = {
        "bos_token_id": ids["endoftext"],
        "eos_token_id": [ids["im_end"], ids["endoftext"]],
        "pad_token_id": ids["endoftext"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return ids


def write_preprocessor_config(
    out_dir: Path,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    processor_class: str = "Qwen2_5_VLProcessor",
    flat_pixel_fields: bool = True,
) -> Path:
    """Write preprocessor_config.json as Qwen2.5-VL checkpoints do, and return its path.

    Both the flat min_pixels / max_pixels (released checkpoints) and the "size" dict (what transformers 5.x
    saves) are written, with the same values, so either reader finds them. flat_pixel_fields=False writes
    only the "size" dict, as released Qwen3-VL checkpoints do.
    """
    factor = patch_size * merge_size
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} > max_pixels={max_pixels}; pass min_pixels <= max_pixels.")
    if max_pixels < factor * factor:
        raise ValueError(
            f"max_pixels={max_pixels} is below one merged patch ({factor}x{factor}={factor * factor} pixels); "
            f"pass max_pixels >= {factor * factor}."
        )
    config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(image_mean),
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": list(image_std),
        "max_pixels": max_pixels,
        "merge_size": merge_size,
        "min_pixels": min_pixels,
        "patch_size": patch_size,
        "processor_class": processor_class,
        "resample": 3,  # PIL.Image.BICUBIC
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": temporal_patch_size,
    }
    if not flat_pixel_fields:
        del config["min_pixels"], config["max_pixels"]
    path = Path(out_dir) / "preprocessor_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
