"""Chunked log-probs / entropy / policy loss (ktr.fused) against the naive full-logits path."""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from ktr.fused import (
    call_with_head,
    fused_policy_loss,
    naive_policy_loss,
    naive_token_logps_entropy,
    token_logps_entropy,
)
from ktr.losses import AGGREGATIONS
from tests.hangs import run_in_own_session
from tests.helpers import file_rendezvous

N, T, H, V = 3, 7, 16, 1000
STRATEGIES = ["grad-in-forward", "recompute"]
torch.set_num_threads(1)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def make(seed: int = 0, bias: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[0, 0] = True  # at least one token
    return dict(
        hidden=torch.randn(N, T, H, generator=g).to(dtype).requires_grad_(),
        weight=(torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(),
        bias=(torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None,
        tokens=torch.randint(0, V, (N, T), generator=g),
        mask=mask,
        advantages=torch.randn(N, generator=g),
        ref_logps=torch.log_softmax(torch.randn(N, T, 50, generator=g), -1)[..., 0],
        old_logps=torch.log_softmax(torch.randn(N, T, 50, generator=g), -1)[..., 0],
        kl_mask=torch.rand(N, T, generator=g) > 0.5,
    )


def params(d: dict) -> list[torch.Tensor]:
    return [t for t in (d["hidden"], d["weight"], d["bias"]) if t is not None and t.requires_grad]


def loss_pair(d: dict, temperature: float = 1.0, **kw) -> tuple:
    """(naive loss, naive grads) and a function running the fused loss with given options."""
    args = (d["hidden"], d["weight"], d["tokens"], d["advantages"], d["mask"])
    naive, _, _ = naive_policy_loss(*args, bias=d["bias"], temperature=temperature, **kw)
    want = torch.autograd.grad(naive, params(d))

    def fused(**opts):
        loss, logps, ent = fused_policy_loss(*args, bias=d["bias"], temperature=temperature, **kw, **opts)
        return loss, torch.autograd.grad(loss, params(d)), logps, ent

    return naive, want, fused


def test_hand_computed_logp_and_entropy():
    # logits = [1, 0, 0] for the single token: log p(0) = 1 - log(e + 2), H = log(e + 2) - e / (e + 2).
    hidden = torch.tensor([[[1.0, 0.0]]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logps, ent = token_logps_entropy(hidden, weight, torch.tensor([[0]]))
    z = math.log(math.e + 2)
    assert logps.item() == pytest.approx(1 - z, abs=1e-6)
    assert ent.item() == pytest.approx(z - math.e / (math.e + 2), abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_entropy_and_grads_match_naive(chunk_size, temperature):
    d = make(bias=True)
    want_lp, want_ent = naive_token_logps_entropy(d["hidden"], d["weight"], d["tokens"], bias=d["bias"],
                                                  temperature=temperature)
    upstream = torch.randn(N, T)  # an arbitrary downstream loss sum(upstream * logps)
    want = torch.autograd.grad((want_lp * upstream).sum(), params(d))
    lp, ent = token_logps_entropy(d["hidden"], d["weight"], d["tokens"], bias=d["bias"], chunk_size=chunk_size,
                                  temperature=temperature)
    got = torch.autograd.grad((lp * upstream).sum(), params(d))
    assert rel_err(lp, want_lp) <= 1e-6 and rel_err(ent, want_ent) <= 1e-5
    assert ent.requires_grad is False
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("chunk_size", [5, 1000])  # 5 does not divide the token count
def test_fused_loss_matches_policy_loss_on_naive_logps(strategy, aggregation, chunk_size):
    d = make(seed=1)
    kw = dict(ref_logps=d["ref_logps"], beta=0.04, aggregation=aggregation)
    naive, want, fused = loss_pair(d, **kw)
    loss, got, logps, ent = fused(chunk_size=chunk_size, strategy=strategy, with_entropy=True)
    assert rel_err(loss, naive) <= 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    want_lp, want_ent = naive_token_logps_entropy(d["hidden"], d["weight"], d["tokens"])
    m = d["mask"]
    assert rel_err(logps[m], want_lp[m]) <= 1e-6 and rel_err(ent[m], want_ent[m]) <= 1e-5
    assert (logps[~m] == 0).all() and not logps.requires_grad


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_loss_ppo_clip_separate_kl_mask_bias_temperature(strategy):
    d = make(seed=2, bias=True)
    kw = dict(ref_logps=d["ref_logps"], beta=0.1, old_logps=d["old_logps"], clip_low=0.1, clip_high=0.3,
              kl_mask=d["kl_mask"], aggregation="token-mean")
    naive, want, fused = loss_pair(d, temperature=0.8, **kw)
    loss, got, _, _ = fused(chunk_size=4, strategy=strategy)
    assert rel_err(loss, naive) <= 1e-5
    assert len(got) == 3  # hidden, weight, bias
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("train_hidden, train_weight", [(True, False), (False, True)])
def test_frozen_inputs_get_no_grad(strategy, train_hidden, train_weight):
    d = make(seed=3, bias=True)
    d["hidden"].requires_grad_(train_hidden)
    d["weight"].requires_grad_(train_weight)
    d["bias"].requires_grad_(False)
    naive, want, _ = loss_pair(d, ref_logps=d["ref_logps"], beta=0.04)
    loss, _, _ = fused_policy_loss(d["hidden"], d["weight"], d["tokens"], d["advantages"], d["mask"],
                                   bias=d["bias"], ref_logps=d["ref_logps"], beta=0.04, chunk_size=4,
                                   strategy=strategy)
    loss.backward()
    frozen = d["weight"] if train_hidden else d["hidden"]
    trained = d["hidden"] if train_hidden else d["weight"]
    assert frozen.grad is None and d["bias"].grad is None
    assert rel_err(trained.grad, want[0]) <= 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_autocast_matches_naive(strategy):
    d = make(seed=4, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive, want, fused = loss_pair(d, ref_logps=d["ref_logps"], beta=0.04)
        loss, got, _, _ = fused(chunk_size=8, strategy=strategy)
    assert rel_err(loss, naive) <= 1e-2
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) <= 1e-2
    exact, _, _ = loss_pair(d, ref_logps=d["ref_logps"], beta=0.04)
    assert 1e-6 < rel_err(loss, exact) <= 5e-2  # it did run in bfloat16


def test_bf16_parameters_give_bf16_grads():
    d = make(seed=5, dtype=torch.bfloat16)
    naive, want, fused = loss_pair(d)
    loss, got, _, _ = fused(chunk_size=6)
    assert rel_err(loss, naive) <= 1e-2
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and rel_err(g, w) <= 1e-2


def _logits_scale(d: dict, scale: float = 6.0) -> dict:
    """Logits of a trained model's size (|z| up to ~30), where bf16 rounds them to multiples of 1/8 to 1/4."""
    with torch.no_grad():
        d["weight"].mul_(scale)
    return d


@pytest.mark.parametrize("bias", [False, True])
def test_float32_logits_round_the_bf16_product_to_float32_only(bias):
    """With bf16 hidden states and weight, `float32_logits` gives the log-probs and entropy of the exact float32
    product of those bf16 numbers (summation order aside), chunked and naive alike; without it the logits are
    rounded to bf16 first, as `F.linear` does, and the log-probs move by far more than float32 rounding."""
    d = _logits_scale(make(seed=11, bias=bias, dtype=torch.bfloat16))
    args = (d["hidden"], d["weight"], d["tokens"])
    with torch.no_grad():
        exact = naive_token_logps_entropy(d["hidden"].float(), d["weight"].float(), d["tokens"],
                                          bias=None if d["bias"] is None else d["bias"].float())
        f32 = token_logps_entropy(*args, bias=d["bias"], chunk_size=5, float32_logits=True)
        naive32 = naive_token_logps_entropy(*args, bias=d["bias"], float32_logits=True)
        rounded = token_logps_entropy(*args, bias=d["bias"], chunk_size=5)
    for got in (f32, naive32):
        torch.testing.assert_close(got[0], exact[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(got[1], exact[1], rtol=0, atol=2e-5)
    assert (rounded[0] - exact[0]).abs().max() > 1e-2  # bf16-rounded logits: the difference the option removes


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_logits_loss_and_grads_match_naive(strategy):
    """The fused loss with `float32_logits` equals the naive loss with it, in value and in every gradient (bf16
    parameters, bf16 gradients), and its log-probs are the exact product's."""
    d = _logits_scale(make(seed=12, bias=True, dtype=torch.bfloat16))
    naive, want, fused = loss_pair(d, ref_logps=d["ref_logps"], beta=0.04, float32_logits=True)
    loss, got, logps, _ = fused(chunk_size=6, strategy=strategy)
    assert rel_err(loss, naive) <= 1e-5
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and rel_err(g, w) <= 1e-2
    with torch.no_grad():
        exact, _ = naive_token_logps_entropy(d["hidden"].float(), d["weight"].float(), d["tokens"],
                                             bias=d["bias"].float(), with_entropy=False)
    used = d["mask"]  # the loss's tokens (no kl_mask given)
    torch.testing.assert_close(logps[used], exact[used], rtol=0, atol=2e-5)


def test_float32_logits_under_autocast_use_the_autocast_products():
    """Under bf16 autocast with float32 parameters, `float32_logits` keeps the product of the bf16-cast inputs in
    float32: equal to the exact product of those casts, not to the float32 inputs' product."""
    d = _logits_scale(make(seed=13))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = token_logps_entropy(d["hidden"], d["weight"], d["tokens"], chunk_size=4, float32_logits=True,
                                     with_entropy=False)
    with torch.no_grad():
        casts = [t.to(torch.bfloat16).float() for t in (d["hidden"], d["weight"])]
        want, _ = naive_token_logps_entropy(*casts, d["tokens"], with_entropy=False)
        full, _ = naive_token_logps_entropy(d["hidden"], d["weight"], d["tokens"], with_entropy=False)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (got - full).abs().max() > 1e-3


def test_float32_logits_change_nothing_in_float32():
    d = make(seed=14, bias=True)
    with torch.no_grad():
        a = token_logps_entropy(d["hidden"], d["weight"], d["tokens"], bias=d["bias"], chunk_size=4)
        b = token_logps_entropy(d["hidden"], d["weight"], d["tokens"], bias=d["bias"], chunk_size=4,
                                float32_logits=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_is_skipped(strategy):
    # Padding positions hold NaN hidden states: projecting them would poison the loss and the grads.
    d = make(seed=6)
    pad = torch.zeros(N, 3, dtype=torch.bool)
    hidden = torch.cat([d["hidden"].detach(), torch.full((N, 3, H), float("nan"))], 1).requires_grad_()
    mask = torch.cat([d["mask"], pad], 1)
    tokens = torch.cat([d["tokens"], torch.zeros(N, 3, dtype=torch.long)], 1)
    loss, logps, _ = fused_policy_loss(hidden, d["weight"], tokens, d["advantages"], mask, chunk_size=4,
                                       strategy=strategy)
    gh, gw = torch.autograd.grad(loss, [hidden, d["weight"]])
    naive, want, _ = loss_pair(d)
    assert rel_err(loss, naive) <= 1e-5 and logps.isfinite().all()
    assert rel_err(gh[:, :T], want[0]) <= 1e-5 and (gh[:, T:] == 0).all()
    assert rel_err(gw, want[1]) <= 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_mask_gives_zero_loss_and_grads(strategy):
    d = make(seed=7)
    empty = torch.zeros(N, T, dtype=torch.bool)
    args = (d["hidden"], d["weight"], d["tokens"], d["advantages"], empty)
    loss, _, _ = fused_policy_loss(*args, strategy=strategy)
    gh, gw = torch.autograd.grad(loss, [d["hidden"], d["weight"]])
    assert loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all()


def test_no_grad_scoring_and_second_backward():
    d = make(seed=8)
    with torch.no_grad():
        lp, ent = token_logps_entropy(d["hidden"], d["weight"], d["tokens"], mask=d["mask"], chunk_size=3)
    assert lp.grad_fn is None and ent.grad_fn is None
    want, _ = naive_token_logps_entropy(d["hidden"], d["weight"], d["tokens"])
    assert rel_err(lp[d["mask"]], want[d["mask"]]) <= 1e-6
    loss, _, _ = fused_policy_loss(d["hidden"], d["weight"], d["tokens"], d["advantages"], d["mask"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_bad_arguments_raise():
    d = make(seed=9)
    args = (d["hidden"], d["weight"], d["tokens"], d["advantages"], d["mask"])
    with pytest.raises(ValueError, match="valid: \\['grad-in-forward', 'recompute'\\]"):
        fused_policy_loss(*args, strategy="fast")
    with pytest.raises(ValueError, match="weight"):
        token_logps_entropy(d["hidden"], d["weight"][:, :4], d["tokens"])
    with pytest.raises(ValueError, match="mask"):
        token_logps_entropy(d["hidden"], d["weight"], d["tokens"], mask=d["mask"].float())
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps_entropy(d["hidden"], d["weight"], d["tokens"], chunk_size=0)


def test_call_with_head_plain_module_and_restores_forward():
    d = make(seed=10)
    head = nn.Linear(H, V)
    fn = partial(fused_policy_loss, tokens=d["tokens"], advantages=d["advantages"], mask=d["mask"])
    loss, _, _ = call_with_head(head, d["hidden"], fn)
    want, _, _ = fn(d["hidden"], head.weight, bias=head.bias)
    assert torch.equal(loss, want)
    assert "forward" not in head.__dict__ and head(d["hidden"]).shape == (N, T, V)

    def boom(*args, **kwargs):
        raise KeyError("inside")

    with pytest.raises(KeyError):
        call_with_head(head, d["hidden"], boom)
    assert "forward" not in head.__dict__


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_fsdp2_sharded_head_two_processes(tmp_path):
    worker = Path(__file__).with_name("_fsdp_fused_worker.py")
    rc, out, err = run_in_own_session([sys.executable, str(worker), file_rendezvous(tmp_path)], 240,
                                      "the 2-process FSDP2 worker")
    assert rc == 0 and out.strip().endswith("OK"), err[-12000:]
