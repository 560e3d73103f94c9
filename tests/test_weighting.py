"""Soft key-token weights: stated ranges, top rank gets the largest weight, pools, combination; float weights in
the loss: a 0/1 weight reproduces the mask path bit for bit (plain and fused), and the two normalisers."""

import math

import pytest
import torch

from ktr.config import KeyTokenConfig
from ktr.fused import fused_policy_loss
from ktr.losses import policy_loss, released_kl_mean, token_weights
from ktr.probes.keytokens import select_key_tokens
from ktr.probes.weighting import combine_weights, pool_ranks, rank_weights


def test_ranks_descending_within_each_group_over_valid_tokens_only() -> None:
    scores = torch.tensor([[3.0, 1.0, 9.0], [2.0, 0.0, 5.0]])  # two pools of one row each
    valid = torch.tensor([[True, True, False], [True, True, True]])
    r = pool_ranks(scores, valid, group_size=1)
    assert r[0, :2].tolist() == [0.0, 1.0]  # 9.0 is padding: it does not take the top rank
    assert r[1].tolist() == [0.5, 1.0, 0.0]
    r2 = pool_ranks(scores, valid, group_size=2)  # one pool of 5 valid tokens: 5, 3, 2, 1, 0
    assert r2[valid].tolist() == [0.25, 0.75, 0.5, 1.0, 0.0]


def test_sigmoid_matches_the_authors_formula_and_top_gets_most() -> None:
    scores = torch.arange(100.0).view(1, 100)  # token 99 has the highest score
    valid = torch.ones(1, 100, dtype=torch.bool)
    w = rank_weights(scores, valid, "sigmoid", "group", 1, k=20, gamma=1.5)
    r = (99 - torch.arange(100.0)) / 99  # descending rank of each token, normalised
    torch.testing.assert_close(w[0], 1 + 1.5 * (torch.sigmoid(20 * (0.5 - r)) - 0.5))
    assert w[0, 99] == w.max() and w[0, 0] == w.min()
    assert w[0, 99] == pytest.approx(1 + 1.5 * (1 / (1 + math.exp(-10)) - 0.5))  # ~1.7497
    assert (w >= 0.25).all() and (w <= 1.75).all()


@pytest.mark.parametrize("how", ["sigmoid", "linear", "exponential", "softmax"])
def test_weights_in_stated_ranges_and_monotone(how) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 7, generator=g)
    valid = torch.rand(4, 7, generator=g) > 0.2
    w = rank_weights(scores, valid, how, "group", 2, k=20.0, gamma=1.5)
    assert (w[~valid] == 0).all()
    for pool in range(2):
        rows = slice(2 * pool, 2 * pool + 2)
        s, ww = scores[rows][valid[rows]], w[rows][valid[rows]]
        order = s.argsort(descending=True)
        assert (ww[order].diff() <= 1e-6).all()  # higher score, larger (or equal) weight
        if how == "softmax":
            assert ww.mean() == pytest.approx(1.0, abs=1e-5) and (ww > 0).all()
        else:
            assert ((ww >= 0.25 - 1e-6) & (ww <= 1.75 + 1e-6)).all()
    if how in ("linear", "exponential"):
        assert w[valid].max() == pytest.approx(1.75) and w[valid].min() == pytest.approx(0.25)


def test_combine_mean_and_max_over_eligible_signals() -> None:
    a, b = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0, 0.0]])
    ea, eb = torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]])
    assert combine_weights([a, b], [ea, eb], "mean").tolist() == [[2.0, 2.0, 0.0]]
    assert combine_weights([a, b], [ea, eb], "max").tolist() == [[3.0, 2.0, 0.0]]


