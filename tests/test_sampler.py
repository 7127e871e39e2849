"""Sampler semantics on CPU (plus one CUDA check when a GPU is present): each filter and penalty against a
hand computation, logprobs against log_softmax, seed reproducibility, and the sampled frequencies against
the target distribution with a fixed global seed (so the statistical checks are deterministic)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.runner.sampler import (
    Sampler,
    SamplingTensors,
    apply_min_p,
    apply_top_k_top_p,
    build_sampling_tensors,
    make_generator,
    process_logits,
)

NEG_INF = float("-inf")
# A fixed distribution with distinct probabilities, so every filter's kept set is unambiguous.
PROBS = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # ranked: 1 (.5), 3 (.2), 4 (.15), 2 (.1), 0 (.05)
LOGITS = PROBS.log()


def make_batch(
    params: Sequence[SamplingParams],
    *,
    outputs: Sequence[Sequence[int]] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    eos: Sequence[int] = (),
    generators: Sequence[torch.Generator | None] | None = None,
    device: str = "cpu",
) -> SamplingTensors:
    n = len(params)
    if generators is None:
        generators = [make_generator(p.seed, device) for p in params]
    return build_sampling_tensors(
        params,
        outputs if outputs is not None else [[] for _ in range(n)],
        prompts if prompts is not None else [[] for _ in range(n)],
        generators,
        eos,
        device,
    )


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic over the tokens with nonzero probability; zero-probability tokens must not occur."""
    assert counts[probs == 0].sum() == 0, f"sampled a token with probability 0: counts={counts.tolist()}"
    support = probs > 0
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution, by degrees of freedom. With a fixed seed the draws are
# fixed too; the bound only has to be loose enough that a correct sampler passes for any seed one picks.
CHI2_CRITICAL_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def test_greedy_is_argmax_and_input_is_untouched() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(8, 300).to(dtype)
        before = logits.clone()
        batch = make_batch([SamplingParams(temperature=0.0, seed=i) for i in range(8)])
        out = Sampler()(logits, batch)
        assert out.token_ids == logits.float().argmax(dim=-1).tolist()
        assert out.logprobs is None
        assert out.top_logprobs is None
        assert torch.equal(logits, before)


def test_greedy_rows_do_not_advance_their_generator() -> None:
    generator = make_generator(7, "cpu")
    assert generator is not None
    state = generator.get_state()
    batch = make_batch(
        [SamplingParams(temperature=0.0, seed=7), SamplingParams(temperature=1.0)],
        generators=[generator, None],
    )
    Sampler()(torch.randn(2, 50), batch)
    assert torch.equal(generator.get_state(), state)


def test_temperature_scales_logits_like_reference_softmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    temperatures = [0.5, 1.0, 2.5]
    batch = make_batch([SamplingParams(temperature=t) for t in temperatures])
    probs = process_logits(logits, batch).softmax(dim=-1)
    reference = torch.stack(
        [torch.softmax(logits[i].double() / t, dim=-1) for i, t in enumerate(temperatures)]
    )
    torch.testing.assert_close(probs.double(), reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (1, 1.0, {1}),
        (3, 1.0, {1, 3, 4}),
        (0, 0.6, {1, 3}),  # .5 < .6, then .5 + .2 reaches it
        (0, 0.75, {1, 3, 4}),
        (0, 0.5 - 1e-3, {1}),
        (0, 1.0, {0, 1, 2, 3, 4}),
        (99, 1.0, {0, 1, 2, 3, 4}),  # top_k beyond the vocabulary keeps everything
        # top-p applies to the top-k survivors, renormalized: .5/.85 = .588, (.5+.2)/.85 = .824.
        (3, 0.8, {1, 3}),
        (3, 0.9, {1, 3, 4}),
    ],
)
def test_top_k_top_p_keep_exactly_the_right_set(top_k: int, top_p: float, expected: set[int]) -> None:
    batch = make_batch([SamplingParams(top_k=top_k, top_p=top_p)])
    assert kept(process_logits(LOGITS.unsqueeze(0), batch)[0]) == expected


def test_top_k_ties_at_the_kth_value_are_kept() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    for top_p in (None, torch.ones(1)):  # top-k-only path and the sort path
        out = apply_top_k_top_p(logits.clone(), torch.tensor([2]), top_p, max_top_k=2)
        assert kept(out[0]) == {0, 2, 3}


