"""Key-token selection: hand-computed thresholds, edge cases, pooling scopes, equality with torch.quantile."""

from __future__ import annotations

import math

import pytest
import torch

from ktr.probes.select import COMBINERS, SCOPES, combine_masks, pooled_quantile, select_scope, select_top_ratio

T_, F_ = True, False


def _row(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def _all_valid(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


def test_hand_threshold_interpolates() -> None:
    s = _row([3.0, 1.0, 5.0, 2.0, 4.0])
    # ratio 0.2 -> q 0.8, rank 0.8 * 4 = 3.2 over sorted [1..5] -> thr 4.2: only 5 kept.
    assert select_top_ratio(s, _all_valid(s), 0.2).tolist() == [[F_, F_, T_, F_, F_]]
    # ratio 0.4 -> rank 2.4 -> thr 3.4: 4 and 5 kept.
    assert select_top_ratio(s, _all_valid(s), 0.4).tolist() == [[F_, F_, T_, F_, T_]]
    thr = pooled_quantile(s, _all_valid(s), 0.8)
    torch.testing.assert_close(thr, torch.tensor([4.2]))


def test_ties_at_threshold_are_all_kept() -> None:
    s = _row([1.0, 3.0, 3.0, 3.0, 0.0])
    # sorted [0, 1, 3, 3, 3], rank 3.2 -> thr 3: the three 3s are kept (60% for ratio 0.2).
    assert select_top_ratio(s, _all_valid(s), 0.2).tolist() == [[F_, T_, T_, T_, F_]]


def test_ratio_zero_keeps_max_values_including_ties() -> None:
    # Released rule: quantile(1.0) is the max, and scores >= max keeps every max-valued token.
    s = _row([1.0, 5.0, 5.0, 2.0])
    assert select_top_ratio(s, _all_valid(s), 0.0).tolist() == [[F_, T_, T_, F_]]


def test_ratio_one_keeps_all_valid_finite() -> None:
    s = _row([1.0, float("nan"), -7.0, float("-inf"), 2.0])
    valid = torch.tensor([[T_, T_, T_, T_, F_]])
    assert select_top_ratio(s, valid, 1.0).tolist() == [[T_, F_, T_, F_, F_]]


def test_non_finite_scores_stay_out_of_the_quantile_and_plus_inf_is_selected() -> None:
    s = _row([float("nan"), float("inf"), float("-inf"), 1.0, 2.0, 3.0])
    # Pool {1, 2, 3}; ratio 0.5 -> rank 1 -> thr 2. The released rule `valid & (s >= thr)` keeps +inf >= 2.
    assert select_top_ratio(s, _all_valid(s), 0.5).tolist() == [[F_, T_, F_, F_, T_, T_]]
    # a pool with no finite score has no threshold: nothing is selected, +inf included
    only = _row([float("inf"), float("nan")])
    assert select_top_ratio(only, _all_valid(only), 0.5).tolist() == [[F_, F_]]


def test_invalid_tokens_are_left_out_of_the_pool() -> None:
    s = _row([100.0, 1.0, 2.0, 3.0])
    valid = torch.tensor([[F_, T_, T_, T_]])
    # Without the invalid 100 the pool is {1, 2, 3}: ratio 0.5 -> thr 2.
    assert select_top_ratio(s, valid, 0.5).tolist() == [[F_, F_, T_, T_]]


def test_all_masked_rows_and_empty_pools() -> None:
    s = torch.tensor([[9.0, 9.0], [1.0, 2.0], [5.0, 6.0], [7.0, 8.0]])
    valid = torch.tensor([[F_, F_], [T_, T_], [F_, F_], [F_, F_]])
    # Group 1: only row 1 is valid -> its max kept; group 2: empty pool -> nothing, no error, no NaN.
    out = select_top_ratio(s, valid, 0.2, group_size=2)
    assert out.tolist() == [[F_, F_], [F_, T_], [F_, F_], [F_, F_]]
    all_nan = torch.full((2, 3), float("nan"))
    assert not select_top_ratio(all_nan, _all_valid(all_nan), 0.5).any()


def test_group_sequence_and_batch_pools_differ() -> None:
    s = torch.tensor([[0.0, 1.0], [2.0, 3.0], [10.0, 11.0], [12.0, 13.0]])
    v = _all_valid(s)
    # group (G=2): pools {0..3} and {10..13}, q 0.75 -> rank 2.25 -> thr 2.25 and 12.25.
    assert select_scope(s, v, 0.25, "group", group_size=2).tolist() == [[F_, F_], [F_, T_], [F_, F_], [F_, T_]]
    # batch: one pool of 8, rank 0.75 * 7 = 5.25 -> thr 11.25: only the top group's 12, 13.
    assert select_scope(s, v, 0.25, "batch").tolist() == [[F_, F_], [F_, F_], [F_, F_], [T_, T_]]
    # sequence: each row alone, rank 0.75 -> the larger score of every row.
    assert select_scope(s, v, 0.25, "sequence").tolist() == [[F_, T_]] * 4
    assert torch.equal(select_scope(s, v, 0.25, "batch"), select_top_ratio(s, v, 0.25))
    assert torch.equal(select_scope(s, v, 0.25, "sequence"), select_top_ratio(s, v, 0.25, group_size=1))


def _reference(scores: torch.Tensor, valid: torch.Tensor, ratio: float, g: int) -> torch.Tensor:
    """Loop over groups calling torch.quantile, exactly as the released code does."""
    out = torch.zeros_like(valid)
    keep = valid & torch.isfinite(scores)
    for start in range(0, scores.shape[0], g):
        block, kb = scores[start : start + g], keep[start : start + g]
        if kb.any():
            thr = torch.quantile(block[kb], 1 - ratio)
            out[start : start + g] = valid[start : start + g] & (block >= thr)  # +inf kept, as released
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_quantile_on_random_inputs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        g, b, t = (1, 2, 4, 8)[trial % 4], 1 + trial % 3, 1 + trial % 37
        scores = torch.randn(b * g, t, generator=gen, dtype=dtype)
        if trial % 3 == 0:
            scores = (scores * 2).round()  # many ties
        scores[torch.rand(scores.shape, generator=gen) < 0.05] = float("nan")
        scores[torch.rand(scores.shape, generator=gen) < 0.05] = float("inf")
        valid = torch.rand(scores.shape, generator=gen) < 0.8
        ratio = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, float(torch.rand((), generator=gen)))[trial % 7]
        got = select_top_ratio(scores, valid, ratio, group_size=g)
        assert torch.equal(got, _reference(scores, valid, ratio, g)), (trial, g, t, ratio)


def test_pooled_quantile_bit_exact_against_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(6, 50, generator=gen)
    keep = torch.rand(6, 50, generator=gen) < 0.6
    keep[5] = False
    for q in (0.0, 0.8, 0.37, 1.0):
        thr = pooled_quantile(values, keep, q)
        for p in range(5):
            assert torch.equal(thr[p], torch.quantile(values[p][keep[p]], q))
        assert math.isnan(thr[5])


def test_bfloat16_scores_are_upcast() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    out = select_top_ratio(s, _all_valid(s), 0.5)
    assert out.tolist() == [[F_, F_, T_, T_]]
    assert torch.equal(out, select_top_ratio(s.float(), _all_valid(s), 0.5))


@pytest.mark.slow
def test_pool_larger_than_torch_quantile_limit() -> None:
    n = 2**24 + 4096  # torch.quantile refuses inputs above 2**24 elements
    scores = torch.rand(1, n, generator=torch.Generator().manual_seed(2))
    out = select_top_ratio(scores, _all_valid(scores), 0.25)
    # Reference threshold from the two order statistics around rank 0.75 * (n - 1), in float64.
    rank = 0.75 * (n - 1)
    lo = torch.kthvalue(scores[0], math.floor(rank) + 1).values.double()
    hi = torch.kthvalue(scores[0], math.floor(rank) + 2).values.double()
    thr = lo + (rank - math.floor(rank)) * (hi - lo)
    assert int(out.sum()) == int((scores.double() >= thr).sum())
    assert abs(int(out.sum()) - n // 4) <= 1


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio_raises(ratio: float) -> None:
    s = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="ratio"):
        select_top_ratio(s, _all_valid(s), ratio)


def test_bad_shapes_and_group_size_raise() -> None:
    s = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="group_size"):
        select_top_ratio(s, _all_valid(s), 0.2, group_size=3)
    with pytest.raises(ValueError, match="bool"):
        select_top_ratio(s, torch.ones(4, 3), 0.2)
    with pytest.raises(ValueError, match="shape"):
        select_top_ratio(s, torch.ones(4, 2, dtype=torch.bool), 0.2)
    with pytest.raises(ValueError, match="group_size"):
        select_scope(s, _all_valid(s), 0.2, "group")
    with pytest.raises(ValueError, match="sequence"):
        select_scope(s, _all_valid(s), 0.2, "prompt")  # type: ignore[arg-type]
    assert set(SCOPES) == {"group", "sequence", "batch"}