def test_soft_key_tokens_weight_every_valid_token_temporal_on_video_rows_only() -> None:
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(4, 6, generator=g) > 0.2
    scores = {k: torch.randn(4, 6, generator=g).masked_fill(~valid, 0) for k in ("visual", "temporal", "entropy")}
    video_rows = torch.tensor([True, True, False, False])
    kt = select_key_tokens(scores, valid, video_rows, KeyTokenConfig(weighting="sigmoid"), group_size=2)
    assert torch.equal(kt.mask, valid) and (kt.weights[~valid] == 0).all() and (kt.weights[valid] > 0).all()
    image = rank_weights(scores["visual"][2:], valid[2:], "sigmoid", group_size=2)
    image = (image + rank_weights(scores["entropy"][2:], valid[2:], "sigmoid", group_size=2)) / 2
    torch.testing.assert_close(kt.weights[2:], image)  # image rows: mean of visual and entropy only
    hard = select_key_tokens(scores, valid, video_rows, KeyTokenConfig(), group_size=2)
    assert hard.weights is None
    from ktr.probes.keytokens import key_token_stats

    stats = key_token_stats(kt, valid)  # soft: every valid token is "key"; the mean weight says how much
    assert stats["frac_key"] == 1 and "weight_mean" not in key_token_stats(hard, valid)
    torch.testing.assert_close(stats["weight_mean"], kt.weights[valid].mean())


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(4, 6, generator=g) * 3).requires_grad_()
    ref = -torch.rand(4, 6, generator=g) * 3
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.4
    return logps, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_hard_weights_equal_the_mask_path_bit_for_bit(aggregation) -> None:
    logps, ref, adv, mask = _inputs()
    a = policy_loss(logps, adv, mask, ref_logps=ref, beta=0.04, aggregation=aggregation)
    ga, = torch.autograd.grad(a, logps)
    b = policy_loss(logps, adv, mask, ref_logps=ref, beta=0.04, aggregation=aggregation, weights=mask.float())
    gb, = torch.autograd.grad(b, logps)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    # fused (chunked) loss from hidden states: same bits with the 0/1 weights
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(4, 6, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (4, 6), generator=g)
    kw = dict(aggregation=aggregation, chunk_size=5)
    la, _, _ = fused_policy_loss(h.clone().requires_grad_(), w, y, adv, mask, **kw)
    lb, _, _ = fused_policy_loss(h.clone().requires_grad_(), w, y, adv, mask, weights=mask.float(), **kw)
    assert torch.equal(la, lb)


def test_float_weights_normalisers() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w = torch.tensor([[2.0, 1.0, 5.0], [0.5, 9.0, 9.0]])  # entries outside the mask are ignored
    seq = token_weights(mask, "seq-mean-token-mean", weights=w)
    torch.testing.assert_close(seq, torch.tensor([[2 / 3 / 2, 1 / 3 / 2, 0.0], [1 / 2, 0.0, 0.0]]))
    tok = token_weights(mask, "token-mean", weights=w)
    torch.testing.assert_close(tok, torch.tensor([[2 / 3.5, 1 / 3.5, 0.0], [0.5 / 3.5, 0.0, 0.0]]))
    by_mask = token_weights(mask, "token-mean", weights=w, weight_norm="mask")
    torch.testing.assert_close(by_mask, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.5 / 3, 0.0, 0.0]]))


def test_weighted_fused_loss_equals_plain_loss() -> None:
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    wt = torch.randn(30, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (4, 6), generator=g)
    adv, mask = torch.randn(4, generator=g), torch.rand(4, 6, generator=g) > 0.3
    weights = torch.rand(4, 6, generator=g) + 0.25
    fused, _, _ = fused_policy_loss(h, wt, y, adv, mask, weights=weights, chunk_size=5, aggregation="token-mean")
    gh, gw = torch.autograd.grad(fused, (h, wt))
    logps = torch.log_softmax(h @ wt.T, -1).gather(-1, y[..., None])[..., 0]
    plain = policy_loss(logps, adv, mask, weights=weights, aggregation="token-mean")
    ph, pw = torch.autograd.grad(plain, (h, wt))
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(gh, ph)
    torch.testing.assert_close(gw, pw)


def test_released_kl_metric_is_per_sequence_then_mean() -> None:
    logps = torch.zeros(2, 3)
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    k = math.exp(1) - 2  # k3 at c = 1
    assert float(released_kl_mean(logps, ref, mask)) == pytest.approx((k + 0.0) / 2)  # row 0: k, row 1: 0
    empty_row = torch.tensor([[True, False, False], [False, False, False]])
    assert float(released_kl_mean(logps, ref, empty_row)) == pytest.approx(k)  # a row without key tokens is left out