def test_top_k_only_path_matches_sort_path() -> None:
    torch.manual_seed(2)
    logits = torch.randn(16, 200)
    top_k = torch.randint(0, 60, (16,))
    top_k[3] = 0  # a disabled row among enabled ones
    fast = apply_top_k_top_p(logits.clone(), top_k, None, max_top_k=int(top_k.max()))
    sort = apply_top_k_top_p(logits.clone(), top_k, torch.ones(16), max_top_k=int(top_k.max()))
    assert torch.equal(fast, sort)
    for i in range(16):
        k = int(top_k[i]) or 200
        assert kept(fast[i]) == set(logits[i].topk(k).indices.tolist())


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.0, {0, 1, 2, 3, 4}), (0.25, {1, 3, 4}), (0.35, {1, 3}), (1.0, {1})],  # thresholds .125, .175, .5
)
def test_min_p_keeps_tokens_above_fraction_of_max(min_p: float, expected: set[int]) -> None:
    assert kept(apply_min_p(LOGITS.unsqueeze(0).clone(), torch.tensor([min_p]))[0]) == expected
    batch = make_batch([SamplingParams(min_p=min_p)])
    assert kept(process_logits(LOGITS.unsqueeze(0), batch)[0]) == expected


def test_filters_apply_to_the_tempered_distribution() -> None:
    # At temperature 2 the probabilities flatten to ~[.107, .340, .152, .215, .186]; top_p .6 then keeps
    # three tokens (.34 + .215 = .555 < .6), where at temperature 1 it keeps two.
    batch = make_batch(
        [SamplingParams(temperature=2.0, top_p=0.6), SamplingParams(temperature=1.0, top_p=0.6)]
    )
    out = process_logits(LOGITS.expand(2, -1), batch)
    assert kept(out[0]) == {1, 3, 4}
    assert kept(out[1]) == {1, 3}
    torch.testing.assert_close(out[0, 1], LOGITS[1] / 2)


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]]).expand(3, -1)
    prompt, output = [0, 1], [3, 3, 4]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(temperature=0.0, frequency_penalty=-0.5),  # prompt tokens do not count here
        SamplingParams(temperature=0.0),
    ]
    batch = make_batch(params, outputs=[output] * 3, prompts=[prompt] * 3)
    out = process_logits(logits, batch)
    # Row 0: repetition on {0, 1, 3, 4}: 2 -> 1, -1 -> -2, 3 -> 1.5, -2 -> -4; then token 3 (count 2):
    # 1.5 - 0.5 * 2 - 0.25 = 0.25, token 4 (count 1): -4 - 0.5 - 0.25 = -4.75.
    torch.testing.assert_close(out[0], torch.tensor([1.0, -2.0, 0.5, 0.25, -4.75, 1.0]))
    # Row 1: only output counts: token 3 -> 3 + 1.0, token 4 -> -2 + 0.5.
    torch.testing.assert_close(out[1], torch.tensor([2.0, -1.0, 0.5, 4.0, -1.5, 1.0]))
    torch.testing.assert_close(out[2], logits[2])
    # Greedy picks from the penalized logits: row 0's best is now token 0/5 (1.0), row 1's stays 3.
    tokens = Sampler()(logits, batch).token_ids
    assert tokens[0] in (0, 5)
    assert tokens[1:] == [3, 3]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(4, 10)
    logits[:, 7] = 5.0  # eos is everyone's argmax
    logits[:, 5] = 4.0  # then the stop id
    logits[:, 2] = 3.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(5, 10_000)),  # out-of-vocab id ignored
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(5,)),  # has 2 outputs: no mask
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,), ignore_eos=True),
        SamplingParams(temperature=0.0),
    ]
    batch = make_batch(params, outputs=[[1], [1, 1], [], []], eos=[7])
    out = process_logits(logits, batch)
    assert torch.isinf(out[0, [5, 7]]).all()
    assert torch.isfinite(out[1]).all()
    assert torch.isinf(out[2, 5])
    assert torch.isfinite(out[2, 7])  # ignore_eos: EOS does not stop the request, so it may be sampled
    assert torch.isfinite(out[3]).all()
    assert Sampler()(logits, batch).token_ids == [2, 7, 7, 7]


