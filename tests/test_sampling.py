"""The rollout loop's logits processing equals transformers' processors; the candidate-set nucleus filter keeps
exactly the full-sort filter's set."""

import pytest
import torch
from transformers.generation.logits_process import (SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ktr.rollout.sampling import (_nucleus_from_candidates, choose_tokens, draw_inverse_cdf, inverse_cdf_index,
                                  nucleus_filter, process_logits, top_p_full_sort)

V = 151936


def _hf_top_p(scores, top_p, min_keep=1):
    return TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, scores)


def _peaked(rows: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * scale  # [R, V]


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("top_p", [0.001, 0.5, 0.9, 0.95, 0.999])
def test_nucleus_equals_full_sort_on_random_rows(scale, top_p) -> None:
    scores = _peaked(4, scale, seed=int(scale * 10 + top_p * 1000))
    mine, ref = nucleus_filter(scores, top_p), _hf_top_p(scores, top_p)
    assert torch.equal(torch.isinf(mine), torch.isinf(ref))
    assert torch.equal(mine, ref)


def test_fast_path_is_taken_on_peaked_rows_and_refuses_flat_ones() -> None:
    """The comparison above is not vacuous: peaked rows are decided from 64 candidates, flat rows are not."""
    peaked = _peaked(4, 6.0, seed=1)
    _, exact = _nucleus_from_candidates(peaked, 0.5, 64, 1, peaked.logsumexp(-1, keepdim=True))
    assert exact.all()
    flat = torch.zeros(2, V)
    _, exact = _nucleus_from_candidates(flat, 0.5, 1024, 1, flat.logsumexp(-1, keepdim=True))
    assert not exact.any()
    assert torch.equal(nucleus_filter(flat, 0.5), _hf_top_p(flat, 0.5))


def test_ties_at_the_boundary_go_to_the_full_sort() -> None:
    """Four equal tokens holding 0.2 each around a 0.5 cut: which ones survive is the full sort's tie order."""
    scores = torch.full((3, V), -1e4)
    scores[:, [10, 20, 30, 40]] = 5.0  # tied, ~0.25 mass each
    scores[1, 50] = 5.5
    _, exact = _nucleus_from_candidates(scores, 0.5, 64, 1, scores.logsumexp(-1, keepdim=True))
    assert not exact[0]
    assert torch.equal(nucleus_filter(scores, 0.5), _hf_top_p(scores, 0.5))


def test_exact_boundary_and_min_tokens_to_keep() -> None:
    # two tokens of mass exactly 0.5 each (in binary): top_p = 0.5 sits on the boundary
    scores = torch.full((2, V), -float("inf"))
    scores[:, 7] = 0.0
    scores[:, 9] = 0.0
    scores[1, 9] = -20.0  # one dominant token: only it is kept
    for top_p in (0.5, 0.0, 1e-9, 0.9999):
        for m in (1, 2, 3):
            assert torch.equal(nucleus_filter(scores, top_p, m), _hf_top_p(scores, top_p, m)), (top_p, m)


def test_top_p_one_and_suppressed_tokens() -> None:
    scores = _peaked(2, 4.0, seed=3)
    scores[:, :100] = -float("inf")  # suppressed: zero mass
    assert torch.equal(nucleus_filter(scores, 1.0), _hf_top_p(scores, 1.0))
    assert torch.equal(top_p_full_sort(scores, 0.9), _hf_top_p(scores, 0.9))
    assert torch.equal(nucleus_filter(scores, 0.9), _hf_top_p(scores, 0.9))


def test_process_logits_equals_transformers_processors() -> None:
    logits = _peaked(3, 2.0, seed=5)
    suppress = torch.tensor([151655, 151656, 151652, 151653])
    ref = SuppressTokensLogitsProcessor(suppress.tolist())(None, logits)
    assert torch.equal(process_logits(logits, suppress, sample=False), ref)
    ref = TemperatureLogitsWarper(0.7)(None, ref)
    ref = TopKLogitsWarper(50)(None, ref)
    ref = TopPLogitsWarper(0.9)(None, ref)
    mine = process_logits(logits, suppress, sample=True, temperature=0.7, top_k=50, top_p=0.9)
    assert torch.equal(mine, ref)


@pytest.mark.parametrize("scale", [1.0, 40.0, 400.0])
def test_logsumexp_equals_torch_on_peaked_rows(scale) -> None:
    """The nucleus filter's log-sum-exp (through `ktr.ops.exp_shifted_`) has torch.logsumexp's bits, also on rows
    where most entries underflow, with suppressed (-inf) entries, and for a row that is all -inf."""
    from ktr.rollout.sampling import _logsumexp

    scores = _peaked(6, scale, seed=int(scale))
    scores[0, :500] = -float("inf")
    scores[1] = -float("inf")
    assert torch.equal(_logsumexp(scores), torch.logsumexp(scores, -1, keepdim=True))


# Pearson's chi-square at p = 1e-6 (upper tail): a correct draw fails one of these once in a million runs.
CHI2_CRITICAL = {3: 30.66, 6: 35.89}


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("block", [1024, 4, 2, 1])  # one block; blocks with a shorter last one; one per token
def test_inverse_cdf_draws_the_softmax_distribution(block) -> None:
    """200,000 draws from one row of 9 logits (two filtered, one token at ~0.4%) match softmax's chances, and no
    filtered token is ever drawn. A shifted index, a block mapped back wrongly, or weights not those of softmax
    fail the chi-square."""
    row = torch.tensor([0.0, -float("inf"), 1.5, -2.0, 0.7, -float("inf"), 2.2, -0.5, -3.5])
    scores = row.expand(200_000, -1)
    tokens = draw_inverse_cdf(scores, generator=torch.Generator().manual_seed(0), block=block)  # [R]
    counts = torch.bincount(tokens, minlength=row.numel()).double()
    probs = row.double().softmax(-1)
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert _chi_square(counts[kept], probs[kept]) < CHI2_CRITICAL[int(kept.sum()) - 1]


def test_inverse_cdf_on_the_full_vocabulary() -> None:
    """At 151,936 entries, with the likely tokens near the end of the vocabulary and the last entries filtered:
    three tokens at 0.5 / 0.2 / 0.1 (one in the first block, one in the middle, one in the shorter last block)
    and a flat tail of ~152k tokens holding 0.2, from 4,000 draws."""
    heads, head_p = torch.tensor([V - 10, 100_000, 7]), torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    row = torch.full((V,), 0.0, dtype=torch.float64)
    tail = torch.ones(V, dtype=torch.bool)
    tail[heads] = False
    tail[V - 5:] = False
    row[tail] = 0.2 / int(tail.sum())
    row[heads] = head_p
    scores = row.log().float()  # -inf where filtered
    gen = torch.Generator().manual_seed(1)
    tokens = torch.cat([draw_inverse_cdf(scores.expand(40, -1), generator=gen) for _ in range(100)])
    assert not ((tokens >= V - 5).any() or (scores[tokens] == -float("inf")).any())
    counts = torch.stack([(tokens == h).sum() for h in heads] + [tail[tokens].sum()]).double()
    assert _chi_square(counts, torch.cat([head_p, torch.tensor([0.2], dtype=torch.float64)])) < CHI2_CRITICAL[3]


def test_inverse_cdf_index_never_lands_on_a_zero_weight_token() -> None:
    """A uniform number that rounds up to the row total (or beyond), or a rounding below 0, still picks a token of
    positive weight, not the filtered entries before or after it; zero-weight entries inside the row are skipped."""
    cdf = torch.tensor([[0.0, 0.25, 0.25, 1.0, 1.0, 1.0]], dtype=torch.float64)  # weights 0, .25, 0, .75, 0, 0
    picks = [int(inverse_cdf_index(cdf, torch.tensor([[u]], dtype=torch.float64))) for u in
             (-1e-17, 0.0, 0.1, 0.25, 0.5, 1.0 - 1e-16, 1.0, 2.0)]
    assert picks == [1, 1, 1, 3, 3, 3, 3, 3]


def test_choose_tokens_draws_and_refuses_an_unknown_draw() -> None:
    scores = torch.tensor([[0.0, 5.0, -float("inf")], [3.0, 0.0, 0.0]])
    assert choose_tokens(scores, sample=False, draw="inverse_cdf").tolist() == [1, 0]
    for draw in ("multinomial", "inverse_cdf"):
        assert choose_tokens(scores, sample=True, draw=draw).shape == (2,)
    with pytest.raises(ValueError, match="unknown draw 'gumbel'"):
        choose_tokens(scores, sample=True, draw="gumbel")
