"""Batched token sampling with per-request parameters, on whatever device the logits live on.

Owns: turning one step's logits (one row per request that samples this step) into token ids and raw
logprobs, with each row's own temperature, top-k, top-p, min-p, presence / frequency / repetition
penalties, min_tokens masking and seed. The order and the formulas follow vLLM (and HF generate):

    grammar mask  : tokens a constrained row's grammar forbids -> -inf (one packed bitmask, all rows at once)
    raw logprobs  = log_softmax(masked logits) in float32       (only for rows that asked for logprobs)
    penalties     : repetition on prompt + output tokens, then frequency and presence on output tokens
    min_tokens    : eos and stop_token_ids -> -inf while a request has fewer than min_tokens outputs
    greedy rows   : argmax of the penalized logits
    random rows   : logits / temperature -> top-k -> top-p -> min-p -> softmax -> one draw

`build_sampling_tensors` turns the per-request Python state into tensors once per step; every flag that
picks a fast path (all greedy, no penalties, no top-k / top-p, ...) is computed there on the host, so the
sampler itself never waits on the device: `Sampler.sample` returns the tokens still on it (the next step can
read them there) with their copy to the host under way, and only `PendingSamples.output()` waits.

Seeds: a request with a seed draws its noise from its own `torch.Generator` (made once by the runner with
`make_generator`, kept for the request's lifetime), one full-vocabulary row per step. Its tokens then do
not depend on its batch mates or its row. Greedy rows never draw. A seeded stream reproduces on the same
device type only: CPU and CUDA generators give different numbers for the same seed.

The grammar mask comes first, as in vLLM (which masks the logits before its sampler computes logprobs): a
constrained row's logprobs are those of the distribution it can actually sample from.

Does not know: the model, the scheduler, request ids, stop strings, grammars or detokenization. Stopping (max_tokens,
EOS, stop ids and strings) is the engine's job; this module only keeps EOS / stop ids from being sampled
before min_tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmserve.devices import to_device
from vlmserve.engine.sampling_params import SamplingParams

# Temperatures below this are treated as greedy (as vLLM does): dividing logits by ~0 overflows float32
# and the resulting distribution is an argmax anyway.
_MIN_TEMPERATURE = 1e-5

# torch.Generator.manual_seed takes seeds in [-2**63, 2**64) and wraps negatives modulo 2**64; wrapping
# every Python int the same way keeps that meaning and lets any OpenAI `seed` through instead of failing
# deep in a step.
_SEED_MASK = (1 << 64) - 1


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None for an unseeded request (global RNG).

    Make it once, when the request first samples, and pass the same object every step: the request's
    reproducibility comes from its generator's state advancing only with its own draws.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed & _SEED_MASK)
    return generator


@dataclass(frozen=True)
class SamplingTensors:
    """One step's sampling parameters as tensors on the logits' device; build with `build_sampling_tensors`.

    Greedy rows hold neutral values (temperature 1, top_k 0, top_p 1, min_p 0) so the random path can run
    over the whole batch without special cases; their tokens come from the argmax.
    """

    temperature: torch.Tensor  # (B,) float32, 1.0 on greedy rows
    top_p: torch.Tensor  # (B,) float32, 1.0 = disabled
    top_k: torch.Tensor  # (B,) int64, 0 = disabled
    min_p: torch.Tensor  # (B,) float32, 0.0 = disabled
    presence_penalty: torch.Tensor  # (B,) float32
    frequency_penalty: torch.Tensor  # (B,) float32
    repetition_penalty: torch.Tensor  # (B,) float32
    is_greedy: torch.Tensor  # (B,) bool
    # Per-row generator for random rows that have a seed; None = the device's global RNG.
    generators: tuple[torch.Generator | None, ...]
    # Penalty bookkeeping, flattened (row, token id) pairs for the rows that use a penalty; None when unused.
    output_token_rows: torch.Tensor | None  # (N,) int64
    output_token_ids: torch.Tensor | None  # (N,) int64
    prompt_token_rows: torch.Tensor | None  # (M,) int64, only rows with repetition_penalty != 1
    prompt_token_ids: torch.Tensor | None  # (M,) int64
    # (row, token id) pairs to set to -inf: eos / stop ids of rows still short of min_tokens. Host lists,
    # because ids outside the model's vocabulary are dropped once the vocabulary size is known.
    min_tokens_rows: tuple[int, ...]
    min_tokens_token_ids: tuple[int, ...]
    # None: the row wants no logprobs; k >= 0: the sampled token's logprob plus the top k.
    num_logprobs: tuple[int | None, ...]
    logprob_rows: torch.Tensor | None  # (R,) int64 rows that want logprobs; None when all or none do
    # Host-side flags that pick fast paths without reading the device.
    all_greedy: bool
    all_random: bool
    has_unseeded_random: bool
    has_repetition_penalty: bool
    has_frequency_presence_penalty: bool
    max_top_k: int  # the largest enabled top_k, 0 when no row uses top-k
    has_top_p: bool
    has_min_p: bool
    max_num_logprobs: int | None  # None when no row wants logprobs
    # Grammar masks (structured outputs): bit j of bitmask[i] (int32 words, little-endian bits) allows token j
    # in row bitmask_rows[i] (row i when bitmask_rows is None: every row is constrained). None when no row is.
    bitmask_rows: torch.Tensor | None = None  # (R,) int64
    bitmask: torch.Tensor | None = None  # (R, ceil(V / 32)) int32

    @property
    def size(self) -> int:
        return len(self.generators)


@dataclass(frozen=True)
class HostSamples:
    """Host-side results, one entry per batch row (the rows of the logits passed in)."""

    token_ids: list[int]
    # Logprob of the sampled token under the raw model distribution; None on rows that did not ask.
    # The whole field is None when no row asked.
    logprobs: list[float | None] | None
    # The row's num_logprobs most likely tokens under the raw distribution, most likely first, as
    # (token id, logprob); [] for num_logprobs == 0, None on rows that did not ask.
    top_logprobs: list[list[tuple[int, float]] | None] | None


def build_sampling_tensors(
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    prompt_token_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    eos_token_ids: Sequence[int],
    device: torch.device | str,
    token_bitmask: tuple[Sequence[int], np.ndarray] | None = None,
    num_earlier_pending: Sequence[int] | None = None,
    constrained_rows: Sequence[int] = (),
) -> SamplingTensors:
    """Pack the sampling state of the requests that sample this step (row i = request i) into tensors.

    `output_token_ids[i]` are request i's generated tokens so far (known ones; `num_earlier_pending[i]` more
    are still being sampled by steps not yet applied, which min_tokens counts), `prompt_token_ids[i]` its
    prompt, and
    `generators[i]` the generator `make_generator` returned for it (None when it has no seed).
    `eos_token_ids` are the model's end-of-sequence ids, masked with the request's stop_token_ids while
    it has fewer than min_tokens outputs (unless it set ignore_eos, in which case EOS does not stop it).
    `token_bitmask` is (rows, bits): the constrained rows and their packed grammar masks, (R,) and (R, W) int32.
    `constrained_rows`: rows under a grammar whose masks are attached later (`with_token_bitmask`), so that
    the tensors can be built while the masks are still being filled.
    """
    batch_size = len(params)
    for name, values in (
        ("output_token_ids", output_token_ids),
        ("prompt_token_ids", prompt_token_ids),
        ("generators", generators),
    ):
        if len(values) != batch_size:
            raise ValueError(
                f"build_sampling_tensors: {name} has {len(values)} entries but params has {batch_size}; "
                "pass one entry per request that samples this step, in the same order"
            )
    if batch_size == 0:
        raise ValueError(
            "build_sampling_tensors: params is empty; only call the sampler when a request samples"
        )
    device = torch.device(device)

    greedy = [p.greedy or p.temperature < _MIN_TEMPERATURE for p in params]
    row_generators: list[torch.Generator | None] = []
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.seed is not None and g is None:
            raise ValueError(
                f"build_sampling_tensors: request in row {i} has seed={p.seed} but its generator is None; "
                "create it once with make_generator(seed, device) and pass the same one every step"
            )
        if g is not None and g.device.type != device.type:
            raise ValueError(
                f"build_sampling_tensors: row {i}'s generator is on {g.device} but the batch is on {device}; "
                "create it with make_generator(seed, device) using the device the logits are on"
            )
        # Greedy rows never draw, so their generators are dropped here and their streams do not advance.
        row_generators.append(None if greedy[i] else g)

    temperature = [1.0 if gr else p.temperature for p, gr in zip(params, greedy, strict=True)]
    top_p = [1.0 if gr else p.top_p for p, gr in zip(params, greedy, strict=True)]
    top_k = [0 if gr else p.top_k for p, gr in zip(params, greedy, strict=True)]
    min_p = [0.0 if gr else p.min_p for p, gr in zip(params, greedy, strict=True)]
    presence = [p.presence_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]
    repetition = [p.repetition_penalty for p in params]

    # One host->device copy for every per-row float instead of one per field.
    scalars = to_device(
        torch.tensor(
            [temperature, top_p, min_p, presence, frequency, repetition, [float(g) for g in greedy]],
            dtype=torch.float32,
        ),
        device,
    )  # (7, B)
    top_k_t = to_device(torch.tensor(top_k, dtype=torch.int64), device)  # (B,)

    uses_repetition = [p.repetition_penalty != 1.0 for p in params]
    uses_freq_presence = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    # Output tokens feed all three penalties; prompt tokens only the repetition penalty.
    output_rows = [i for i in range(batch_size) if uses_repetition[i] or uses_freq_presence[i]]
    prompt_rows = [i for i in range(batch_size) if uses_repetition[i]]
    out_rows_t, out_ids_t = _flatten_token_ids(output_rows, output_token_ids, device)
    prompt_rows_t, prompt_ids_t = _flatten_token_ids(prompt_rows, prompt_token_ids, device)

    mask_rows: list[int] = []
    mask_ids: list[int] = []
    constrained = set(constrained_rows) | (set(token_bitmask[0]) if token_bitmask is not None else set())
    for i, p in enumerate(params):
        # Tokens sampled before this one: the known ones plus those still being sampled (asynchronous loop).
        earlier = len(output_token_ids[i]) + (num_earlier_pending[i] if num_earlier_pending else 0)
        if earlier < p.min_tokens:
            ids = set(p.stop_token_ids)
            # A grammar-constrained row ends when its structure is complete, and its mask allows EOS only
            # then: masking it too could leave the row no token at all.
            if not p.ignore_eos and i not in constrained:
                ids.update(eos_token_ids)
            mask_rows.extend([i] * len(ids))
            mask_ids.extend(sorted(ids))

    num_logprobs = tuple(p.logprobs for p in params)
    asking = [i for i, k in enumerate(num_logprobs) if k is not None]
    logprob_rows = None
    if 0 < len(asking) < batch_size:
        logprob_rows = to_device(torch.tensor(asking, dtype=torch.int64), device)

    enabled_top_k = [k for k in top_k if k > 0]
    batch = SamplingTensors(
        temperature=scalars[0],
        top_p=scalars[1],
        min_p=scalars[2],
        presence_penalty=scalars[3],
        frequency_penalty=scalars[4],
        repetition_penalty=scalars[5],
        is_greedy=scalars[6] > 0.5,
        top_k=top_k_t,
        generators=tuple(row_generators),
        output_token_rows=out_rows_t,
        output_token_ids=out_ids_t,
        prompt_token_rows=prompt_rows_t,
        prompt_token_ids=prompt_ids_t,
        min_tokens_rows=tuple(mask_rows),
        min_tokens_token_ids=tuple(mask_ids),
        num_logprobs=num_logprobs,
        logprob_rows=logprob_rows,
        all_greedy=all(greedy),
        all_random=not any(greedy),
        has_unseeded_random=any(not gr and g is None for gr, g in zip(greedy, row_generators, strict=True)),
        has_repetition_penalty=any(uses_repetition),
        has_frequency_presence_penalty=any(uses_freq_presence),
        max_top_k=max(enabled_top_k, default=0),
        has_top_p=any(p < 1.0 for p in top_p),
        has_min_p=any(p > 0.0 for p in min_p),
        max_num_logprobs=max((num_logprobs[i] or 0 for i in asking), default=None),
    )
    if token_bitmask is not None:
        batch = with_token_bitmask(batch, *token_bitmask)
    return batch


def with_token_bitmask(batch: SamplingTensors, rows: Sequence[int], bits: np.ndarray) -> SamplingTensors:
    """`batch` with the packed grammar masks `bits` (R, W) int32 of its rows `rows` (R,). `bits` in pinned
    memory (the runner's mask buffers) is copied to the device without staging."""
    if not len(rows):
        return batch
    if bits.dtype != np.int32 or bits.ndim != 2 or bits.shape[0] != len(rows):
        raise ValueError(
            f"token bitmask: bits must be (rows, words) int32 with one row per "
            f"constrained row ({len(rows)}), got {bits.dtype} {bits.shape}"
        )
    if not all(0 <= r < batch.size for r in rows):
        raise ValueError(f"token bitmask: rows {list(rows)} outside the batch of {batch.size}")
    device = batch.temperature.device
    # Every row, in order (the common case: all requests under a grammar): no row indexing on the device.
    every_row = len(rows) == batch.size and all(r == i for i, r in enumerate(rows))
    bitmask_rows = None if every_row else to_device(torch.tensor(list(rows), dtype=torch.int64), device)
    bitmask = to_device(torch.from_numpy(np.ascontiguousarray(bits)), device)
    return dataclasses.replace(batch, bitmask_rows=bitmask_rows, bitmask=bitmask)


class Sampler:
    """Stateless: all per-request state comes in the `SamplingTensors`, all randomness from its generators
    (or the global RNG of the logits' device for unseeded rows)."""

    def __call__(self, logits: torch.Tensor, batch: SamplingTensors) -> HostSamples:
        """Sample one token per row of `logits` (B, V), float32 or bf16; the input is not modified."""
        return self.sample(logits, batch).output()

    def sample(self, logits: torch.Tensor, batch: SamplingTensors) -> PendingSamples:
        """As `__call__`, without waiting for the device: the tokens stay on it (to feed the next step) while
        their copy to the host runs; `.output()` waits for that copy."""
        if logits.dim() != 2 or logits.shape[0] != batch.size:
            raise ValueError(
                f"Sampler: logits must be (batch, vocab) with batch = {batch.size} rows (one per request "
                f"in the SamplingTensors), got shape {tuple(logits.shape)}"
            )
        if batch.bitmask is not None:
            logits = apply_token_bitmask(logits, batch.bitmask_rows, batch.bitmask)
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw = logits if batch.logprob_rows is None else logits.index_select(0, batch.logprob_rows)
            raw_logprobs = torch.log_softmax(raw, dim=-1, dtype=torch.float32)  # (R, V)

        processed = process_logits(logits, batch)  # (B, V) float32
        if batch.all_greedy:
            token_ids = processed.argmax(dim=-1)  # (B,)
        else:
            token_ids = _sample(processed, batch)
        return PendingSamples(token_ids, raw_logprobs, batch)


def process_logits(logits: torch.Tensor, batch: SamplingTensors) -> torch.Tensor:
    """The float32 logits (B, V) each row samples from: softmax of a random row's result is its sampling
    distribution, and a greedy row's argmax is its token. Does not modify `logits`."""
    # Always a fresh float32 copy: the steps below edit it in place and the caller keeps its logits.
    logits = logits.to(torch.float32, copy=True)  # (B, V)
    if batch.has_repetition_penalty or batch.has_frequency_presence_penalty:
        logits = apply_penalties(logits, batch)
    if batch.min_tokens_rows:
        _mask_min_tokens(logits, batch)
    if batch.all_greedy:
        return logits
    logits.div_(batch.temperature.unsqueeze(1))
    if batch.max_top_k > 0 or batch.has_top_p:
        logits = apply_top_k_top_p(
            logits,
            batch.top_k if batch.max_top_k > 0 else None,
            batch.top_p if batch.has_top_p else None,
            batch.max_top_k,
        )
    if batch.has_min_p:
        logits = apply_min_p(logits, batch.min_p)
    return logits


def apply_token_bitmask(
    logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor
) -> torch.Tensor:
    """`logits` (B, V) with the tokens that rows[i]'s bitmask[i] (W int32 words) does not allow set to -inf,
    as a new tensor (the input is not modified); `rows` None: bitmask[i] is row i's, for every row. Bit
    j % 32 of word j // 32 allows token j; logits past 32 * W are forbidden, mask bits past V ignored. All
    rows in a few batched ops on the logits' device."""
    num_rows, words = bitmask.shape
    vocab_size = logits.shape[1]
    # Word & (1 << k) is zero where bit k is clear (for k = 31 the weight is the sign bit: same test).
    weights = _bit_weights(bitmask.device)
    forbidden = (bitmask.unsqueeze(-1) & weights).eq(0).view(num_rows, words * 32)  # (R, 32W)
    if words * 32 < vocab_size:
        forbidden = torch.nn.functional.pad(forbidden, (0, vocab_size - words * 32), value=True)
    forbidden = forbidden[:, :vocab_size]  # (R, V)
    if rows is None:
        return logits.masked_fill(forbidden, float("-inf"))
    out = logits.clone()
    out.index_copy_(0, rows, out.index_select(0, rows).masked_fill_(forbidden, float("-inf")))
    return out


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    """(32,) int32: 1 << k for k in 0..31 (the last one is the sign bit), on `device`, made once."""
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int32), torch.arange(32, dtype=torch.int32))
        w = _BIT_WEIGHTS[device] = w.to(device)
    return w