def test_logprobs_come_from_raw_logits() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 64).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.7, logprobs=None),
        SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, top_k=5, logprobs=4, seed=11, frequency_penalty=1.0),
    ]
    batch = make_batch(params, outputs=[[1, 2]] * 3, prompts=[[3]] * 3)
    out = Sampler()(logits, batch)
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs is not None
    assert out.top_logprobs is not None
    assert out.logprobs[0] is None
    assert out.top_logprobs[0] is None
    for row in (1, 2):
        assert out.logprobs[row] == pytest.approx(float(raw[row, out.token_ids[row]]), abs=1e-6)
    assert out.top_logprobs[1] == []
    top = raw[2].topk(4)
    assert [t for t, _ in out.top_logprobs[2]] == top.indices.tolist()
    assert [v for _, v in out.top_logprobs[2]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_seeded_rows_reproduce_regardless_of_batch_mates_and_position() -> None:
    torch.manual_seed(4)
    vocab = 500
    target_logits = torch.randn(vocab) * 0.3  # flat-ish, so a changed noise stream would change tokens
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(batch_params: list[SamplingParams], target_row: int, steps: int = 6) -> list[int]:
        generators = [make_generator(p.seed, "cpu") for p in batch_params]
        tokens = []
        for _ in range(steps):
            logits = torch.randn(len(batch_params), vocab)
            logits[target_row] = target_logits
            batch = make_batch(batch_params, generators=generators)
            tokens.append(Sampler()(logits, batch).token_ids[target_row])
        return tokens

    alone = run([target], 0)
    mates = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(top_k=3, seed=99),
    ]
    assert run([*mates, target], 3) == alone
    assert run([mates[2], target, mates[0]], 1) == alone
    assert run([SamplingParams(temperature=1.0, top_p=0.95, seed=4321)], 0) != alone


def test_sampled_frequencies_match_target_distribution() -> None:
    torch.manual_seed(5)
    n = 20_000
    counts = torch.bincount(
        torch.tensor(Sampler()(LOGITS.expand(n, -1), make_batch([SamplingParams()] * n)).token_ids),
        minlength=5,
    )
    assert chi_square(counts.float(), PROBS) < CHI2_CRITICAL_999[4]

    # Temperature 0.5 then top-k 3: p^2 over the three most likely tokens, renormalized.
    tempered = torch.zeros(5)
    tempered[[1, 3, 4]] = PROBS[[1, 3, 4]] ** 2
    tempered /= tempered.sum()
    params = [SamplingParams(temperature=0.5, top_k=3)] * n
    counts = torch.bincount(
        torch.tensor(Sampler()(LOGITS.expand(n, -1), make_batch(params)).token_ids), minlength=5
    )
    assert chi_square(counts.float(), tempered) < CHI2_CRITICAL_999[2]


def test_seeded_draws_follow_target_distribution() -> None:
    # One draw from each of many seeds: the per-row generator path must sample the same distribution.
    n = 3_000
    params = [SamplingParams(top_p=0.9, seed=seed) for seed in range(n)]
    out = Sampler()(LOGITS.expand(n, -1), make_batch(params))
    target = torch.zeros(5)
    target[[1, 3, 4, 2]] = PROBS[[1, 3, 4, 2]]  # top_p .9: .5 + .2 + .15 = .85 < .9, so 2 (.1) stays
    target /= target.sum()
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
    assert chi_square(counts, target) < CHI2_CRITICAL_999[3]


def test_mixed_batch_in_one_call() -> None:
    torch.manual_seed(6)
    vocab = 50
    logits = torch.randn(5, vocab)
    logits[3, 9] = 10.0  # row 3's eos is its argmax but min_tokens forbids it
    params = [
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(temperature=0.9, top_k=4, seed=21, logprobs=2),
        SamplingParams(temperature=1.1, top_p=0.5, min_p=0.1),
        SamplingParams(temperature=0.0, min_tokens=5, logprobs=1),
        SamplingParams(temperature=1.0, seed=22, repetition_penalty=1.3),
    ]
    outputs = [[int(logits[0].argmax())], [], [], [1], [2, 2]]
    prompts = [[0], [1], [2], [3], [4, 5]]
    batch = make_batch(params, outputs=outputs, prompts=prompts, eos=[9])
    out = Sampler()(logits, batch)

    penalized_0 = logits[0].clone()
    penalized_0[outputs[0][0]] -= 2.0
    assert out.token_ids[0] == int(penalized_0.argmax())
    assert out.token_ids[1] in set(logits[1].topk(4).indices.tolist())
    assert out.token_ids[2] in kept(process_logits(logits, batch)[2])
    masked_3 = logits[3].clone()
    masked_3[9] = NEG_INF
    assert out.token_ids[3] == int(masked_3.argmax())
    # Seeded rows give what they give alone.
    for row in (1, 4):
        alone = make_batch([params[row]], outputs=[outputs[row]], prompts=[prompts[row]], eos=[9])
        assert Sampler()(logits[row : row + 1], alone).token_ids == [out.token_ids[row]]
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None
    assert out.top_logprobs is not None
    assert [lp is None for lp in out.logprobs] == [True, False, True, False, True]
    assert out.logprobs[3] == pytest.approx(float(raw[3, out.token_ids[3]]), abs=1e-6)
    assert out.top_logprobs[3] is not None
    assert [t for t, _ in out.top_logprobs[3]] == [9]  # raw distribution: the masked eos is still the top


