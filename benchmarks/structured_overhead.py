"""Output tokens/s of a running server with and without a JSON-schema constraint, same load otherwise.

Closed loop of `--concurrency` streams, text prompts, exactly `--output-len` tokens per request either way:
free requests ignore EOS, constrained ones follow a schema (an array of 400 one-digit integers) that cannot
close within that many tokens, so both finish by length and the token counts match. Runs alternate
free / constrained `--rounds` times so that drift on a shared machine hits both.

    python benchmarks/structured_overhead.py --base-url http://127.0.0.1:8000/v1 --model small-bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import openai

SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 400,
    "maxItems": 400,
}
WORDS = "red green blue circle square image picture describe count shapes colour left right top".split()


async def run(client: openai.AsyncOpenAI, args: argparse.Namespace, constrained: bool, seed: int) -> float:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(16)) for _ in range(args.num_requests)]
    extra = {"guided_json": SCHEMA} if constrained else {"ignore_eos": True}
    tokens = 0
    queue = list(prompts)

    async def worker() -> None:
        nonlocal tokens
        while queue:
            prompt = queue.pop()
            r = await client.chat.completions.create(
                model=args.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=args.output_len,
                temperature=1.0,
                extra_body=extra,
            )
            assert r.choices[0].finish_reason == "length", r.choices[0]
            tokens += r.usage.completion_tokens if r.usage else 0

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return tokens / (time.perf_counter() - start)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="none", max_retries=0)
    await run(client, argparse.Namespace(**{**vars(args), "num_requests": args.concurrency}), True, 99)  # warm-up
    free, constrained = [], []
    for i in range(args.rounds):
        # Distinct prompts every run: a repeated prompt would be served from the prefix cache.
        free.append(await run(client, args, False, 2 * i))
        constrained.append(await run(client, args, True, 2 * i + 1))
    result = {
        "free_tok_s": [round(x, 1) for x in free],
        "constrained_tok_s": [round(x, 1) for x in constrained],
        "ratio_of_means": round(statistics.mean(constrained) / statistics.mean(free), 3),
    }
    print(json.dumps(result, indent=1))
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