def apply_penalties(logits: torch.Tensor, batch: SamplingTensors) -> torch.Tensor:
    """vLLM's penalties on float32 `logits` (B, V). May modify `logits`; use the returned tensor.

    repetition (tokens seen in prompt or output): positive logits / penalty, negative logits * penalty;
    then logits -= frequency * count + presence * (count > 0), counting output tokens only.
    """
    counts = torch.zeros_like(logits)  # (B, V) occurrences of each token in the row's output
    if batch.output_token_rows is not None and batch.output_token_ids is not None:
        ones = torch.ones_like(batch.output_token_ids, dtype=logits.dtype)  # (N,)
        # Accumulating 1.0s is exact in float32 (< 2**24 per cell), so atomics cannot make it nondeterministic.
        counts.index_put_((batch.output_token_rows, batch.output_token_ids), ones, accumulate=True)
    in_output = counts > 0  # (B, V)
    if batch.has_repetition_penalty:
        seen = in_output.clone()
        if batch.prompt_token_rows is not None and batch.prompt_token_ids is not None:
            seen.index_put_(
                (batch.prompt_token_rows, batch.prompt_token_ids),
                torch.ones((), dtype=torch.bool, device=seen.device),
            )
        penalty = batch.repetition_penalty.unsqueeze(1)  # (B, 1); 1.0 on rows without it
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if batch.has_frequency_presence_penalty:
        logits -= batch.frequency_penalty.unsqueeze(1) * counts
        logits -= batch.presence_penalty.unsqueeze(1) * in_output
    return logits


