"""The engine's host time per decode step with every row under a JSON schema, as on a GPU server.

The engine core is the real one (scheduler, matchers, mask fill, detokenizers, deltas) with the asynchronous
loop; only the runner is a stand-in for a GPU: queueing a step costs no host time, its forward takes
`--forward-ms` of simulated device time (its sampling `--sample-ms`) on one device queue, and reading its
tokens waits for that queue. Its tokens are drawn at random among those the step's mask allows, so the
matchers walk the schema as a model's would. The checkpoint is the project generator's `small-bench` (the
tokenizer of the 7B benchmark checkpoint, 1,115 tokens) with the 7B's 152,064 logits, so masks have the
7B's width; no weights are read (the stand-in never runs the model). `--synthetic-vocab 151643` gives the
grammar engine a vocabulary of a released tokenizer's size instead.

Per step it reports the host's busy time (the step's wall time less the waits for the simulated device and
the stand-in's own token drawing), the part of it spent in the mask's resolve() (the whole fill, or the
wait for the fill thread) and the step period, the larger of the host's time and the device's. The host
work of the real sampler (building its tensors) is not in it. A short `--forward-ms` makes the loop
host-bound, as W2 at 128 constrained streams is on the H200.

    python benchmarks/structured_step.py --concurrency 128 --forward-ms 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from vlmserve.llm import LLM
from vlmserve.runner.model_runner import PreparedStep, StepOutput


class SimulatedDevice:
    """One in-order queue: work queued at t starts when the work before it ends."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.waited = 0.0

    def enqueue(self, seconds: float) -> float:
        self.free_at = max(time.perf_counter(), self.free_at) + seconds
        return self.free_at

    def wait_until(self, t: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() < t:
            time.sleep(max(0.0, min(t - time.perf_counter(), 0.001)))
        self.waited += time.perf_counter() - start


class _Samples:
    def __init__(self, device: SimulatedDevice, done: float, token_ids: list[int]) -> None:
        self.device, self.done, self.token_ids = device, done, token_ids

    def output(self) -> Any:
        self.device.wait_until(self.done)
        return SimpleNamespace(token_ids=self.token_ids, logprobs=None, top_logprobs=None)


class StandInRunner:
    """What the engine core calls on a runner (prepare / launch), with a simulated device behind it."""

    def __init__(self, forward_s: float, sample_s: float, tokenizer_size: int, seed: int = 0) -> None:
        self.device = SimulatedDevice()
        self.forward_s, self.sample_s = forward_s, sample_s
        self.words = (tokenizer_size + 31) // 32  # ids past the tokenizer are never allowed
        self.tokenizer_size = tokenizer_size
        self.rng = np.random.default_rng(seed)
        self.drawing = 0.0  # host time of the stand-in's own token draws (a GPU's work, not the engine's)
        self.mask_wait = 0.0  # host time in the mask's resolve(): the whole fill, or the wait for its thread

    def launch(self, sched: Any, prev: StepOutput | None = None) -> StepOutput:
        return self.prepare(sched, prev).run()

    def prepare(
        self, sched: Any, prev: StepOutput | None = None, defer_sampling: bool = False
    ) -> PreparedStep:
        if not sched.scheduled:
            return PreparedStep(lambda: StepOutput([]), decode_only=True)
        decode_only = not sched.encoder_inputs and all(s.num_tokens == 1 for s in sched.scheduled)
        deferred = defer_sampling and decode_only
        reqs = [s.request for s in sched.scheduled if s.sample]

        def run() -> StepOutput:
            if prev is not None:
                prev.sample_now()  # its tokens feed this forward
            self.device.enqueue(self.forward_s)
            if deferred:
                return StepOutput([r.request_id for r in reqs], deferred=sample)
            return sample()

        def sample() -> StepOutput:
            t = time.perf_counter()
            mask = sched.grammar_bitmask.resolve() if sched.grammar_bitmask is not None else None
            self.mask_wait += time.perf_counter() - t
            done = self.device.enqueue(self.sample_s)
            t = time.perf_counter()
            tokens = self._draw([r.request_id for r in reqs], mask)
            drawn = time.perf_counter() - t
            self.drawing += drawn
            self.device.free_at += drawn  # the simulated clock stops while the stand-in draws
            done += drawn
            return StepOutput([r.request_id for r in reqs], sampled=_Samples(self.device, done, tokens))  # type: ignore[arg-type]

        return PreparedStep(run, decode_only=decode_only, sampling_deferred=deferred)

    def _draw(self, request_ids: list[str], mask: Any) -> list[int]:
        tokens = self.rng.integers(0, self.tokenizer_size, len(request_ids))
        if mask is not None:
            rows = {rid: i for i, rid in enumerate(mask.request_ids)}
            bits = np.unpackbits(mask.bits[:, : self.words].view(np.uint8), axis=1, bitorder="little")
            bits = bits[:, : self.tokenizer_size]
            scores = self.rng.random(bits.shape) * bits
            picks = scores.argmax(axis=1)
            for j, rid in enumerate(request_ids):
                if rid in rows:
                    tokens[j] = picks[rows[rid]]
        return [int(t) for t in tokens]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--schema", default=str(Path(__file__).parent / "schemas" / "long_extraction.json"))
    ap.add_argument("--steps", type=int, default=200, help="decode steps measured, after the warm-up")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--forward-ms", type=float, default=7.0)
    ap.add_argument("--sample-ms", type=float, default=0.3)
    ap.add_argument("--logits", type=int, default=152064, help="the model's logits width (masks' width)")
    ap.add_argument(
        "--synthetic-vocab",
        type=int,
        default=0,
        help="give the grammar engine (only) a synthetic byte-level vocabulary of this many tokens "
        "(benchmarks/grammar_masks.py), for a released tokenizer's mask cost; the detokenizer keeps the "
        "checkpoint's, so ids past it detokenize to nothing",
    )
    ap.add_argument("--free", action="store_true", help="no schema: the same loop unconstrained, to compare")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(tmp, preset="small-bench", text={"vocab_size": args.logits}, weights=False)
        tokenizer_size = len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]) + 14
        llm = LLM(
            str(ckpt),
            load_format="dummy",
            device="cpu",
            dtype="float32",
            max_model_len=4096,
            max_num_seqs=args.concurrency,
            async_scheduling=True,
        )
    engine = llm.engine
    if args.synthetic_vocab:
        sys.path.insert(0, str(Path(__file__).parent))
        from grammar_masks import synthetic_vocab, tokenizer_json

        from vlmserve.engine.structured import GrammarCompiler

        tokenizer_size = args.synthetic_vocab
        engine.structured.compiler = GrammarCompiler(
            tokenizer_json(synthetic_vocab(args.synthetic_vocab)), args.logits, engine.eos_token_ids
        )
        assert engine.structured.compiler.tokenizer is not None  # built before the clock starts
    runner = StandInRunner(args.forward_ms / 1000, args.sample_ms / 1000, tokenizer_size)
    engine.runner = runner  # type: ignore[assignment]
    schema = "" if args.free else Path(args.schema).read_text()
    params = SamplingParams(
        temperature=1.0,
        max_tokens=args.warmup + args.steps + 8,
        structured_outputs=None if args.free else StructuredOutputsParams(json=schema),
        ignore_eos=args.free,
    )
    for i in range(args.concurrency):
        engine.add_request(llm.make_request(f"Extract the fields of document {i}.", [], params, f"r{i}"))

    host, period, masks = [], [], []
    step = 0
    while engine.has_unfinished_requests():
        waited, drawing, mask_wait = runner.device.waited, runner.drawing, runner.mask_wait
        t = time.perf_counter()
        deltas = engine.step()
        wall = time.perf_counter() - t
        decoding = len(engine.scheduler.running) == args.concurrency and len(deltas) == args.concurrency
        if decoding:
            step += 1
            if args.warmup < step <= args.warmup + args.steps:
                host.append(wall - (runner.device.waited - waited) - (runner.drawing - drawing))
                period.append(wall - (runner.drawing - drawing))
                masks.append(runner.mask_wait - mask_wait)
        if step > args.warmup + args.steps:
            for i in range(args.concurrency):
                engine.abort(f"r{i}")
    if not host:
        sys.exit("no step with every row decoding was measured")
    ms = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 2)  # noqa: E731
    print(
        json.dumps(
            {
                "concurrency": args.concurrency,
                "steps": len(host),
                "logits": args.logits,
                "grammar_vocab": tokenizer_size,
                "forward_ms": args.forward_ms,
                "host_ms_mean": round(1000 * statistics.mean(host), 2),
                "host_ms_p50": ms(host, 50),
                "host_ms_p90": ms(host, 90),
                "mask_resolve_ms_p50": ms(masks, 50),
                "period_ms_p50": ms(period, 50),
            }
        )
    )


if __name__ == "__main__":
    main()
