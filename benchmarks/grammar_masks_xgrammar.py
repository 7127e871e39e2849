"""The xgrammar side of benchmarks/grammar_masks.py: the same synthetic 151,646-token vocabulary, the same
50-field schemas and random walk, at batch 128. xgrammar is not a dependency of vlmserve; run this in a
throwaway environment that has it (`pip install --no-deps xgrammar apache-tvm-ffi` next to torch and numpy).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import xgrammar as xgr

sys.path.insert(0, "benchmarks")
from grammar_masks import _bytes_to_unicode, schema_with_fields, synthetic_vocab


def main(batch: int = 128, steps: int = 64) -> None:
    inverse = {c: b for b, c in enumerate(_bytes_to_unicode())}
    encoded = [bytes(inverse[c] for c in t) for t in synthetic_vocab(151643)]
    encoded += [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.RAW, stop_token_ids=[len(encoded) - 1])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
    cold = []
    for i in range(10):
        t = time.perf_counter()
        compiler.compile_json_schema(json.dumps(schema_with_fields(50, f"s{i}_")))
        cold.append(time.perf_counter() - t)
    t = time.perf_counter()
    compiler.compile_json_schema(json.dumps(schema_with_fields(50, "s0_")))
    cached = time.perf_counter() - t

    grammar = compiler.compile_json_schema(json.dumps(schema_with_fields(50)))
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
    mask = xgr.allocate_token_bitmask(batch, info.vocab_size)
    filler = xgr.BatchGrammarMatcher(max_threads=2)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        filler.batch_fill_next_token_bitmask(matchers, mask)
        times.append(time.perf_counter() - t)
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : info.vocab_size]
        for i, m in enumerate(matchers):
            allowed = np.flatnonzero(bits[i])
            if not m.is_terminated() and len(allowed):
                m.accept_token(int(rng.choice(allowed)))
    result = {
        "compile_50_fields_cold_ms_p50": round(1000 * statistics.median(cold), 2),
        "cached_ms": round(1000 * cached, 3),
        "mask_fill_batch_first_step_ms": round(1000 * times[0], 2),
        "mask_fill_batch_ms_p50": round(1000 * statistics.median(times[1:]), 2),
        "mask_fill_batch_ms_p90": round(1000 * float(np.percentile(times[1:], 90)), 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