def _mask_min_tokens(logits: torch.Tensor, batch: SamplingTensors) -> None:
    vocab_size = logits.shape[1]
    # A stop id outside the vocabulary can never be sampled, so there is nothing to mask for it.
    pairs = [
        (r, t)
        for r, t in zip(batch.min_tokens_rows, batch.min_tokens_token_ids, strict=True)
        if 0 <= t < vocab_size
    ]
    if not pairs:
        return
    index = to_device(torch.tensor(pairs, dtype=torch.int64), logits.device)  # (P, 2)
    logits.index_put_((index[:, 0], index[:, 1]), torch.full((), float("-inf"), device=logits.device))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """Keep each row's top_k largest logits (ties at the k-th value kept) and then the smallest set of most
    likely tokens whose probability reaches top_p; the rest become -inf. top_k 0 / top_p 1 disable a row's
    filter; `max_top_k` is the largest enabled top_k (known on the host, so no device read).
    """
    vocab_size = logits.shape[1]
    neg_inf = float("-inf")
    if top_p is None:
        if top_k is None:
            return logits
        # Top-k alone needs only the k largest values per row, not a full sort.
        k = min(max_top_k, vocab_size)
        top_values = logits.topk(k, dim=-1).values  # (B, k), descending
        kth = (top_k.clamp(min=1, max=k) - 1).unsqueeze(1)  # (B, 1)
        threshold = top_values.gather(1, kth).masked_fill_((top_k == 0).unsqueeze(1), neg_inf)  # (B, 1)
        return logits.masked_fill_(logits < threshold, neg_inf)

    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)  # (B, V) each
    if top_k is not None:
        k = torch.where(top_k == 0, vocab_size, top_k.clamp(max=vocab_size))  # (B,)
        threshold = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # (B, 1)
        sorted_logits.masked_fill_(sorted_logits < threshold, neg_inf)
    probs = sorted_logits.softmax(dim=-1)  # (B, V)
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # (B, V) probability of the tokens ranked above
    # Rows with top_p = 1 keep everything: rounding in the cumsum can push its tail past 1.0.
    cutoff = torch.where(top_p < 1.0, top_p, torch.inf).unsqueeze(1)  # (B, 1)
    # The most likely token always survives (mass_before is 0 < top_p there).
    sorted_logits.masked_fill_(mass_before >= cutoff, neg_inf)
    return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's most likely token's probability.

    Compared in log space, p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p), which needs no
    softmax; min_p = 0 gives log 0 = -inf and keeps every token.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # (B, 1)
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _sample(logits: torch.Tensor, batch: SamplingTensors) -> torch.Tensor:
    """Token ids (B,) for a batch with at least one random row: argmax for greedy rows, and for random rows
    an exponential race, argmax(p / q) with q ~ Exp(1) iid, which picks token i with probability p_i."""
    probs = logits.softmax(dim=-1)  # (B, V)
    noise = torch.empty_like(probs)  # (B, V)
    if batch.has_unseeded_random:
        noise.exponential_()
    else:
        # Greedy rows' noise is discarded below; fill it rather than leave uninitialized memory in the math.
        noise.fill_(1.0)
    # NOTE: the only per-row loop. Each seeded row draws a whole row from its own generator, so its tokens
    # do not depend on which other rows share the batch or on its position.
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # exponential_ may return exactly 0 on some backends; 0/0 would be NaN and argmax picks NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    random_ids = probs.div_(noise).argmax(dim=-1)  # (B,)
    if batch.all_random:
        return random_ids
    return torch.where(batch.is_greedy, logits.argmax(dim=-1), random_ids)


