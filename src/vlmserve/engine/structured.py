"""Grammar-constrained decoding: constraints -> llguidance grammars -> one token bitmask per step.

Owns: turning a `StructuredOutputsParams` (JSON schema, any JSON object, regex, choice, Lark grammar) into an
llguidance grammar and checking it (`grammar_for`, `check_structured_outputs`: what the API calls to answer
a bad constraint with a 400 naming the field); compiling grammars off the step loop, in a small thread pool,
cached by the constraint and bounded in size and compile time (`GrammarCompiler`); and the per-request
matchers of the engine (`StructuredOutputs`): a request whose grammar is compiling is not ready to schedule
(others run meanwhile), each step gets one packed int32 bitmask for its constrained rows (`pending_bitmask`:
filled when the sampler asks for it, or started on a fill thread as soon as its rows' matchers are current
and joined then), and each accepted token advances its request's matcher (`accept`).

Why llguidance (over xgrammar): no Python dependencies, one abi3 wheel, 20x faster compiles of large schemas
and masks of the same order; figures in benchmarks/RESULTS.md.

Does not know: tensors (the sampler applies the bitmask where the logits are), the scheduler's policy, HTTP.
No torch.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

from vlmserve import envs
from vlmserve.engine.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Bounds on one constraint: its text (schema / regex / grammar source), and the parser's work per step (the
# lexer "fuel" and Earley items llguidance may spend computing one mask) so that no request can stall a step.
MAX_SPEC_CHARS = 256 * 1024
PARSER_LIMITS = llguidance.LLParserLimits(
    max_items_in_row=2000,
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    step_max_items=50_000,
    max_lexer_states=250_000,
    max_grammar_size=500_000,
)
# A request whose grammar takes longer than this to compile fails (with an error delta) instead of waiting.
COMPILE_TIMEOUT_S = 10.0
# Compiled grammars kept for reuse (by constraint); a hit costs one matcher copy.
GRAMMAR_CACHE_SIZE = 256
COMPILE_THREADS = 2
# Masks of fewer rows are filled on the calling thread, when they start: handing them to a thread (the fill
# thread, llguidance's pool) costs more than it saves there (8 rows of a 2k vocabulary: 0.68 ms through the
# pool, 0.06 ms in a loop; at a 152k vocabulary the two are level on 2 cores; benchmarks/grammar_masks.py
# --serial).
PARALLEL_FILL_MIN_ROWS = 16


# Threads of llguidance's mask pool (VLMSERVE_MASK_FILL_THREADS overrides). The rows of a step barely fill
# in parallel: on a 16-core H200 host a 128-row fill of the long-extraction schema took 2.0-2.2 ms with 2-4
# threads and 2.5 ms (2.9 with 10 other busy processes) with llguidance's default of 12
# (benchmarks/grammar_masks.py); served, 4 and 12 threads are level (10,349 and 10,137 output tok/s, W2
# under the schema, benchmarks/RESULTS.md). Fewer threads leave the cores to the engine thread and the front.
def _mask_fill_threads(configured: int | None = envs.VLMSERVE_MASK_FILL_THREADS) -> int:
    return configured or min(4, os.cpu_count() or 1)


MASK_FILL_THREADS = _mask_fill_threads()

# Compact JSON (no free whitespace): a model cannot fill its output with spaces between tokens, and the
# output reads as OpenAI's and vLLM's do.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
_ANY_JSON_OBJECT = {"type": "object"}


class StructuredOutputError(ValueError):
    """A constraint the grammar engine cannot use; `field` names the part of it that is wrong."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def grammar_for(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) of a constraint; raises StructuredOutputError for a constraint
    too large or not even well-formed. Does not check the grammar itself (`check_structured_outputs` does)."""
    kind = params.kind
    source = {"json": params.json, "regex": params.regex, "grammar": params.grammar}.get(kind)
    if source is not None and len(source) > MAX_SPEC_CHARS:
        raise StructuredOutputError(
            f"the {kind} constraint has {len(source)} characters, more than this server's limit of "
            f"{MAX_SPEC_CHARS}; send a smaller one",
            kind,
        )
    if kind == "json":
        assert params.json is not None
        return llguidance.LLMatcher.grammar_from_json_schema(params.json, defaults=_JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_ANY_JSON_OBJECT, defaults=_JSON_OPTIONS)
    if kind == "regex":
        assert params.regex is not None
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        assert params.choice is not None
        # A Lark alternation of JSON-quoted literals: exact strings, any characters.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    assert params.grammar is not None
    return llguidance.LLMatcher.grammar_from_lark(params.grammar)


def check_structured_outputs(params: StructuredOutputsParams) -> str:
    """Build and check a constraint's grammar; return it, or raise StructuredOutputError naming what is
    wrong (a schema that is not valid JSON Schema or uses a feature the engine lacks, a regex that does
    not compile, a grammar with a syntax error, a constraint beyond the limits)."""
    try:
        grammar = grammar_for(params)
    except ValueError as e:
        raise StructuredOutputError(f"invalid {params.kind} constraint: {e}", params.kind) from e
    error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=PARSER_LIMITS)
    if error:
        what = {
            "json": "JSON schema",
            "json_object": "JSON object constraint",
            "regex": "regular expression",
            "choice": "choice",
            "grammar": "grammar",
        }[params.kind]
        raise StructuredOutputError(f"the {what} cannot be used: {error.strip()}", params.kind)
    return grammar


def build_tokenizer(tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """The llguidance view of the model's tokenizer (tokenizer.json text). `vocab_size` is the model's
    logits width: masks cover every logit, and ids past the tokenizer's end are never allowed."""
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))


