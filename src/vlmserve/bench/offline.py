"""Offline engine benchmark (no HTTP): time to first token, decode time per token, throughput.

    python -m vlmserve.bench.offline --preset 7b --load-format dummy --hf-baseline --json out.json

Workloads (from the performance targets):
  W1: one 1280x720 image + a question, 1235 prompt tokens, 128 output tokens (ignore_eos)
  W2: one 448x448 image + a question, 512 output tokens (ignore_eos)
The same run measures HF transformers' generate() on the same architecture as the baseline (--hf-baseline).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmserve.bench.serving import synthetic_image
from vlmserve.config import EngineArgs
from vlmserve.engine.build_config import build_engine_config
from vlmserve.engine.core import EngineCore
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from vlmserve.models.processor import Qwen2_5_VLProcessor

WORKLOADS = {"W1": ((1280, 720), 1235, 128), "W2": ((448, 448), None, 512)}


@dataclass
class Prompt:
    text: str
    image: Image.Image


def make_prompt(
    proc: Qwen2_5_VLProcessor, size: tuple[int, int], target_len: int | None, seed: int
) -> Prompt:
    """A chat prompt with one image whose token count is `target_len` (padding the question with words)."""
    image = synthetic_image(size, seed)
    question = "Describe this image in detail."
    while True:
        text = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        )
        n = len(proc.process(text, [image]).token_ids)
        if target_len is None or n >= target_len:
            return Prompt(text, image)
        question += " Please"


def run_batch(
    core: EngineCore, proc: Qwen2_5_VLProcessor, prompts: list[Prompt], out_len: int
) -> dict[str, Any]:
    """Submit all prompts at once, step to completion; per-request first-token and finish times."""
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    # Preprocessing (resize, patchify) happens before the clock starts: a server does it concurrently in its
    # HTTP layer; the serving benchmark measures the whole path.
    processed = [proc.process(p.text, [p.image]) for p in prompts]
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for i, pp in enumerate(processed):
        core.add_request(
            EngineRequest(
                f"b{i}-{time.monotonic_ns()}",
                pp.token_ids,
                params,
                pp.images,
                pp.mrope_positions,
                pp.mrope_delta,
            )
        )
    n_tokens = 0
    while core.has_unfinished_requests():
        for d in core.step():
            now = time.perf_counter()
            n_tokens += len(d.token_ids)
            first.setdefault(d.request_id, now)
            if d.finished:
                done[d.request_id] = now
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    ttfts = sorted(v - t0 for v in first.values())
    tpots = [(done[r] - first[r]) / max(out_len - 1, 1) for r in done]
    return {
        "requests": len(prompts),
        "seconds": total,
        "requests_per_s": len(prompts) / total,
        "output_tokens_per_s": n_tokens / total,
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "tpot_mean_ms": 1e3 * statistics.mean(tpots),
    }


# Where a steady run's host time goes (--phases): inclusive wall time of these calls, per engine step.
# _compute_masks runs on the mask-fill thread (llguidance's pool under it); finish_fill is the engine
# thread's wait for it; PendingSamples.output is the wait for a step's tokens on the device. Served (through
# benchmarks/site/sitecustomize.py) the engine process's loop times the same.
PHASES = [
    ("vlmserve.engine.core:EngineCore", "step"),
    ("vlmserve.engine.core:EngineCore", "_schedule"),
    ("vlmserve.engine.core:EngineCore", "_apply"),
    ("vlmserve.engine.core:EngineCore", "_deltas"),
    ("vlmserve.engine.scheduler:Scheduler", "update_from_output"),
    ("vlmserve.runner.model_runner:ModelRunner", "prepare"),
    ("vlmserve.runner.model_runner:ModelRunner", "_run_graph"),
    ("vlmserve.runner.model_runner:ModelRunner", "_sample"),
    ("vlmserve.runner.model_runner", "build_sampling_tensors"),
    ("vlmserve.runner.sampler:Sampler", "sample"),
    ("vlmserve.runner.sampler:PendingSamples", "output"),
    ("vlmserve.engine.structured:StructuredOutputs", "start_fill"),
    ("vlmserve.engine.structured:StructuredOutputs", "finish_fill"),
    ("vlmserve.engine.structured:StructuredOutputs", "accept"),
    ("vlmserve.engine.structured", "_compute_masks"),
    ("vlmserve.engine.engine_process", "dumps"),  # served only: pickling the step's report
]


@dataclass
class PhaseTotals:
    """Inclusive wall seconds and call counts per timed function (`phase_timers`)."""

    seconds: dict[str, float]
    calls: dict[str, int]

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"seconds": dict(self.seconds), "calls": dict(self.calls)}


@contextmanager
def phase_timers(targets: list[tuple[str, str]] = PHASES) -> Iterator[PhaseTotals]:
    """Wrap each (module[:class], function) with a wall-clock accumulator while the context is open."""
    import importlib

    totals = PhaseTotals({}, {})
    lock = threading.Lock()
    restore = []
    for where, name in targets:
        module, _, cls = where.partition(":")
        owner: Any = importlib.import_module(module)
        if cls:
            owner = getattr(owner, cls)
        fn = owner.__dict__[name] if cls else getattr(owner, name)
        label = f"{cls or module.rsplit('.', 1)[-1]}.{name}"

        def timed(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                with lock:
                    totals.seconds[_label] = totals.seconds.get(_label, 0.0) + time.perf_counter() - t
                    totals.calls[_label] = totals.calls.get(_label, 0) + 1

        setattr(owner, name, timed)
        restore.append((owner, name, fn))
    try:
        yield totals
    finally:
        for owner, name, fn in restore:
            setattr(owner, name, fn)


def run_steady(
    core: EngineCore,
    proc: Qwen2_5_VLProcessor,
    prompts: list[Prompt],
    out_len: int,
    concurrency: int,
    arrival_delay_ms: float = 0.0,
    json_schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Closed loop inside the engine: `concurrency` requests in flight, the next one added as soon as one
    finishes, so that new requests' prefill and vision work share steps with running decodes, as on a
    server under steady load. Preprocessing is done before the clock starts: this is the engine's ceiling
    for the same load that `vlmserve bench --concurrency N` puts on a server. With `arrival_delay_ms`, a
    finished request's successor arrives after a uniform random delay up to that (a client's round trip and
    a front's preprocessing spread arrivals over several steps instead of one). With `json_schema`, every
    request's output must follow it (structured outputs), as `vlmserve bench --json-schema` asks a server."""
    structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
    params = SamplingParams(
        temperature=0.0, max_tokens=out_len, ignore_eos=True, structured_outputs=structured
    )
    processed = [proc.process(p.text, [p.image]) for p in prompts]
    pending = iter(enumerate(processed))
    rng = random.Random(0)
    due: list[float] = []  # arrival times of successors not yet added
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itls: list[float] = []
    step_times: list[float] = []

    def add_next() -> None:
        item = next(pending, None)
        if item is None:
            return
        i, pp = item
        rid = f"s{i}-{time.monotonic_ns()}"
        core.add_request(
            EngineRequest(rid, pp.token_ids, params, pp.images, pp.mrope_positions, pp.mrope_delta)
        )
        added[rid] = time.perf_counter()

    t0 = time.perf_counter()
    for _ in range(concurrency):
        add_next()
    n_tokens = 0
    mixed = 0
    while core.has_unfinished_requests() or due:
        now = time.perf_counter()
        while due and due[0] <= now:
            due.pop(0)
            add_next()
        if not core.has_unfinished_requests():
            if due:
                time.sleep(max(0.0, due[0] - now))
            continue
        before = time.perf_counter()
        waiting = core.stats().get("num_requests_waiting", 0)
        deltas = core.step()
        mixed += waiting > 0
        now = time.perf_counter()
        step_times.append(now - before)
        for d in deltas:
            if not d.token_ids and not d.finished:
                continue
            n_tokens += len(d.token_ids)
            if d.request_id in last:
                itls.append(now - last[d.request_id])
            first.setdefault(d.request_id, now)
            last[d.request_id] = now
            if d.finished:
                if arrival_delay_ms > 0:
                    due.append(now + rng.uniform(0, arrival_delay_ms) / 1e3)
                    due.sort()
                else:
                    add_next()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    ttfts = sorted(first[r] - added[r] for r in first)
    itls.sort()

    def pct(xs: list[float], q: float) -> float:
        return 1e3 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": len(prompts),
        "concurrency": concurrency,
        "seconds": total,
        "requests_per_s": len(prompts) / total,
        "output_tokens_per_s": n_tokens / total,
        "ttft_p50_ms": pct(ttfts, 0.5),
        "ttft_p99_ms": pct(ttfts, 0.99),
        "itl_p50_ms": pct(itls, 0.5),
        "itl_p99_ms": pct(itls, 0.99),
        "step_p50_ms": pct(sorted(step_times), 0.5),
        "steps": len(step_times),
        "steps_admitting": mixed,
        "arrival_delay_ms": arrival_delay_ms,
    }