class PendingSamples:
    """One step's sampled tokens (and logprobs), on their way to the host.

    `token_ids` (B,) stays on the device for the next step's inputs. The device -> host copies start when
    this is made and run behind the step's kernels; `output()` waits for them (on a GPU, for this step's
    work only, not for anything queued after it).
    """

    def __init__(self, token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, batch: SamplingTensors):
        self.token_ids = token_ids
        self.batch = batch
        self._sampled_logprobs: torch.Tensor | None = None
        self._top: tuple[torch.Tensor, torch.Tensor] | None = None
        if raw_logprobs is not None and batch.max_num_logprobs is not None:
            asked = token_ids if batch.logprob_rows is None else token_ids.index_select(0, batch.logprob_rows)
            self._sampled_logprobs = _to_host(raw_logprobs.gather(1, asked.unsqueeze(1)).squeeze(1))  # (R,)
            if batch.max_num_logprobs > 0:
                values, ids = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)  # (R, K) each, descending
                self._top = (_to_host(ids), _to_host(values))
        self._host_ids = _to_host(token_ids)
        self._ready: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def output(self) -> HostSamples:
        if self._ready is not None:
            self._ready.synchronize()  # the step's one wait on the device
        return _to_output(self._host_ids.tolist(), self._sampled_logprobs, self._top, self.batch)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # non_blocking from a CUDA tensor lands in pinned memory without waiting; valid once the event fires.
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


