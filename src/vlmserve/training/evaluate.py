"""Held-out accuracy of a checkpoint, per category, through the real engine (the offline `LLM`, greedy).

    python -m vlmserve.training.evaluate --model DIR|demo [--n 100] [--device cpu|cuda] [--json FILE]

Owns: asking every held-out question (data.heldout_sample: a seed training never uses), reading the key word
out of each answer and tabulating accuracy. For colour, shape, count and position the key word must match
(data.answer_key folds plurals and spellings); "describe" counts only exact sentences; "json" (questions that
ask for JSON, asked with the JSON schema of the expected keys as the output constraint, as a client sends
`response_format`) counts only objects equal to the expected one. Prints a table and one JSON line.

Does not know how the model is built or trained; it sees only what a user of `LLM.chat` sees.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from vlmserve.llm import LLM
from vlmserve.training.data import (
    CATEGORIES,
    JSON_KIND,
    KINDS,
    answer_key,
    expected_key,
    heldout_sample,
    json_schema,
)


@dataclass
class Result:
    kind: str
    question: str
    expected: str  # key word, or the full sentence for "describe"
    answer: str

    @property
    def correct(self) -> bool:
        if self.kind == "describe":
            return self.answer.strip().lower() == self.expected.lower()
        if self.kind == JSON_KIND:
            try:
                return json.loads(self.answer) == json.loads(self.expected)
            except json.JSONDecodeError:
                return False
        return answer_key(self.kind, self.answer) == self.expected


def run_eval(llm: LLM, n: int, kinds: tuple[str, ...] = KINDS) -> list[Result]:
    """Ask n held-out questions of every kind in one batch; greedy answers. JSON questions are constrained
    by the schema of their expected object's keys (what the question or the client's schema names)."""
    samples = [(kind, heldout_sample(kind, i)) for kind in kinds for i in range(n)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    requests = []
    for kind, sample in samples:
        params = greedy
        if kind == JSON_KIND:
            keys = list(json.loads(sample.turns[0].answer))
            schema = StructuredOutputsParams(json=json_schema(keys))
            params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=schema)
        prompt = llm.processor.apply_chat_template(sample.messages(with_answers=False))
        requests.append(llm.make_request(prompt, [sample.image], params))
    outputs = llm.run(requests)
    results = []
    for (kind, sample), out in zip(samples, outputs, strict=True):
        qa = sample.turns[0]
        expected = qa.answer if kind in ("describe", JSON_KIND) else expected_key(sample.scene, kind)
        results.append(Result(kind, qa.question, expected, out.text))
    return results


def summarize(results: list[Result]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(r.kind for r in results):
        rows = [r for r in results if r.kind == kind]
        table[kind] = {"n": len(rows), "accuracy": round(sum(r.correct for r in rows) / len(rows), 4)}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| category | n | accuracy |", "|---|---:|---:|"]
    for kind, row in table.items():
        name = {"describe": "describe (exact sentence)", JSON_KIND: "json (exact object, schema)"}.get(
            kind, kind
        )
        lines.append(f"| {name} | {int(row['n'])} | {row['accuracy']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description="Held-out accuracy of a demo-style checkpoint through the engine."
    )
    ap.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' for the shipped model")
    ap.add_argument("--n", type=int, default=100, help="questions per category")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    every = (*KINDS, JSON_KIND)
    ap.add_argument("--kinds", default=",".join(every), help=f"comma-separated subset of {','.join(every)}")
    ap.add_argument("--json", default=None, help="also write the results (table and every answer) here")
    ap.add_argument("--show-errors", type=int, default=5, help="print this many wrong answers per category")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in every]
    if unknown:
        ap.error(f"--kinds: unknown {unknown}; choose from {', '.join(every)}")
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")

    llm = LLM(args.model, device=args.device)
    start = time.perf_counter()
    results = run_eval(llm, args.n, kinds)
    seconds = time.perf_counter() - start
    table = summarize(results)
    for kind in kinds:
        wrong = [r for r in results if r.kind == kind and not r.correct][: args.show_errors]
        for r in wrong:
            print(f"  wrong {kind}: {r.question!r} -> {r.answer!r} (expected {r.expected!r})")
    print(format_table(table))
    keyed = [table[k]["accuracy"] for k in CATEGORIES if k in table]
    summary = {
        "model": str(llm.config.model_path),
        "n_per_category": args.n,
        "seconds": round(seconds, 1),
        "mean_key_accuracy": round(sum(keyed) / len(keyed), 4) if keyed else None,
        "categories": table,
    }
    print(json.dumps(summary))
    if args.json:
        detail = {**summary, "answers": [r.__dict__ | {"correct": r.correct} for r in results]}
        Path(args.json).write_text(json.dumps(detail, indent=2))
    return summary


if __name__ == "__main__":
    main()