def profile_w1(core: EngineCore, proc: Qwen2_5_VLProcessor, prompt: Prompt) -> None:
    """Kernel time by op for the prefill step and for 16 decode steps of one W1 request, plus host time."""
    from torch.profiler import ProfilerActivity, profile

    pp = proc.process(prompt.text, [prompt.image])
    params = SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)
    core.add_request(
        EngineRequest("profile", pp.token_ids, params, pp.images, pp.mrope_positions, pp.mrope_delta)
    )
    for phase, steps in (("prefill", 1), ("decode x16", 16)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                core.step()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        print(f"--- {phase}: wall {wall * 1e3:.1f} ms (profiled), kernel time {gpu:.1f} ms")
        print(
            prof.key_averages().table(
                sort_by="self_device_time_total", row_limit=30, max_name_column_width=60
            )
        )
    while core.has_unfinished_requests():
        core.step()


def hf_baseline(ckpt: Path, prompt: Prompt, out_len: int, batch: int, device: str) -> dict[str, Any]:
    import transformers
    from transformers import AutoConfig

    from vlmserve.models.processor import Qwen2_5_VLProcessor as P

    cfg = AutoConfig.from_pretrained(ckpt)
    hf_class = getattr(transformers, cfg.architectures[0])  # the registry's names are HF's class names
    with torch.device(device):
        model = hf_class._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    proc = P.from_pretrained(ckpt)
    pp = proc.process(prompt.text, [prompt.image])
    ids = torch.tensor([pp.token_ids] * batch, device=device)
    pixels = torch.cat([pp.images[0].data.values] * batch).to(device, torch.bfloat16)
    grid = torch.tensor([pp.images[0].data.grid_thw] * batch, device=device)
    mm = (ids == cfg.image_token_id).int()
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        image_grid_thw=grid,
        mm_token_type_ids=mm,
    )
    res = {}
    with torch.inference_mode():
        model.generate(**kw, max_new_tokens=4, do_sample=False, eos_token_id=None)  # warm-up
        for n, key in ((1, "ttft_ms"), (out_len, "total_ms")):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
            torch.cuda.synchronize()
            res[key] = 1e3 * (time.perf_counter() - t)
    res["ms_per_token"] = (res["total_ms"] - res["ttft_ms"]) / (out_len - 1)
    res["output_tokens_per_s"] = batch * out_len / (res["total_ms"] / 1e3)
    res["batch"] = batch
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _steady(phases: bool, *args: Any) -> dict[str, Any]:
    """run_steady, with its phases' host time per step in the result when `phases`."""
    if not phases:
        return run_steady(*args)
    with phase_timers() as totals:
        r = run_steady(*args)
    r["phases_ms_per_step"] = {k: round(1e3 * v / r["steps"], 3) for k, v in sorted(totals.seconds.items())}
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir; default: a generated one of --preset")
    ap.add_argument("--preset", default="7b", help="of --family: 7b; 8b (qwen3_vl); 30b-a3b (qwen3_vl_moe)")
    ap.add_argument("--family", default="qwen2_5_vl", help="qwen2_5_vl, qwen2_vl, qwen3_vl or qwen3_vl_moe")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--hf-baseline", action="store_true")
    ap.add_argument("--batches", default="1,8,32,64", help="W1 concurrency levels")
    ap.add_argument("--w2-concurrency", type=int, default=128)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="print where one W1 request's time goes")
    ap.add_argument("--engine-kwargs", default="{}", help="JSON of extra EngineArgs")
    ap.add_argument(
        "--steady",
        action="append",
        default=[],
        metavar="W:CONCURRENCY:REQUESTS[:DELAY_MS]",
        help="closed-loop arrivals inside the engine, e.g. W2:128:384, or W2:128:384:30 with each successor "
        "arriving up to 30 ms after its predecessor finished (repeatable)",
    )
    ap.add_argument("--profile-steady", action="store_true", help="cProfile the last --steady run's loop")
    ap.add_argument("--phases", action="store_true", help="time the engine loop's phases in --steady runs")
    ap.add_argument(
        "--json-schema",
        type=Path,
        help="a JSON schema file: the --steady runs are repeated with every request's output under it",
    )
    args = ap.parse_args(argv)

    from vlmserve.checkpoints.checkpoint import write_checkpoint

    ckpt = (
        Path(args.model)
        if args.model
        else write_checkpoint(
            Path(tempfile.mkdtemp()) / args.preset,
            preset=args.preset,
            weights=args.load_format != "dummy",
            family=args.family,
        )
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = Qwen2_5_VLProcessor.from_pretrained(ckpt)
    (w1_size, w1_len, w1_out) = WORKLOADS["W1"]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    w1 = make_prompt(proc, w1_size, w1_len, seed=0)
    results["w1_prompt_tokens"] = len(proc.process(w1.text, [w1.image]).token_ids)
    if args.hf_baseline and device == "cuda":
        import transformers

        results["transformers"] = transformers.__version__
        results["hf_w1_batch1"] = hf_baseline(ckpt, w1, w1_out, 1, device)
        print("HF W1 batch 1:", results["hf_w1_batch1"], flush=True)

    extra = json.loads(args.engine_kwargs)
    config = build_engine_config(EngineArgs(model=str(ckpt), load_format=args.load_format, **extra))
    t = time.perf_counter()
    core = EngineCore(config, proc)
    results["engine_load_s"] = time.perf_counter() - t
    # Warm-up: compilation, CUDA graphs, and the allocators' (device and pinned host) first requests, which
    # take several times longer than later ones.
    for i in range(3):
        run_batch(core, proc, [make_prompt(proc, w1_size, w1_len, seed=990 + i)], 8)
    # What a server that resizes on its host (`--image-resize host`) does there before the engine sees a W1
    # request: part of such a request's time to first token. A GPU server by default leaves the resize, like
    # the normalise + patchify, to the engine's device.
    times = []
    for _ in range(5):
        t = time.perf_counter()
        proc.process(w1.text, [w1.image])
        times.append(1e3 * (time.perf_counter() - t))
    results["w1_host_preprocess_ms"] = statistics.median(times)
    seed = 1
    for b in [int(x) for x in args.batches.split(",")]:
        # One request is a few hundred ms: the median of three runs (new images each time, so no cache hits).
        runs = []
        for _ in range(3 if b == 1 else 1):
            prompts = [make_prompt(proc, w1_size, w1_len, seed=seed + i) for i in range(b)]
            seed += b
            runs.append(run_batch(core, proc, prompts, w1_out))
        r = sorted(runs, key=lambda x: x["ttft_p50_ms"])[len(runs) // 2]
        if len(runs) > 1:
            r["ttft_ms_all_runs"] = [x["ttft_p50_ms"] for x in runs]
            r["tpot_ms_all_runs"] = [x["tpot_mean_ms"] for x in runs]
        results[f"w1_batch{b}"] = r
        print(f"W1 batch {b}:", r, flush=True)
    schema = json.loads(args.json_schema.read_text()) if args.json_schema else None
    for spec in args.steady:
        name, conc, count, *delay = spec.split(":")
        size, target, out_len = WORKLOADS[name]
        prompts = [make_prompt(proc, size, target, seed=seed + i) for i in range(int(count))]
        seed += int(count)
        delay_ms = float(delay[0]) if delay else 0.0
        r = _steady(args.phases, core, proc, prompts, out_len, int(conc), delay_ms)
        results[f"steady_{spec.replace(':', '_')}"] = r
        print(f"steady {spec}:", r, flush=True)
        if schema is not None:
            prompts = [make_prompt(proc, size, target, seed=seed + i) for i in range(int(count))]
            seed += int(count)
            r = _steady(args.phases, core, proc, prompts, out_len, int(conc), delay_ms, schema)
            results[f"steady_{spec.replace(':', '_')}_json"] = r
            print(f"steady {spec} under the JSON schema:", r, flush=True)
    if args.profile_steady and args.steady:
        import cProfile
        import pstats

        name, conc, count, *_ = args.steady[-1].split(":")
        size, target, out_len = WORKLOADS[name]
        prompts = [make_prompt(proc, size, target, seed=seed + i) for i in range(int(count))]
        seed += int(count)
        profiler = cProfile.Profile()
        profiler.enable()
        run_steady(core, proc, prompts, out_len, int(conc), json_schema=schema)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    if args.w2_concurrency:
        w2_size, _, w2_out = WORKLOADS["W2"]
        prompts = [make_prompt(proc, w2_size, None, seed=seed + i) for i in range(args.w2_concurrency)]
        r = run_batch(core, proc, prompts, w2_out)
        results[f"w2_c{args.w2_concurrency}"] = r
        print(f"W2 concurrency {args.w2_concurrency}:", r, flush=True)
    results["engine_stats"] = core.stats()
    if args.profile:  # last: the profiler's tracing slows later host work down
        profile_w1(core, proc, make_prompt(proc, w1_size, w1_len, seed=12345))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
