"""Logits processors equal transformers' classes exactly; penalties follow their formulas; RNG per sequence."""

from __future__ import annotations

import pytest
import torch

from modelql.runtime.sampling import (
    InvalidParamsError,
    Sampler,
    SamplingParams,
    apply_frequency_presence,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    choose_batch,
    draw,
    process_logits,
)

V = 97


def _logits(b=3, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * scale


def _history(b=3, n=25, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, n), generator=g)


def _seen(ids):
    mask = torch.zeros(ids.shape[0], V, dtype=torch.bool)
    return mask.scatter(1, ids, True)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits, ids = _logits(), _history()
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, _seen(ids), penalty), expected)


@pytest.mark.parametrize("k", [1, 2, 10, V, 500])
def test_top_k_equals_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = _logits()
    assert torch.equal(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_equals_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = _logits()
    assert torch.equal(apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5, 1.0])
def test_min_p_equals_transformers(m):
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = _logits()
    assert torch.equal(apply_min_p(logits, m), MinPLogitsWarper(m)(None, logits.clone()))


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_temperature_equals_transformers(t):
    from transformers.generation.logits_process import TemperatureLogitsWarper

    logits = _logits()
    assert torch.equal(apply_temperature(logits, t), TemperatureLogitsWarper(t)(None, logits.clone()))


def test_full_chain_equals_transformers_processor_list():
    """Repetition penalty → temperature → top-k → top-p → min-p, as HF generate orders them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)

    logits, ids = _logits(), _history()
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
                              TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)])
    params = SamplingParams(repetition_penalty=1.2, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
    assert torch.equal(process_logits(logits, params, seen=_seen(ids)), hf(ids, logits.clone()))


def test_frequency_and_presence_follow_openai_formula():
    logits = _logits(b=1)
    generated = [3, 3, 3, 7, 11, 11]
    counts = torch.zeros(1, V)
    for t in generated:
        counts[0, t] += 1
    out = apply_frequency_presence(logits, counts, frequency=0.5, presence=0.25)
    expected = logits.clone()
    for j in range(V):
        c = generated.count(j)
        expected[0, j] -= 0.5 * c + 0.25 * (1 if c > 0 else 0)
    assert torch.equal(out, expected)


def test_sampler_counts_only_generated_tokens_for_frequency_but_prompt_too_for_repetition():
    prompt = [5, 6]
    s = Sampler(SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0, temperature=0), prompt, V)
    for t in (7, 7):
        s.observe(t)
    logits = torch.full((V,), 4.0)
    out = s.process(logits)[0]
    assert out[5] == out[6] == 2.0  # prompt: repetition only (4 / 2)
    assert out[7] == 4.0 / 2 - 2.0  # generated twice: repetition, then frequency 1.0 × 2
    assert out[8] == 4.0


def test_logit_bias_is_added():
    s = Sampler(SamplingParams(logit_bias={3: 100.0}, temperature=0), [], V)
    assert s.choose(_logits(b=1)[0]).token_id == 3


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = _logits(b=1, seed=4)[0]
    best = int(logits.argmax())
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=1, seed=1)):
        s = Sampler(params, [], V)
        assert all(s.choose(logits).token_id == best for _ in range(20))


def test_seeded_draws_are_reproducible_and_seeds_differ():
    logits = _logits(b=1, scale=0.5)[0]

    def draws(seed):
        s = Sampler(SamplingParams(seed=seed), [], V)
        return [s.choose(logits).token_id for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_respects_filters():
    logits = _logits(b=1, scale=0.3)[0]
    top2 = set(torch.topk(logits, 2).indices.tolist())
    s = Sampler(SamplingParams(top_k=2, seed=0), [], V)
    assert {s.choose(logits).token_id for _ in range(100)} == top2


def test_logprobs_are_of_the_unmodified_distribution():
    logits = _logits(b=1)[0]
    s = Sampler(SamplingParams(temperature=0.5, top_k=3, seed=0, logprobs=True, top_logprobs=4), [], V)
    choice = s.choose(logits)
    ref = torch.log_softmax(logits, -1)
    assert choice.logprob == pytest.approx(float(ref[choice.token_id]))
    assert [t for t, _ in choice.top_logprobs] == torch.topk(ref, 4).indices.tolist()


def test_choose_batch_mixes_greedy_and_sampled_rows():
    logits = _logits(b=3)
    samplers = [Sampler(SamplingParams(temperature=0), [], V), Sampler(SamplingParams(seed=3), [], V),
                Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), [int(logits[2].argmax())], V)]
    picks = [c.token_id for c in choose_batch(samplers, logits)]
    assert picks[0] == int(logits[0].argmax())
    ref = Sampler(SamplingParams(seed=3), [], V)
    assert picks[1] == ref.choose(logits[1]).token_id
    assert picks[2] == int(samplers[2].process(logits[2]).argmax())


def test_draws_follow_the_processed_distribution():
    """Inverse-CDF draws against the exact probabilities (brute-force frequencies, 20k draws): every
    token's frequency within 5 standard errors; filtered-out tokens are never drawn."""
    logits = _logits(b=1, scale=1.0, seed=11)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    probs = torch.softmax(process_logits(logits, params), -1)[0].double()
    gen = torch.Generator().manual_seed(5)
    n = 20000
    u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    picks = torch.tensor(draw(probs[None].expand(n, -1).float(), u))
    freq = torch.bincount(picks, minlength=V).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() <= 5 * se + 1e-12).all())
    assert int(freq[probs == 0].count_nonzero()) == 0
    assert draw(torch.tensor([[0.0, 0.5, 0.5, 0.0]]), [0.999999999999]) == [2]
    assert draw(torch.tensor([[0.0, 0.5, 0.5, 0.0]]), [0.0]) == [1]


def test_a_batch_chooses_what_each_row_chooses_alone():
    """choose_batch over mixed rows (grouped warping, penalties, bias, logprobs) equals choosing every
    row on its own: same tokens, same logprobs, same generator state afterwards."""
    logits = _logits(b=6, seed=2, scale=1.0)
    hist = _history(b=6, n=5).tolist()
    kinds = [dict(temperature=0.7, top_p=0.9, seed=1), dict(temperature=0.7, top_p=0.9, seed=2, logprobs=True),
             dict(temperature=0), dict(temperature=0, frequency_penalty=1.0, logit_bias={4: 3.0}),
             dict(temperature=1.3, top_k=5, min_p=0.05, seed=3, repetition_penalty=1.2, top_logprobs=3,
                  logprobs=True),
             dict(temperature=0.7, top_p=0.9, seed=4, presence_penalty=0.8)]

    def samplers():
        out = []
        for k, h in zip(kinds, hist):
            s = Sampler(SamplingParams(**k), h, V)
            for t in h[:3]:
                s.observe(t)
            out.append(s)
        return out

    batch, alone = samplers(), samplers()
    for _ in range(5):
        together = choose_batch(batch, logits)
        single = [s.choose(logits[i]) for i, s in enumerate(alone)]
        assert together == single
        for s, c in zip(batch, together):
            s.observe(c.token_id)
        for s, c in zip(alone, single):
            s.observe(c.token_id)


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_logprobs": 21}, "top_logprobs"),
])
def test_invalid_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and "\n" not in str(info.value)


def test_params_from_generation_config():
    p = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20},
                                              max_tokens=5, seed=None)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.6, 0.9, 20, 5, None)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6}).greedy
    assert SamplingParams(stop="END").stop == ["END"] and SamplingParams(stop=["", "x"]).stop == ["x"]