def _to_output(
    tokens: list[int],
    sampled_logprobs: torch.Tensor | None,
    top: tuple[torch.Tensor, torch.Tensor] | None,
    batch: SamplingTensors,
) -> HostSamples:
    if sampled_logprobs is None:
        return HostSamples(token_ids=tokens, logprobs=None, top_logprobs=None)

    rows = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
    sampled = sampled_logprobs.tolist()  # (R,)
    top_ids: list[list[int]] = [[] for _ in rows]
    top_values: list[list[float]] = [[] for _ in rows]
    if top is not None:
        top_ids, top_values = top[0].tolist(), top[1].tolist()

    logprobs: list[float | None] = [None] * batch.size
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * batch.size
    for j, row in enumerate(rows):
        k = batch.num_logprobs[row] or 0
        logprobs[row] = sampled[j]
        top_logprobs[row] = list(zip(top_ids[j][:k], top_values[j][:k], strict=True))
    return HostSamples(token_ids=tokens, logprobs=logprobs, top_logprobs=top_logprobs)


def _flatten_token_ids(
    rows: list[int], token_ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row, token id) pairs for `rows`, flattened to two (N,) int64 tensors; (None, None) when empty."""
    lengths = [len(token_ids[r]) for r in rows]
    total = sum(lengths)
    if total == 0:
        return None, None
    # np.fromiter is ~5x faster than torch.tensor on a list of Python ints; this runs every step over
    # every prompt and output token of the penalized rows.
    ids = np.fromiter(itertools.chain.from_iterable(token_ids[r] for r in rows), dtype=np.int64, count=total)
    row_ids = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    packed = to_device(torch.from_numpy(np.stack([row_ids, ids])), device)  # (2, N): one copy for both
    return packed[0], packed[1]