class GrammarCompiler:
    """Compiles grammars on a small thread pool (never on the step loop) and caches them by constraint.

    A compiled grammar is a fresh matcher; each request gets its own copy. The tokenizer is built on the
    pool as well (seconds for a 150k-token vocabulary), as soon as the compiler exists.
    """

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        threads: int = COMPILE_THREADS,
    ) -> None:
        self._tokenizer_args = (tokenizer_json, vocab_size, tuple(eos_token_ids))
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="vlmserve-grammar")
        # Keyed by the constraint's hash (its fields are plain data; a JSON schema's text is canonical), so
        # that a hit skips building and validating the grammar too: it costs one matcher copy.
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.vocab_size = vocab_size
        # Built ahead, off the step loop: the first constrained request then waits only for its grammar.
        self._pool.submit(lambda: self.tokenizer)

    @property
    def tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = build_tokenizer(*self._tokenizer_args)
            return self._tokenizer

    def submit(self, params: StructuredOutputsParams) -> concurrent.futures.Future[Any]:
        """A future of a fresh matcher for `params` (raises StructuredOutputError when it fails)."""
        return self._pool.submit(self.compile, params)

    def compile(self, params: StructuredOutputsParams) -> Any:
        key = hashlib.sha256(repr(params).encode()).hexdigest()
        with self._cache_lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            grammar = check_structured_outputs(params)
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=PARSER_LIMITS)
            if template.is_error():
                raise StructuredOutputError(
                    f"the {params.kind} constraint cannot be used: {template.get_error()}", params.kind
                )
            with self._cache_lock:
                self._cache[key] = template
                while len(self._cache) > GRAMMAR_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return template.deep_copy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Pending:
    future: concurrent.futures.Future[Any]
    started: float


@dataclass(frozen=True)
class GrammarBitmask:
    """One step's token masks for its constrained rows: bit j of row i (little-endian in int32 words)
    allows token j for request `request_ids[i]`. Plain host data, built by the engine, applied by the
    sampler on the logits' device."""

    request_ids: list[str]
    bits: np.ndarray  # (R, ceil(V / 32)) int32


class PendingBitmask:
    """A step's bitmask, filled when the sampler asks for it (`resolve()`), or started earlier (`start()`)
    and joined then.

    With the asynchronous loop the engine calls `start()` right after the previous step's tokens advanced
    the matchers, so that the fill runs on the fill thread while the engine thread detokenizes and builds
    that step's deltas. The matchers cannot move between the start and the sampling: they advance only with
    tokens of steps already sampled, and this step samples only after `resolve()`."""

    def __init__(self, outputs: StructuredOutputs, request_ids: list[str]) -> None:
        self._outputs = outputs
        self._request_ids = request_ids
        self._fill: _Fill | None = None
        self._bitmask: GrammarBitmask | None = None
        self._resolved = False

    @property
    def request_ids(self) -> list[str]:
        """The constrained requests of the step, in sampling order (a row may lose its mask before the fill)."""
        return self._request_ids

    def start(self) -> None:
        """Start the fill (on the fill thread when the batch is large enough to gain from it). Only the rows
        whose request still has a matcher now get a mask: one finished before this is not filled."""
        if self._fill is None and not self._resolved:
            self._fill = self._outputs.start_fill(self._request_ids, background=True)

    def resolve(self) -> GrammarBitmask | None:
        if not self._resolved:
            fill = self._fill or self._outputs.start_fill(self._request_ids, background=False)
            self._bitmask = self._outputs.finish_fill(fill)
            self._fill = None
            self._resolved = True
        return self._bitmask


