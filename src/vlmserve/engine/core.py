"""The engine core: one step loop over the scheduler, the model runner and the detokenizers.

    step():  schedule -> runner.launch -> scheduler.update_from_output -> detokenize -> deltas

With asynchronous scheduling (the default on a GPU) a step is one step ahead of its outputs:

    step():  schedule N+1 -> runner.launch N+1 (queued behind N) -> wait for N -> update, detokenize N

so the host's work for one step (scheduling, input building, detokenizing, stop checks) runs while the GPU
computes the other, instead of leaving the GPU idle between steps. A token sampled by N reaches N+1's inputs
on the device. What that costs: a request that stops on a token's value (eos, stop id, stop string) has
one extra row computed and dropped. Requests whose sampling needs their full history (penalties, min_tokens,
an output grammar) make the loop wait for N before scheduling N+1.

Structured outputs (engine/structured.py): a constrained request is not ready to schedule until its grammar
compiled on the compile pool; each step's scheduled constrained rows get one bitmask, filled when the
sampler asks for it (their previous tokens are known by then, by the rule above) or, with the asynchronous
loop, started on a fill thread as soon as the previous step's tokens advanced the matchers, while this
thread detokenizes that step, and joined when the sampler asks; on a GPU all of it runs while the step's
forward does. A matcher that errs fails its request at the next step's start.

Owns request bookkeeping across those three (n > 1 fan-out, logprobs, stop strings, stats). It is driven by
one engine client's loop (a thread in async_engine.py, a child process in engine_process.py, or the offline
`LLM` calling step() itself); it never touches asyncio or HTTP, and takes requests already built by the input
processor (input_processor.py). Whether their images arrive as pixels or patches is the config's call
(`EngineConfig.images_as_pixels`); the runner takes either.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmserve.config import EngineConfig
from vlmserve.engine import kv_sizing
from vlmserve.engine.detokenizer import IncrementalDetokenizer
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta, TokenLogprob
from vlmserve.engine.request import Request, RequestStatus, requests_from_engine_request
from vlmserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from vlmserve.engine.structured import GrammarCompiler, PendingBitmask, StructuredOutputs
from vlmserve.models.layers.parallel import check_tensor_parallel
from vlmserve.models.loader import load_model, read_config
from vlmserve.models.processor import Qwen2_5_VLProcessor
from vlmserve.runner.kv_quant import kv_storage_dtype
from vlmserve.runner.model_runner import (
    ModelRunner,
    PreparedStep,
    SampledToken,
    StepOutput,
    kv_bytes_per_block,
)
from vlmserve.runner.tensor_parallel import WorkerGroup

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    """Per-choice state the scheduler does not keep: text, logprobs not yet reported."""

    request_id: str
    index: int
    detok: IncrementalDetokenizer
    pending_ids: list[int] = dataclasses.field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    reported_tokens: int = 0


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        processor: Qwen2_5_VLProcessor | None = None,
        force_tensor_parallel: bool = False,
    ) -> None:
        """`force_tensor_parallel`: take the tensor-parallel path (parallel layers, collectives, a worker
        group) even for one rank: a world of one checks the NCCL path on a single GPU."""
        self.config = config
        device = torch.device(config.device)
        self.processor = processor or Qwen2_5_VLProcessor.from_pretrained(config.model_path)
        torch.manual_seed(config.seed)
        # Tensor parallelism: ranks 1 .. N-1 in worker processes, rank 0 in this one (runner/tensor_parallel.py).
        self.workers: WorkerGroup | None = None
        if config.tensor_parallel_size > 1 or force_tensor_parallel:
            check_tensor_parallel(read_config(Path(config.model_path)).text, config.tensor_parallel_size)
            self.workers = WorkerGroup(config)
            if device.type == "cuda":
                device = torch.device("cuda", 0)
        try:
            num_blocks, per_block, scheduler_config = self._load(device)
        except BaseException:
            self.shutdown()
            raise
        self.scheduler = Scheduler(scheduler_config, eos_token_ids=self.eos_token_ids)
        self.num_blocks = num_blocks
        # Grammars compile on their own threads; the tokenizer's llguidance view is built there on first use.
        self.structured = StructuredOutputs(
            GrammarCompiler(
                self.processor.tokenizer.to_str(), self.model.config.text.vocab_size, self.eos_token_ids
            ),
            mask_buffer=self.runner.mask_buffer,
        )
        self._choices: dict[str, _Choice] = {}  # scheduler request id -> choice
        self._children: dict[str, list[str]] = {}  # caller's request id -> scheduler request ids
        self._last_scheduled: list[str] = []
        self.async_scheduling = config.async_scheduling
        self._in_flight: tuple[SchedulerOutput, StepOutput] | None = None  # launched, not yet applied
        self._to_launch: tuple[SchedulerOutput, PreparedStep] | None = None  # prepared, queued next call
        # Deltas of applied steps not yet returned: a failure later in the same step() call hands them out with
        # its error deltas (a request that finished in them has no other way to get its last delta).
        self._undelivered: list[CompletionDelta] = []
        self._tokens_generated = 0
        self._prompt_tokens_computed = 0
        self._started = time.monotonic()
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            config.block_size,
            num_blocks * per_block / 2**20,
        )

    def _load(self, device: torch.device) -> tuple[int, int, SchedulerConfig]:
        """Load the model (this rank's shard) and build the runner (with the workers' runners);
        (KV blocks, bytes per block, the scheduler's configuration)."""
        config = self.config
        self.model = load_model(
            config.model_path,
            config.dtype,
            device,
            load_format=config.load_format,
            quantization=config.quantization,
            tp=None if self.workers is None else self.workers.tp,
        )
        self.eos_token_ids = tuple(self.processor.eos_token_ids or self.model.config.eos_token_ids)
        dtype = kv_storage_dtype(config.kv_cache_dtype, next(self.model.parameters()).dtype, device)
        per_block = kv_bytes_per_block(self.model, config.block_size, dtype)
        # On a GPU without num_kv_blocks, the runner starts with a cache for the largest step alone; that
        # step's measured memory sizes the real one (engine/kv_sizing.py).
        step = None
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif device.type == "cuda":
            step = self._largest_step()
            num_blocks = step.num_blocks
        else:
            num_blocks = max(2, config.kv_cache_memory_bytes // per_block)
        runner_kwargs = dict(
            num_blocks=num_blocks,
            block_size=config.block_size,
            eos_token_ids=self.eos_token_ids,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            capture_graphs=step is None,
        )
        if step is None:
            # Validated (one max_model_len sequence must fit, ...) before the runner allocates the cache.
            scheduler_config = self._scheduler_config(num_blocks)
        if self.workers is not None:
            self.workers.start_runners(runner_kwargs)
        self.runner = ModelRunner(
            self.model,
            encoder_input=self.processor.encoder_input,
            kv_cache_dtype=dtype,
            workers=self.workers,
            **runner_kwargs,  # type: ignore[arg-type]
        )
        if self.workers is not None:
            self.workers.wait_ready()
        if step is not None:
            profile = kv_sizing.measure(self.runner, step)
            num_blocks = profile.kv_blocks(config.gpu_memory_utilization, per_block)
            logger.info(
                "GPU memory: %.2f GiB in use without a KV cache, %.2f GiB peak activations of the largest "
                "step, %.2f GiB for CUDA graphs; at gpu_memory_utilization=%s of %.2f GiB: %d KV blocks",
                profile.in_use / 2**30,
                profile.activations / 2**30,
                profile.graphs / 2**30,
                config.gpu_memory_utilization,
                profile.total / 2**30,
                num_blocks,
            )
            scheduler_config = self._scheduler_config(num_blocks)
            self.runner.allocate_kv_cache(num_blocks)
            free, total = torch.cuda.mem_get_info(device)
            logger.info(
                "GPU memory in use with the KV cache and CUDA graphs: %.2f GiB (the largest step adds "
                "%.2f GiB: %.2f GiB of %.2f GiB)",
                (total - free) / 2**30,
                profile.activations / 2**30,
                (total - free + profile.activations) / 2**30,
                total * config.gpu_memory_utilization / 2**30,
            )
        return num_blocks, per_block, scheduler_config

    def _max_image_tokens(self) -> int:
        """Tokens of the largest image the processor can produce."""
        unit = (self.processor.patch_size * self.processor.spatial_merge_size) ** 2
        return max(self.config.mm_processor_kwargs.get("max_pixels", 0), self.processor.max_pixels) // unit

    def _largest_step(self) -> kv_sizing.LargestStep:
        config = self.config
        # The scheduler's limits; num_blocks is the least that passes its checks, the step brings its own.
        limits = self._scheduler_config(1 + -(-config.max_model_len // config.block_size))
        images = config.limit_mm_per_prompt.get("image", 1) > 0  # none when no prompt may carry one
        return kv_sizing.LargestStep(
            limits,
            self._max_image_tokens() if images else 0,
            self.processor.patch_size,
            self.processor.spatial_merge_size,
            self.model.config.image_token_id,
            self.model.config.text.vocab_size,
        )

    def _scheduler_config(self, num_blocks: int) -> SchedulerConfig:
        config = self.config
        # One image must fit into a step's encoder budget and into the encoder cache, whatever the
        # token budget: size both for the largest image the processor can produce.
        max_image_tokens = self._max_image_tokens()
        return SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            encoder_cache_size=max(config.encoder_cache_tokens, max_image_tokens),
            max_encoder_tokens_per_step=max(config.max_num_batched_tokens, max_image_tokens),
            max_queued_requests=config.max_queued_requests,
        )

    # --- requests ----------------------------------------------------------------------------------------

    def add_request(self, req: EngineRequest) -> None:
        if req.request_id in self._children:
            raise ValueError(f"request id {req.request_id!r} is already running")
        children = requests_from_engine_request(req)
        params = req.sampling_params
        if params.structured_outputs is not None:
            for child in children:
                child.ready = False  # until its grammar compiled (_poll_grammars)
        self.scheduler.add_requests(children)  # all or none: raises on too long / queue full
        if params.structured_outputs is not None:
            for child in children:
                self.structured.add(child.request_id, params.structured_outputs)
        for child in children:
            self._choices[child.request_id] = _Choice(
                req.request_id,
                child.index,
                IncrementalDetokenizer(
                    self.processor.tokenizer,
                    req.prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                ),
            )
        self._children[req.request_id] = [c.request_id for c in children]

    def abort(self, request_id: str) -> None:
        for rid in self._children.pop(request_id, []):
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            self._choices.pop(rid, None)
            self.structured.remove(rid)

    def is_request_done(self, request_id: str) -> bool:
        return request_id not in self._children

    def has_unfinished_requests(self) -> bool:
        # A step still in flight with no unfinished request left only holds rows to drop; the next step
        # (whenever it comes) waits for it.
        return self.scheduler.has_unfinished_requests()

    # --- the step ------------------------------------------------------------------------------------------

    def step(self) -> list[CompletionDelta]:
        if self.structured.has_pending:
            self._poll_grammars()
        for rid, message in self.structured.take_errors().items():
            # Failed here, between steps: a scheduled step may have read its blocks until now.
            if rid in self._choices:
                self._undelivered += self._fail(
                    [rid], f"the output constraint failed: {message}", "constraint"
                )
        if not self.async_scheduling:
            sched = self._schedule()
            self._last_scheduled = [s.request.request_id for s in sched.scheduled]
            deltas = self._apply(sched, self.runner.launch(sched))
            if self._undelivered:  # requests whose grammar failed to compile
                deltas, self._undelivered = self._undelivered + deltas, []
            return deltas
        if self._to_launch is not None:
            queued, step = self._to_launch
            self._to_launch = None
            # The step before it was applied in the last call: only this one's requests can fail here.
            self._last_scheduled = [s.request.request_id for s in queued.scheduled]
            self._in_flight = (queued, step.run())
        prev = self._in_flight
        known = prev is not None and self._needs_known_tokens()
        sched = self._schedule()
        self._last_scheduled = [s.request.request_id for s in sched.scheduled]
        if prev is None:
            self._in_flight = (sched, self.runner.launch(sched))
        else:
            self._last_scheduled += [s.request.request_id for s in prev[0].scheduled]
            # Inputs are built before `prev` is applied: applying it may free blocks that they name.
            # A request whose sampling reads its last token's value (`known`): only the forward is queued
            # behind `prev`; the sampling is queued once prev's tokens are applied (masks, penalties).
            step = self.runner.prepare(sched, prev[1], defer_sampling=known)
            if step.decode_only and (step.sampling_deferred or not known):
                # A decode step is cheap to queue: queue it behind `prev`, then do prev's host work meanwhile.
                # Its masks start filling as soon as prev's tokens advanced the matchers, while prev's
                # tokens are detokenized, and are joined when its sampling is queued.
                self._in_flight = (sched, step.run())
                self._undelivered += self._apply(
                    *prev, next_masks=sched.grammar_bitmask if step.sampling_deferred else None
                )
                self._in_flight[1].sample_now()
            else:
                # An eager step is thousands of kernel launches: queued now, they would hold the host until
                # most of `prev` ran, and prev's tokens would wait for that. Hand them out first; the step
                # is queued at the start of the next call (the GPU idles only for the caller's turn).
                self._in_flight = None
                self._undelivered += self._apply(*prev)
                self._to_launch = (sched, step)
        if not sched.scheduled:
            # Nothing was queued: nothing to wait for next step either.
            self._in_flight = None
            self._undelivered += self._apply(sched, StepOutput([]))
        deltas, self._undelivered = self._undelivered, []
        return deltas

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's next step, with the grammar masks of its constrained sampling rows."""
        sched = self.scheduler.schedule()
        for rid in sched.finished_request_ids:
            self.structured.remove(rid)
        if not sched.scheduled and self.structured.has_pending:
            # Only requests whose grammars compile: wait for one (briefly) instead of spinning.
            self.structured.wait(0.05)
        sched.grammar_bitmask = self.structured.pending_bitmask(
            [s.request.request_id for s in sched.scheduled if s.sample]
        )
        return sched

    def _poll_grammars(self) -> None:
        ready, failed = self.structured.poll()
        for rid in ready:
            req = self.scheduler.requests.get(rid)
            if req is not None:
                req.ready = True
        for rid, message in failed.items():
            if rid in self._choices:
                self._undelivered += self._fail([rid], f"invalid output constraint: {message}", "constraint")

    def _needs_known_tokens(self) -> bool:
        """Whether a request with a token still being sampled needs its value to sample its next one."""
        return any(
            r.num_pending_tokens and r.sampling_params.reads_output_tokens for r in self.scheduler.running
        )

    def _apply(
        self, sched: SchedulerOutput, out: StepOutput, next_masks: PendingBitmask | None = None
    ) -> list[CompletionDelta]:
        """Wait for a launched step's tokens; update the scheduler and the matchers, then detokenize.
        `next_masks`: the masks of the step queued behind this one, which wait for these tokens: they start
        filling (on the fill thread) once the matchers advanced, while this thread detokenizes.

        NOTE: only here, where the next step samples later in the same step() call. A fill must not outlive
        the call (between calls the matchers are the caller's to touch: abort), and none is started before
        the forward of a synchronous CPU step, whose threads it would slow down more than it saves."""
        sampled = out.result()
        for s in sched.scheduled:
            if s.request.num_output_tokens == 0:
                self._prompt_tokens_computed += s.num_tokens
        updated = self.scheduler.update_from_output(sched, {rid: t.token_id for rid, t in sampled.items()})
        structured = self.structured
        for req in updated:
            rid = req.request_id
            if not structured.has_matcher(rid):
                continue
            if not req.is_finished:
                structured.accept(rid, req.output_token_ids[-1])
                if not structured.is_complete(rid):
                    continue
                # Nothing more can follow (e.g. the grammar consumed EOS under ignore_eos): stop here
                # rather than sample from a mask that allows no token.
                self.scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)
            # Finished: its row in the next step is dropped, so that step's mask need not fill one.
            structured.remove(rid)
        if next_masks is not None:
            next_masks.start()
        self._tokens_generated += len(updated)  # not the rows dropped for requests that had finished
        return self._deltas(updated, sampled)

    def _deltas(self, updated: list[Request], sampled: dict[str, SampledToken]) -> list[CompletionDelta]:
        out: list[CompletionDelta] = []
        for req in updated:
            choice = self._choices.get(req.request_id)
            if choice is None:
                continue
            tok = sampled.get(req.request_id)
            new_ids = req.output_token_ids[choice.reported_tokens :]
            choice.reported_tokens = len(req.output_token_ids)
            finished = req.is_finished
            text_ids = new_ids
            if finished and new_ids and self._ended_on_stop_token(req):
                text_ids = new_ids[:-1]  # EOS / a stop token id is reported as a token, never as text
            delta = choice.detok.update(text_ids, finished=finished)
            if req.sampling_params.logprobs is not None and tok is not None and tok.logprob is not None:
                choice.pending_logprobs.append(
                    TokenLogprob(tok.token_id, tok.logprob, tok.top_logprobs or [])
                )
            choice.pending_ids += new_ids
            if delta.stop_string is not None and not finished:
                self.scheduler.finish_request(
                    req.request_id, RequestStatus.FINISHED_STOPPED, delta.stop_string
                )
                finished = True
            # NOTE: a delta goes out for every new token even when its text is held back (a partial UTF-8
            # character, a possible stop-string prefix): token ids, logprobs and timing stay per token.
            out.append(self._emit(choice, req, delta.text, finished))
        return out

    def _ended_on_stop_token(self, req: Request) -> bool:
        if req.status is not RequestStatus.FINISHED_STOPPED or not req.output_token_ids:
            return False
        last = req.output_token_ids[-1]
        return last in req.sampling_params.stop_token_ids or (
            not req.sampling_params.ignore_eos and last in self.eos_token_ids
        )

    def _emit(self, choice: _Choice, req: Request, text: str, finished: bool) -> CompletionDelta:
        reason = None
        if finished:
            reason = req.status.finish_reason or "stop"
            self._choices.pop(req.request_id, None)
            self.structured.remove(req.request_id)
            siblings = self._children.get(choice.request_id, [])
            if all(s not in self._choices for s in siblings):
                self._children.pop(choice.request_id, None)
        d = CompletionDelta(
            request_id=choice.request_id,
            index=choice.index,
            text=text,
            token_ids=choice.pending_ids,
            logprobs=choice.pending_logprobs if req.sampling_params.logprobs is not None else None,
            finish_reason=reason,
            stop_reason=req.stop_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=req.num_output_tokens,
            num_image_tokens=req.num_image_tokens,
            num_cached_image_tokens=req.num_cached_image_tokens,
        )
        choice.pending_ids, choice.pending_logprobs = [], []
        return d

    # --- faults ----------------------------------------------------------------------------------------------

    def fail_scheduled(self, message: str) -> list[CompletionDelta]:
        """Finish the requests of the step that failed with an error (and of the step in flight with it);
        the rest keep running."""
        self.structured.settle()  # a fill the failed step started (its matchers are advanced next)
        self._in_flight = self._to_launch = None
        rids = dict.fromkeys(rid for rid in self._last_scheduled if rid in self._choices)
        delivered, self._undelivered = self._undelivered, []
        return delivered + self._fail(list(rids), message)

    def fail_all(self, message: str) -> list[CompletionDelta]:
        self.structured.settle()
        self._in_flight = self._to_launch = None
        delivered, self._undelivered = self._undelivered, []
        return delivered + self._fail(list(self._choices), message)

    def _fail(self, rids: list[str], message: str, kind: str | None = None) -> list[CompletionDelta]:
        out = []
        for rid in rids:
            choice = self._choices.pop(rid)
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_ERROR)
            self.structured.remove(rid)
            siblings = self._children.get(choice.request_id, [])
            if all(s not in self._choices for s in siblings):
                self._children.pop(choice.request_id, None)
            out.append(
                CompletionDelta(
                    choice.request_id, choice.index, "", [], None, "error", error=message, error_kind=kind
                )
            )
        return out

    # --- stats -------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (nothing else here holds a process or a thread)."""
        if self.workers is not None:
            self.workers.shutdown()

    def stats(self) -> dict[str, float]:
        s = self.scheduler.stats()
        return {
            "num_requests_running": s.num_running,
            "num_requests_waiting": s.num_waiting,
            "kv_cache_usage": s.kv_cache_usage,
            "num_free_kv_blocks": s.num_free_blocks,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "num_preemptions": s.num_preemptions,
            "encoder_cache_usage": s.encoder_cache_usage,
            "images_encoded_total": s.images_encoded,
            "encoder_cache_hits_total": s.encoder_cache_hits,
            "generation_tokens_total": self._tokens_generated,
            "prompt_tokens_computed_total": self._prompt_tokens_computed,
            "num_kv_blocks": self.num_blocks,
        }
