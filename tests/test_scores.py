"""Score functions of the probes: hand-computed two-token distances, identical distributions give 0, chunked ==
naive, no gradient; the probes and `attribute` take a distribution score with the policy's hidden states."""

import math

import pytest
import torch

from ktr.config import KeyTokenConfig, SignalConfig
from ktr.model.forward import PolicyPass, SequenceView, completion_hidden, completion_logps, encode_media
from ktr.probes.keytokens import attribute
from ktr.probes.scores import DISTRIBUTION_SCORES, distribution_scores, naive_distribution_scores
from ktr.probes.visual import visual_scores
from tests.helpers import rollout_for


def _two_token(p: list[float], q: list[float], name: str) -> float:
    # logits = log-probs through an identity projection: the softmax gives back p and q exactly
    hp = torch.tensor([[p]], dtype=torch.float64).log()  # [1, 1, 2]
    hq = torch.tensor([[q]], dtype=torch.float64).log()
    w = torch.eye(2, dtype=torch.float64)
    return float(distribution_scores(hp, hq, w, torch.ones(1, 1, dtype=torch.bool), name)[0, 0])


# P = (1/2, 1/2), Q = (1/4, 3/4), worked by hand:
HAND = {
    "kl": 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0),  # = 0.5 ln(4/3)
    "js": 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
          + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)),  # M = (3/8, 5/8)
    "l1": 0.5,
    "l2": math.sqrt(2 * 0.25**2),
    "cosine": 1.0 - 0.5 / (math.sqrt(0.5) * math.sqrt(0.625)),  # <p,q> = 1/2
    "hellinger": math.sqrt(0.5 * ((math.sqrt(0.5) - 0.5) ** 2 + (math.sqrt(0.5) - math.sqrt(0.75)) ** 2)),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTION_SCORES))
def test_two_token_values_by_hand(name) -> None:
    assert _two_token([0.5, 0.5], [0.25, 0.75], name) == pytest.approx(HAND[name], abs=1e-6)  # float32 maths


@pytest.mark.parametrize("name", sorted(DISTRIBUTION_SCORES))
def test_identical_distributions_score_zero(name) -> None:
    assert abs(_two_token([0.3, 0.7], [0.3, 0.7], name)) < 1e-7


@pytest.mark.parametrize("name,value", [("l1", 2.0), ("l2", math.sqrt(2.0)), ("cosine", 1.0),
                                        ("hellinger", 1.0), ("js", math.log(2.0))])
def test_disjoint_distributions_reach_the_maximum(name, value) -> None:
    assert _two_token([1 - 1e-15, 1e-15], [1e-15, 1 - 1e-15], name) == pytest.approx(value, abs=1e-6)


def test_kl_direction_is_p_given_media_against_q_perturbed() -> None:
    # KL(P || Q) with P = (0.9, 0.1), Q = (0.5, 0.5): 0.9 ln 1.8 + 0.1 ln 0.2, not the reverse 0.5 ln(5/9) + 0.5 ln 5
    want = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    assert _two_token([0.9, 0.1], [0.5, 0.5], "kl") == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("name", sorted(DISTRIBUTION_SCORES))
def test_chunked_equals_naive_and_has_no_grad(name) -> None:
    g = torch.Generator().manual_seed(0)
    hp = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    hq = (hp.detach() + 0.5 * torch.randn(3, 5, 8, generator=g)).requires_grad_()
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    chunked = distribution_scores(hp, hq, w, mask, name, bias=b, chunk_size=4)
    naive = naive_distribution_scores(hp, hq, w, mask, name, bias=b)
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-6)
    assert not chunked.requires_grad and (chunked[~mask] == 0).all() and (chunked[mask] > 0).all()


@pytest.mark.parametrize("name", ["kl", "js"])
def test_float32_logits_distribution_scores_on_bf16_inputs(name) -> None:
    """bf16 hidden states and head: with `float32_logits` the distances are those of the exact float32 product of
    the bf16 numbers (chunked and naive alike); bf16-rounded logits (the default, as `F.linear`) are measurably
    different."""
    g = torch.Generator().manual_seed(1)
    hp = torch.randn(3, 5, 16, generator=g)
    hq = hp + 0.3 * torch.randn(3, 5, 16, generator=g)
    w = torch.randn(400, 16, generator=g) * 2.0  # logits of tens: bf16 rounds them to steps of 1/8 and more
    mask = torch.rand(3, 5, generator=g) > 0.3
    bf = [t.to(torch.bfloat16) for t in (hp, hq, w)]
    exact = naive_distribution_scores(*[t.float() for t in bf], mask, name)
    for got in (distribution_scores(*bf, mask, name, chunk_size=4, float32_logits=True),
                naive_distribution_scores(*bf, mask, name, float32_logits=True)):
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-6)
    rounded = distribution_scores(*bf, mask, name, chunk_size=4)
    assert (rounded - exact).abs().max() > 1e-3


def test_unknown_score_fails_at_config_time() -> None:
    with pytest.raises(ValueError, match="score"):
        SignalConfig(score="emd")  # type: ignore[arg-type]
        KeyTokenConfig(visual=SignalConfig(score="emd"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entropy.score"):
        KeyTokenConfig(entropy=SignalConfig(score="kl"))


@torch.no_grad()
def test_probe_distance_scores_on_the_tiny_model(tiny_policy) -> None:
    batch, rollout = rollout_for(tiny_policy)
    model, ids, valid = tiny_policy.model, rollout.completion_ids, rollout.completion_mask
    view = SequenceView.of(model, rollout, batch)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    hidden = completion_hidden(model, view, feats, ids.shape[1])
    logps, ent = completion_logps(model, hidden, ids, valid, with_entropy=True)
    same = visual_scores(model, batch, view, feats, ids, valid, logps, "identity", score="js", base_hidden=hidden)
    assert same.abs().max() < 1e-6  # nothing hidden: identical distributions
    kl = visual_scores(model, batch, view, feats, ids, valid, logps, "attention_mask", score="kl", base_hidden=hidden)
    kl_naive = visual_scores(model, batch, view, feats, ids, valid, logps, "attention_mask", chunk_size=None,
                             score="kl", base_hidden=hidden)
    torch.testing.assert_close(kl, kl_naive, rtol=0, atol=1e-6)
    assert (kl[valid] > 0).all() and (kl[~valid] == 0).all()
    with pytest.raises(ValueError, match="base_hidden"):
        visual_scores(model, batch, view, feats, ids, valid, logps, "attention_mask", score="kl")
    cfg = KeyTokenConfig(visual=SignalConfig(score="hellinger"), temporal=SignalConfig(score="l1"))
    assert cfg.needs_base_hidden and not KeyTokenConfig().needs_base_hidden
    scored = PolicyPass(view, feats, logps, ent, base_hidden=hidden)
    kt = attribute(model, tiny_policy.processor, batch, rollout, scored, cfg)
    assert kt.scores["visual"].max() <= 1.0 and (kt.scores["visual"][valid] >= 0).all()
    assert kt.mask.any() and not (kt.mask & ~valid).any()
