"""The batched sampler against float64 references on fixed logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aphrodite.sampling import Sampler, SamplingMetadata, SamplingRow
from aphrodite.sampling_params import SamplingParams

# Each distribution test rejects when a chi-square test's p-value is below ALPHA: with a fresh
# random seed a correct sampler fails one such test with probability ALPHA (1e-6).
ALPHA = 1e-6
DRAWS = 20000


def _sample(device, logits_rows, params_list, steps=1, generator_seed=0, outputs=None):
    """Runs the sampler `steps` times on the same logits; returns [steps, rows] token ids."""
    vocab = logits_rows.shape[1]
    gens = []
    for p in params_list:
        gens.append(None if p.seed is None else torch.Generator(device).manual_seed(p.seed))
    sampler = Sampler(torch.Generator(device).manual_seed(generator_seed))
    out = []
    for _ in range(steps):
        rows = [
            SamplingRow(p, [], outputs[i] if outputs else [], g)
            for i, (p, g) in enumerate(zip(params_list, gens))
        ]
        meta = SamplingMetadata.build(rows, vocab, torch.device(device))
        out.append(sampler(logits_rows.to(device), meta).sampled_token_ids.cpu())
    return torch.stack(out)


def _reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    z = logits.double() / temperature
    p = z.softmax(-1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if min_p > 0:
        keep &= p >= min_p * p.max()
    z = z.masked_fill(~keep, -math.inf)
    if top_k:
        kth = z.sort(descending=True).values[top_k - 1]
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1.0:
        q = z.softmax(-1)
        order = q.argsort(descending=True)
        cum = q[order].cumsum(0)
        # smallest prefix of the most likely tokens whose mass reaches top_p
        n_keep = int((cum < top_p - 1e-12).sum()) + 1
        mask = torch.ones_like(q, dtype=torch.bool)
        mask[order[:n_keep]] = False
        z = z.masked_fill(mask, -math.inf)
    return z.softmax(-1)


def _chi_square_pvalue(counts, probs):
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.7),
        dict(temperature=1.0, top_k=3),
        dict(temperature=0.8, top_p=0.7),
        dict(temperature=1.3, top_k=5, top_p=0.9),
        dict(temperature=1.0, min_p=0.2),
    ],
)
def test_distribution_matches_reference(device, kwargs):
    params = SamplingParams(**kwargs)
    rows = LOGITS.expand(DRAWS, -1).contiguous()
    tokens = _sample(device, rows, [params] * DRAWS, generator_seed=1234)[0]
    counts = torch.bincount(tokens, minlength=LOGITS.numel())
    probs = _reference_probs(LOGITS, **kwargs)
    assert counts[probs == 0].sum() == 0, "sampled a token outside the allowed set"
    assert _chi_square_pvalue(counts, probs) > ALPHA


def test_chi_square_detects_a_wrong_distribution():
    # The statistical check itself must be able to fail: counts from temperature 1 against the
    # temperature 0.6 distribution are rejected.
    rows = LOGITS.expand(DRAWS, -1).contiguous()
    tokens = _sample("cpu", rows, [SamplingParams(temperature=1.0)] * DRAWS)[0]
    counts = torch.bincount(tokens, minlength=LOGITS.numel())
    assert _chi_square_pvalue(counts, _reference_probs(LOGITS, temperature=0.6)) < ALPHA


def test_greedy_is_exact_argmax(device):
    torch.manual_seed(0)
    logits = torch.randn(17, 1000)
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams() for i in range(17)]
    tokens = _sample(device, logits, params)[0]
    expected = logits.argmax(-1)
    assert torch.equal(tokens[1::2], expected[1::2])


def test_seeded_rows_do_not_depend_on_the_batch(device):
    torch.manual_seed(1)
    vocab = 500
    target = torch.randn(1, vocab)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    alone = _sample(device, target, [seeded], steps=6)[:, 0]
    others = torch.randn(5, vocab)
    batch = torch.cat([others[:3], target, others[3:]])
    params = [SamplingParams(temperature=0.9)] * 3 + [seeded] + [SamplingParams(seed=7)] * 2
    mixed = _sample(device, batch, params, steps=6, generator_seed=99)[:, 3]
    assert torch.equal(alone, mixed)
    # and a different seed gives a different sequence (6 draws over 500 tokens)
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=43)
    assert not torch.equal(alone, _sample(device, target, [other_seed], steps=6)[:, 0])


def test_penalties_match_reference(device):
    torch.manual_seed(2)
    vocab = 50
    logits = torch.randn(3, vocab) * 0.1
    # penalised tokens lead; the penalties must hand the argmax to tokens 10 and 11
    logits[0, 3], logits[0, 10] = 2.0, 1.5
    logits[1, 5], logits[1, 11] = 2.0, 1.0
    prompts = [[1, 2, 3, 3], [4, 5], [6]]
    outputs = [[3, 7, 7, 7], [5, 9], []]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.7),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.9),
        SamplingParams(temperature=0.0),
    ]
    sampler = Sampler()
    rows = [SamplingRow(p, pr, o) for p, pr, o in zip(params, prompts, outputs)]
    meta = SamplingMetadata.build(rows, vocab, torch.device(device))
    out = sampler(logits.to(device), meta)

    ref = logits.double().clone()
    for i, (p, pr, o) in enumerate(zip(params, prompts, outputs)):
        for t in set(pr) | set(o):
            if p.repetition_penalty != 1.0:
                v = ref[i, t]
                ref[i, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(o):
            ref[i, t] -= p.frequency_penalty * o.count(t) + p.presence_penalty
    assert torch.equal(out.sampled_token_ids.cpu(), ref.argmax(-1))
    assert out.sampled_token_ids.cpu().tolist()[:2] == [10, 11]


def test_min_tokens_masks_stop_tokens(device):
    vocab = 10
    logits = torch.zeros(2, vocab)
    logits[:, 4] = 50.0  # the stop token dominates
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4])
    rows = [SamplingRow(params, [], [1]), SamplingRow(params, [], [1, 2, 3])]
    meta = SamplingMetadata.build(rows, vocab, torch.device(device))
    tokens = Sampler()(logits.to(device), meta).sampled_token_ids.cpu().tolist()
    assert tokens[0] != 4 and tokens[1] == 4


def test_logprobs_are_raw_model_logprobs(device):
    torch.manual_seed(3)
    vocab = 64
    logits = torch.randn(4, vocab) * 2
    params = [
        SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    rows = [SamplingRow(p, [0, 1, 2], [3]) for p in params]
    meta = SamplingMetadata.build(rows, vocab, torch.device(device))
    out = Sampler(torch.Generator(device).manual_seed(0))(logits.to(device), meta)
    ref = logits.double().log_softmax(-1)
    sampled = out.sampled_token_ids.cpu()
    ids = out.logprobs.token_ids.cpu()
    values = out.logprobs.logprobs.cpu().double()
    ranks = out.logprobs.ranks.cpu()
    assert ids.shape == (4, 6)
    for i in range(4):
        assert ids[i, 0] == sampled[i]
        expected_top = ref[i].topk(5)
        assert torch.equal(ids[i, 1:], expected_top.indices)
        torch.testing.assert_close(values[i, 1:], expected_top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[i, 0], ref[i, sampled[i]], atol=1e-5, rtol=0)
        assert ranks[i] == int((ref[i] > ref[i, sampled[i]]).sum()) + 1
    torch.testing.assert_close(
        out.sampled_logprobs.cpu().double(),
        ref.gather(1, sampled.view(-1, 1)).squeeze(1),
        atol=1e-5,
        rtol=0,
    )


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])
    params = SamplingParams(temperature=0.0, top_p=0.5, stop="x", top_k=-1)
    assert params.stop == ["x"] and params.top_p == 1.0 and params.top_k == 0
    # Integers of any kind are taken (as int); bools and out-of-range seeds are not.
    params = SamplingParams(seed=np.int64(7), max_tokens=np.int32(4), stop_token_ids=[np.int64(2)])
    assert (params.seed, params.max_tokens, params.stop_token_ids) == (7, 4, [2])
    assert type(params.seed) is int and type(params.stop_token_ids[0]) is int
    for bad in (dict(n=True), dict(logprobs=True), dict(max_tokens=False)):
        with pytest.raises(ValueError, match="must be an int"):
            SamplingParams(**bad)
    for seed, n in ((2**64, 1), (2**64 - 1, 2), (-(2**63) - 1, 1)):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed, n=n)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_logit_bias_and_allowed_token_ids():
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={7: 100.0}), [1], []),
        SamplingRow(SamplingParams(temperature=0.0, allowed_token_ids=[3, 9]), [1], []),
        SamplingRow(
            SamplingParams(temperature=0.0, logit_bias={int(logits[2].argmax()): -1e4}), [1], []
        ),
    ]
    meta = SamplingMetadata.build(rows, vocab, torch.device("cpu"))
    out = Sampler()(logits, meta)
    expected_1 = 3 if logits[1, 3] > logits[1, 9] else 9
    assert out.sampled_token_ids.tolist()[:2] == [7, expected_1]
    assert out.sampled_token_ids[2].item() == logits[2].topk(2).indices[1].item()
    # Reported log-probabilities are the model's (raw logits), not the biased ones.
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(out.sampled_logprobs.double(), raw[[0, 1, 2], out.sampled_token_ids])
    # Random sampling never leaves the allowed set.
    rows = [SamplingRow(SamplingParams(temperature=1.0, allowed_token_ids=[4, 11, 12]), [1], [])]
    meta = SamplingMetadata.build(rows * 64, vocab, torch.device("cpu"))
    sampler = Sampler(torch.Generator().manual_seed(1))
    seen = set(sampler(logits[:1].repeat(64, 1), meta).sampled_token_ids.tolist())
    assert seen <= {4, 11, 12} and len(seen) > 1
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: float("nan")})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_sampling_params_normalise_numbers_and_allowed_ids():
    params = SamplingParams(
        temperature=np.float32(0.5),
        top_p=np.float64(0.9),
        logit_bias={np.int64(3): np.float32(2.5)},
        allowed_token_ids=[5, 5, 3, np.int64(5)],
    )
    assert type(params.temperature) is float and params.temperature == 0.5
    assert params.logit_bias == {3: 2.5} and type(params.logit_bias[3]) is float
    assert params.allowed_token_ids == [5, 3]  # each id once, in order
