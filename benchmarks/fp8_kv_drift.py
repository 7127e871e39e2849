"""How far an FP8 (e4m3) KV cache moves a model's answers from a bf16 one: the demo model (trained weights, so
the logprobs mean something) answering generated questions about images, greedy, both caches in one run.

    python benchmarks/fp8_kv_drift.py [--cases 48] [--device cpu] [--size 1280x720]

Reports: answers identical token for token, answers right under each cache, and the drift of the chosen
tokens' logprobs over the tokens both runs share (mean and max |bf16 - fp8|).
"""

from __future__ import annotations

import argparse
import statistics

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM
from vlmserve.training import data

KINDS = ("colour", "shape", "count", "position")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="640x480", help="image size WxH (W1 is 1280x720)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    cases = [data.make_example(50_000 + i, KINDS[i % 4], size=size) for i in range(args.cases)]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=0)
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM("demo", device=args.device, dtype="bfloat16", kv_cache_dtype=kv, max_model_len=4096)
        convs = [
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
            for img, q, _ in cases
        ]
        runs[kv] = [o.outputs[0] for o in llm.chat(convs, params)]
        cache = llm.engine.runner.kv_caches[0]
        print(f"kv_cache_dtype={kv}: cache tensors {cache[0].dtype}")
    same = sum(a.token_ids == b.token_ids for a, b in zip(runs["auto"], runs["fp8"], strict=True))
    right = {
        kv: sum(data.answer_key(KINDS[i % 4], o.text) == cases[i][2] for i, o in enumerate(outs))
        for kv, outs in runs.items()
    }
    drift = []
    for a, b in zip(runs["auto"], runs["fp8"], strict=True):
        for la, lb in zip(a.logprobs or [], b.logprobs or [], strict=False):
            if la.token_id != lb.token_id:
                break
            drift.append(abs(la.logprob - lb.logprob))
    print(f"{args.cases} cases at {args.size}, demo model, bf16 weights, {args.device}")
    print(f"identical answers: {same}/{args.cases}; right: bf16 KV {right['auto']}, fp8 KV {right['fp8']}")
    print(
        f"|logprob drift| over {len(drift)} shared tokens: mean {statistics.mean(drift):.4f}, "
        f"p99 {sorted(drift)[int(0.99 * (len(drift) - 1))]:.4f}, max {max(drift):.4f}"
    )


if __name__ == "__main__":
    main()