def test_combine_masks() -> None:
    a = torch.tensor([[T_, F_, F_, T_]])
    b = torch.tensor([[F_, F_, T_, T_]])
    c = torch.tensor([[T_, F_, T_, T_]])
    assert combine_masks([a, b, c], "union").tolist() == [[T_, F_, T_, T_]]
    assert combine_masks([a, b, c], "intersection").tolist() == [[F_, F_, F_, T_]]
    assert torch.equal(combine_masks([a]), a)
    assert set(COMBINERS) == {"union", "intersection"}
    with pytest.raises(ValueError, match="at least one"):
        combine_masks([])
    with pytest.raises(ValueError, match="shape"):
        combine_masks([a, torch.ones(1, 3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="union"):
        combine_masks([a, b], "xor")  # type: ignore[arg-type]


def test_random_same_count_matches_group_counts_and_stays_in_valid() -> None:
    from ktr.probes.select import random_same_count

    gen = torch.Generator().manual_seed(0)
    valid = torch.rand(8, 12, generator=gen) > 0.2  # [N=8, T] (G = 4: two groups)
    mask = valid & (torch.rand(8, 12, generator=gen) > 0.6)
    out = random_same_count(mask, valid, 4, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert not (out & ~valid).any()
    assert out.view(2, -1).sum(-1).tolist() == mask.view(2, -1).sum(-1).tolist()


def test_random_same_count_reproducible_under_seed_and_differs_across_seeds() -> None:
    from ktr.probes.select import random_same_count

    valid = torch.ones(4, 50, dtype=torch.bool)
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[:, :10] = True  # KTR's tokens: the first 10 of each row
    draw = [random_same_count(mask, valid, 2, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])
    assert not torch.equal(draw[0], mask)  # not the KTR tokens themselves
    torch.manual_seed(3)  # the global RNG (the module's default) is reproducible too
    a = random_same_count(mask, valid, 2)
    torch.manual_seed(3)
    assert torch.equal(a, random_same_count(mask, valid, 2))


def test_random_same_count_rejects_bad_group_size() -> None:
    from ktr.probes.select import random_same_count

    valid = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="group_size"):
        random_same_count(valid, valid, 2)


def test_thresholds_are_the_quantiles_that_selection_applies() -> None:
    from ktr.probes.select import scope_thresholds

    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 7, generator=g)  # [N, T], 3 groups of 2
    v = torch.rand(6, 7, generator=g) > 0.3
    v[4:] = False  # last group: empty pool
    thr = scope_thresholds(s, v, 0.2, "group", group_size=2)  # [N]
    for p in range(2):  # each pool's value is torch.quantile of its valid scores, shared by its rows
        rows = slice(2 * p, 2 * p + 2)
        expected = torch.quantile(s[rows][v[rows]], 0.8)
        assert thr[2 * p] == expected and thr[2 * p + 1] == expected
    assert thr[4:].isnan().all()
    assert torch.equal(select_scope(s, v, 0.2, "group", group_size=2), v & (s >= thr[:, None]))
    seq = scope_thresholds(s, v, 0.5, "sequence")
    for i in range(4):
        assert seq[i] == torch.quantile(s[i][v[i]], 0.5)


def test_tie_equal_contexts_by_hand() -> None:
    from ktr.probes.select import tie_equal_contexts

    tokens = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 3], [1, 2, 3]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False], [True, True, True]])
    prompt = torch.tensor([0, 0, 0, 1])  # row 3: the same tokens after another prompt
    s = torch.arange(12, dtype=torch.float32).view(4, 3) + 0.5
    with_token = tie_equal_contexts(s, tokens, valid, prompt, include_token=True)
    assert with_token.tolist() == [[0.5, 1.5, 2.5], [0.5, 1.5, 5.5], [0.5, 7.5, 8.5], [9.5, 10.5, 11.5]]
    before = tie_equal_contexts(s, tokens, valid, prompt, include_token=False)
    # context before the token: row 1's third token follows the same "1 2" as row 0's; row 2's second follows "1"
    assert before.tolist() == [[0.5, 1.5, 2.5], [0.5, 1.5, 2.5], [0.5, 1.5, 8.5], [9.5, 10.5, 11.5]]