@dataclass
class _Fill:
    """One bitmask being filled: its rows' matchers, taken when it started, and the buffer they fill."""

    request_ids: list[str]
    matchers: list[Any]
    bits: np.ndarray  # (R, ceil(V / 32)) int32
    done: concurrent.futures.Future[None] | None = None  # while the fill thread works on it


def _compute_masks(executor: Any, matchers: list[Any], bits: np.ndarray) -> None:
    """Fill `bits`, one row per matcher: through llguidance's pool (`executor`) or row by row. Drops the GIL
    for the whole computation."""
    words = bits.shape[1]
    if executor is None:
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(bits[i].ctypes.data, words * 4)
    else:
        executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], bits.ctypes.data, words * 4, len(matchers)
        )


class StructuredOutputs:
    """The constrained requests of one engine: their matchers, readiness, per-step masks and advancing."""

    def __init__(
        self, compiler: GrammarCompiler, mask_buffer: Callable[[int, int], np.ndarray] | None = None
    ) -> None:
        """`mask_buffer(rows, words)`: host memory for one step's masks, (rows, words) int32 (the runner's
        pinned buffers on a GPU); a fresh array when None."""
        self.compiler = compiler
        self._mask_buffer = mask_buffer or (lambda rows, words: np.empty((rows, words), dtype=np.int32))
        self._pending: dict[str, _Pending] = {}
        self._matchers: dict[str, Any] = {}
        self._executor: Any = None
        # One thread that fills a step's masks while the engine thread goes on (PendingBitmask.start).
        self._fill_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._background: _Fill | None = None  # the fill on that thread not yet collected (finish_fill)
        # Requests whose matcher erred (a parser limit hit computing a mask, a refused token): their output
        # no longer follows the constraint; the engine fails them (`take_errors`).
        self._errors: dict[str, str] = {}

    def add(self, request_id: str, params: StructuredOutputsParams) -> None:
        self._pending[request_id] = _Pending(self.compiler.submit(params), time.monotonic())

    def poll(self) -> tuple[list[str], dict[str, str]]:
        """Collect finished compiles: (request ids now ready, {request id: error} for those that failed or
        ran past COMPILE_TIMEOUT_S)."""
        ready: list[str] = []
        failed: dict[str, str] = {}
        now = time.monotonic()
        for rid, pending in list(self._pending.items()):
            if pending.future.done():
                del self._pending[rid]
                try:
                    self._matchers[rid] = pending.future.result()
                    ready.append(rid)
                except Exception as e:  # a compile failure fails this request only
                    failed[rid] = str(e)
            elif now - pending.started > COMPILE_TIMEOUT_S:
                del self._pending[rid]
                pending.future.cancel()
                failed[rid] = (
                    f"the output constraint took more than {COMPILE_TIMEOUT_S:.0f} s to compile; simplify it"
                )
        return ready, failed

    @property
    def num_tracked(self) -> int:
        """Requests with a matcher or a compile in progress (0 when none is in flight: else a leak)."""
        return len(self._matchers) + len(self._pending)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def wait(self, timeout: float) -> None:
        """Block until a pending compile finishes or `timeout` seconds pass."""
        futures = [p.future for p in self._pending.values()]
        if futures:
            concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def has_matcher(self, request_id: str) -> bool:
        return request_id in self._matchers

    def pending_bitmask(self, request_ids: Sequence[str]) -> PendingBitmask | None:
        """The bitmask of the constrained requests among `request_ids` (those sampling in a step), to be
        filled when the sampler needs it; None when none of them is constrained."""
        constrained = [rid for rid in request_ids if rid in self._matchers]
        return PendingBitmask(self, constrained) if constrained else None

    def take_errors(self) -> dict[str, str]:
        errors, self._errors = self._errors, {}
        return errors

    def fill_bitmask(self, request_ids: Sequence[str]) -> GrammarBitmask | None:
        """One bitmask for the constrained requests among `request_ids` (those sampling this step), filled
        now on this thread (by llguidance's pool for larger batches); None when none is constrained."""
        return self.finish_fill(self.start_fill(request_ids, background=False))

    def start_fill(self, request_ids: Sequence[str], background: bool) -> _Fill:
        """Start filling the masks of the constrained requests among `request_ids` as their matchers are
        now: on the fill thread when `background` and the batch is large enough to gain from it, else here.
        `finish_fill` collects it, on the engine thread."""
        rows = [(rid, m) for rid in request_ids if (m := self._matchers.get(rid)) is not None]
        matchers = [m for _, m in rows]
        words = (self.compiler.vocab_size + 31) // 32
        if not rows:  # no buffer taken (the runner's are lent in turn)
            return _Fill([], [], np.empty((0, words), dtype=np.int32))
        bits = self._mask_buffer(len(rows), words)
        fill = _Fill([rid for rid, _ in rows], matchers, bits)
        executor = None
        if len(rows) >= PARALLEL_FILL_MIN_ROWS:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(MASK_FILL_THREADS)
            executor = self._executor
        if not (background and executor is not None):
            _compute_masks(executor, matchers, bits)
            return fill
        if self._fill_thread is None:
            self._fill_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlmserve-masks")
        # NOTE: a thread waiting for the GIL gets it only when the holder blocks or after the switch interval
        # (5 ms), so a fill merely submitted would start when this thread waits for it, not before. Wait
        # until the fill thread is on its way into llguidance (which drops the GIL) before going on.
        started = threading.Event()

        def run() -> None:
            started.set()
            _compute_masks(executor, matchers, bits)

        fill.done = self._fill_thread.submit(run)
        started.wait()
        self._background = fill
        return fill

    def settle(self) -> None:
        """Wait for a fill started on the fill thread and never collected: its step failed between the
        start and the sampling. Until it ends it reads its matchers (which the next step's tokens advance)
        and writes its buffer (which the runner lends again two fills later)."""
        fill, self._background = self._background, None
        if fill is not None and fill.done is not None:
            concurrent.futures.wait([fill.done])

    def finish_fill(self, fill: _Fill) -> GrammarBitmask | None:
        """Wait for a fill; its rows that cannot be used allow every token this step and their requests
        go among the errors (`take_errors`; the engine fails them next step). None when it has no row."""
        if not fill.request_ids:
            return None
        if fill.done is not None:
            fill.done.result()
            if self._background is fill:
                self._background = None
        bits = fill.bits
        # A row that allows no token: the grammar cannot go on with this model's vocabulary (e.g. a choice of
        # strings whose bytes no token spells). Sampling from it would pick an arbitrary token.
        empty = ~bits.any(axis=1)
        for i, matcher in enumerate(fill.matchers):
            if matcher.is_error() or empty[i]:
                # Its row allows everything this step; the engine fails its request at the next step.
                rid = fill.request_ids[i]
                bits[i] = -1
                if self._matchers.get(rid) is matcher:  # not finished or removed since the fill started
                    del self._matchers[rid]
                    self._errors[rid] = matcher.get_error() or (
                        "it allows no token of this model's vocabulary here (the grammar cannot be "
                        "completed with this tokenizer)"
                    )
        return GrammarBitmask(fill.request_ids, bits)

    def accept(self, request_id: str, token_id: int) -> None:
        """Advance a request's matcher by its sampled token. A refused token puts the request among the
        errors (`take_errors`) and drops its matcher."""
        matcher = self._matchers.get(request_id)
        if matcher is None or matcher.consume_token(token_id):
            return
        error = matcher.get_error() or f"token {token_id} is not allowed"
        logger.warning("request %s: its output constraint refused token %d: %s", request_id, token_id, error)
        del self._matchers[request_id]
        self._errors[request_id] = error

    def is_complete(self, request_id: str) -> bool:
        """Whether the request's structure is complete and its grammar allows no further token."""
        matcher = self._matchers.get(request_id)
        return matcher is not None and matcher.is_stopped()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.future.cancel()
