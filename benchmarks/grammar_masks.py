"""Grammar-engine costs that decide structured-output design: per-step token-mask time at a given batch and
vocabulary, and compile time of a large JSON schema (cold and cached).

The vocabulary: no released Qwen tokenizer is available offline, so a byte-level BPE tokenizer.json of
`--vocab` entries is synthesised from real text (identifiers and words of the installed Python packages' sources,
with and without a leading space, plus digit and punctuation runs), the mix a code-and-prose BPE vocabulary
holds. What the mask cost depends on is the token trie (how many tokens, how long, how they share prefixes);
merges are not needed for that and are left empty.

    python benchmarks/grammar_masks.py --batch 128 --vocab 151643
    # a checkpoint's own tokenizer and a schema file, on a host with 6 other busy processes:
    python benchmarks/grammar_masks.py --tokenizer CKPT --logits 152064 \
        --schema benchmarks/schemas/long_extraction.json --threads 4 --busy 6
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask


def synthetic_vocab(size: int, seed: int = 0) -> list[str]:
    """`size` distinct byte-level token strings (GPT-2 byte alphabet) drawn from real source text."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    words: dict[str, None] = {}
    root = Path(sysconfig.get_paths()["purelib"])
    pattern = re.compile(r"[A-Za-z_]{2,16}|\d{1,3}|[^\sA-Za-z\d]{1,3}")
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        for w in pattern.findall(text):
            words.setdefault(w, None)
            words.setdefault(" " + w, None)
        if len(words) > size * 2:
            break
    vocab: dict[str, None] = dict.fromkeys(alphabet)
    rng = random.Random(seed)
    pool = list(words)
    rng.shuffle(pool)
    for w in pool:
        if len(vocab) >= size:
            break
        vocab.setdefault("".join(byte_to_char[b] for b in w.encode()), None)
    return list(vocab)[:size]


def _bytes_to_unicode() -> list[str]:
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def tokenizer_json(vocab: list[str]) -> str:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = {t: i for i, t in enumerate(vocab)}
    added = [
        {
            "id": len(vocab) + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    ]
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": True,
            },
            "post_processor": None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": False,
                "use_regex": True,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": ids,
                "merges": [],
            },
        }
    )


def schema_with_fields(n: int, salt: str = "") -> dict:
    kinds = [
        {"type": "string", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue", "other"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        {
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a"],
        },
    ]
    props = {f"field_{salt}{i}": kinds[i % len(kinds)] for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151643)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--fields", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="LLExecutor threads (0: its default)")
    ap.add_argument("--serial", action="store_true", help="fill row by row on this thread, no executor")
    ap.add_argument("--tokenizer", type=Path, help="a checkpoint dir: its tokenizer.json instead of --vocab")
    ap.add_argument("--logits", type=int, default=0, help="with --tokenizer: the model's logits width")
    ap.add_argument("--schema", type=Path, help="the masks' JSON schema (default: --fields generated fields)")
    ap.add_argument("--busy", type=int, default=0, help="processes spinning on a core while masks fill")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.tokenizer:
        text = (args.tokenizer / "tokenizer.json").read_text()
        # Any EOS id will do: the masks' cost does not depend on which token ends the output.
        tok = llguidance.LLTokenizer(text, n_vocab=args.logits or None, eos_token=0)
    else:
        vocab = synthetic_vocab(args.vocab)
        tok = llguidance.LLTokenizer(tokenizer_json(vocab), eos_token=len(vocab) + 2)
    print(f"tokenizer: {tok.vocab_size} tokens, built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # Compile: a fresh 50-field schema each time (cold; salt defeats any internal cache), then the same
    # grammar again through a matcher copy (what a cache by schema hash hands out).
    cold = []
    for i in range(10):
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_with_fields(args.fields, f"s{i}_"))
        m = llguidance.LLMatcher(tok, grammar)
        assert not m.is_error(), m.get_error()
        cold.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(100):
        m.deep_copy()
    cached = (time.perf_counter() - t) / 100

    # Masks: `batch` matchers of one schema, each advanced by tokens it allows (a random walk through the
    # grammar, so the rows sit at different states), one batched fill per step.
    schema = json.loads(args.schema.read_text()) if args.schema else schema_with_fields(args.fields)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    base = llguidance.LLMatcher(tok, grammar)
    matchers = [base.deep_copy() for _ in range(args.batch)]
    executor = llguidance.LLExecutor(args.threads) if args.threads else llguidance.LLExecutor()
    mask = allocate_token_bitmask(args.batch, tok.vocab_size)
    rng = np.random.default_rng(0)
    step_times, consume_times = [], []
    # Other processes busy on the host (a served engine shares it with the front and the clients).
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for _ in range(args.steps):
            t = time.perf_counter()
            if args.serial:
                for i, m in enumerate(matchers):
                    m.unsafe_compute_mask_ptr(mask[i].ctypes.data, mask.shape[1] * 4)
            else:
                executor.unsafe_compute_mask_ptr(
                    [(m, i) for i, m in enumerate(matchers)], mask.ctypes.data, mask.shape[1] * 4, args.batch
                )
            step_times.append(time.perf_counter() - t)
            bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, : tok.vocab_size]
            picks = []
            for i, m in enumerate(matchers):
                allowed = np.flatnonzero(bits[i])
                if not m.is_stopped() and len(allowed):
                    picks.append((m, int(rng.choice(allowed))))
            t = time.perf_counter()
            for m, token in picks:
                m.consume_token(token)
            consume_times.append(time.perf_counter() - t)
    finally:
        for p in busy:
            p.kill()

    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(
        json.dumps(
            {
                "llguidance": llguidance.__version__ if hasattr(llguidance, "__version__") else "?",
                "vocab": tok.vocab_size,
                "batch": args.batch,
                "threads": "serial" if args.serial else (args.threads or "default"),
                "busy_processes": args.busy,
                "compile_50_fields_cold_ms_p50": round(ms(cold), 2),
                "compile_50_fields_cold_ms_max": round(1000 * max(cold), 2),
                "cached_copy_ms": round(1000 * cached, 3),
                "mask_fill_batch_first_step_ms": round(1000 * step_times[0], 2),
                "mask_fill_batch_ms_p50": round(ms(step_times[1:]), 2),
                "mask_fill_batch_ms_p90": round(1000 * float(np.percentile(step_times[1:], 90)), 2),
                "consume_batch_ms_p50": round(ms(consume_times), 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