def test_build_sampling_batch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids has 1 entries but params has 2"):
        build_sampling_tensors([SamplingParams()] * 2, [[], []], [[]], [None, None], [], "cpu")
    with pytest.raises(ValueError, match="seed=5 but its generator is None"):
        build_sampling_tensors([SamplingParams(seed=5)], [[]], [[]], [None], [], "cpu")
    with pytest.raises(ValueError, match="params is empty"):
        build_sampling_tensors([], [], [], [], [], "cpu")
    batch = make_batch([SamplingParams()])
    with pytest.raises(ValueError, match=r"batch = 1 rows .* got shape \(2, 10\)"):
        Sampler()(torch.zeros(2, 10), batch)


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    a, b = make_generator(2**70 + 3, "cpu"), make_generator(2**70 + 3, "cpu")  # beyond torch's seed range
    assert a is not None
    assert b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_semantics() -> None:
    torch.manual_seed(7)
    batch_size, vocab = 64, 4096
    logits = torch.randn(batch_size, vocab)
    params = [
        SamplingParams(
            temperature=0.0 if i % 4 == 0 else 0.8,
            top_k=(0, 20, 0, 50)[i % 4],
            top_p=(1.0, 1.0, 0.9, 0.7)[i % 4],
            min_p=0.05 if i % 3 == 0 else 0.0,
            seed=i if i % 2 else None,
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            min_tokens=2,
            stop_token_ids=(3,),
            logprobs=2 if i % 5 == 0 else None,
        )
        for i in range(batch_size)
    ]
    outputs = [[i, i + 1] if i % 2 else [i] for i in range(batch_size)]
    prompts = [list(range(i, i + 30)) for i in range(batch_size)]
    cpu_batch = make_batch(params, outputs=outputs, prompts=prompts, eos=[1])
    gpu_batch = make_batch(params, outputs=outputs, prompts=prompts, eos=[1], device="cuda")
    torch.testing.assert_close(
        process_logits(logits.cuda(), gpu_batch).cpu(), process_logits(logits, cpu_batch)
    )
    cpu_out, gpu_out = Sampler()(logits, cpu_batch), Sampler()(logits.cuda(), gpu_batch)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    assert [gpu_out.token_ids[i] for i in greedy_rows] == [cpu_out.token_ids[i] for i in greedy_rows]
    processed = process_logits(logits, cpu_batch)
    for i, token in enumerate(gpu_out.token_ids):
        assert math.isfinite(float(processed[i, token])), f"row {i} sampled filtered token {token}"
    # Seeded CUDA rows reproduce with fresh generators on the same device.
    again = Sampler()(
        logits.cuda(), make_batch(params, outputs=outputs, prompts=prompts, eos=[1], device="cuda")
    )
    seeded_rows = [i for i, p in enumerate(params) if p.seed is not None]
    assert [again.token_ids[i] for i in seeded_rows] == [gpu_out.token_ids[i] for i in seeded_rows]
    assert gpu_out.logprobs is not None
    assert cpu_out.logprobs is not None
    for i in greedy_rows:
        if params[i].logprobs is not None:
            assert gpu_out.logprobs[i] == pytest.approx(cpu_out.logprobs[i], abs=1e-5)


def test_top_k_beyond_any_vocabulary_is_no_top_k() -> None:
    """k >= the vocabulary keeps every token; a k too large for int64 must not fail the engine step."""
    assert SamplingParams(top_k=2**70).top_k == SamplingParams(top_k=-1).top_k == 0
    logits = torch.randn(1, 50)
    out = Sampler()(logits, make_batch([SamplingParams(top_k=2**70, temperature=0)]))
    assert out.token_ids == [int(logits.argmax())]