def test_tie_equal_contexts_restores_split_ties() -> None:
    """Copies of one context whose scores differ in the last bits (another layout's rounding) are split by the
    quantile threshold; tied, they are kept or dropped together, as the bit-identical scores are."""
    from ktr.probes.select import tie_equal_contexts

    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 10, generator=g)  # one completion, repeated 8 times: every token 8-fold tied
    tokens = torch.randint(0, 50, (1, 10), generator=g).repeat(8, 1)
    valid = torch.ones(8, 10, dtype=torch.bool)
    exact = base.repeat(8, 1)
    noisy = exact + 1e-7 * torch.randn(8, 10, generator=g)
    prompt = torch.zeros(8, dtype=torch.long)
    want = select_top_ratio(exact, valid, 0.25, group_size=8)
    assert not torch.equal(select_top_ratio(noisy, valid, 0.25, group_size=8), want)  # rounding splits the ties
    tied = tie_equal_contexts(noisy, tokens, valid, prompt)
    assert torch.equal(select_top_ratio(tied, valid, 0.25, group_size=8), want)
    assert torch.equal(tie_equal_contexts(tied, tokens, valid, prompt), tied)  # a fixed point
    assert torch.equal(tie_equal_contexts(exact, tokens, valid, prompt), exact)  # exact ties: nothing changes
