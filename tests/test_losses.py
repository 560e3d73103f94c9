"""Policy loss: hand-computed values and gradients for every aggregation, clipping, KL placement,
empty masks, and micro-batch equality. Float64 so hand values can be compared tightly."""

from __future__ import annotations

import math

import pytest
import torch

from ktr.losses import (
    AGGREGATIONS,
    aggregate,
    clip_fraction,
    kl_k3,
    masked_kl_mean,
    per_token_loss,
    policy_loss,
    token_weights,
)
from ktr.ops import masked_mean, masked_sum

LN2 = math.log(2.0)
F64 = torch.float64
T_, F_ = True, False


def _leaf(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=True)


# Shared case: N = 2, T = 3, key tokens M = [[1, 1, 0], [1, 0, 0]], A = [1, -3], ratio 1 (no old_logps),
# so l = -A on every token: row 0 -> -1 per token, row 1 -> +3.
MASK = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
VALID = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
ADV = torch.tensor([1.0, -3.0], dtype=F64)
HALF = math.log(0.5)


def _logps() -> torch.Tensor:
    return _leaf([[HALF] * 3, [HALF] * 3])


# ref - logp: row 0 [ln2, -ln2, -2 ln2], row 1 [0, ln2, 0]
REF = torch.tensor([[0.0, math.log(0.25), math.log(0.125)], [HALF, 0.0, HALF]], dtype=F64)
K3 = torch.tensor([[1 - LN2, LN2 - 0.5, 2 * LN2 - 0.75], [0.0, 1 - LN2, 0.0]], dtype=F64)


@pytest.mark.parametrize(
    ("aggregation", "kwargs", "value", "grad"),
    [
        # mean_i(sum_t M l / sum_t M) = ((-1 - 1) / 2 + 3 / 1) / 2 = 1; grad = -A M / (N sum_t M_i)
        ("seq-mean-token-mean", {}, 1.0, [[-0.25, -0.25, 0.0], [1.5, 0.0, 0.0]]),
        # (-1 - 1 + 3) / 3 tokens; grad = -A M / 3
        ("token-mean", {}, 1 / 3, [[-1 / 3, -1 / 3, 0.0], [1.0, 0.0, 0.0]]),
        # (-1 - 1 + 3) / (N * T = 6); grad = -A M / 6
        ("seq-mean-token-sum-norm", {}, 1 / 6, [[-1 / 6, -1 / 6, 0.0], [0.5, 0.0, 0.0]]),
        ("seq-mean-token-sum-norm", {"max_len": 4}, 1 / 8, [[-1 / 8, -1 / 8, 0.0], [3 / 8, 0.0, 0.0]]),
    ],
)
def test_aggregations_hand_values_and_grads(aggregation, kwargs, value, grad) -> None:
    logps = _logps()
    loss = policy_loss(logps, ADV, MASK, aggregation=aggregation, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(value, dtype=F64))
    torch.testing.assert_close(logps.grad, torch.tensor(grad, dtype=F64))


def test_unknown_aggregation_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        policy_loss(_logps(), ADV, MASK, aggregation="sum")
    assert set(AGGREGATIONS) == {"seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"}


def test_unclipped_ratio_is_one_with_policy_gradient() -> None:
    logps = _logps()
    terms = per_token_loss(logps, ADV)
    torch.testing.assert_close(terms.policy.detach(), -ADV[:, None].expand(2, 3))
    assert terms.kl is None
    terms.policy.sum().backward()
    torch.testing.assert_close(logps.grad, -ADV[:, None].expand(2, 3))


def test_clipped_objective_hand_values() -> None:
    # ratios r = exp(logp - old): row 0 (A = +1) [1.5, 0.5], row 1 (A = -1) [0.5, 1.5], eps = 0.2.
    # row 0: min(1.5, 1.2) = 1.2 (clipped, no grad); min(0.5, 0.8) = 0.5 (grad -A r = -0.5)
    # row 1: min(-0.5, -0.8) = -0.8 (clipped, no grad); min(-1.5, -1.2) = -1.5 (grad -A r = 1.5)
    old = torch.full((2, 2), -1.0, dtype=F64)
    ratios = torch.tensor([[1.5, 0.5], [0.5, 1.5]], dtype=F64)
    logps = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss = policy_loss(logps, adv, mask, old_logps=old)
    loss.backward()
    # ((-1.2 - 0.5) / 2 + (0.8 + 1.5) / 2) / 2 = 0.15; grads divided by N * |M_i| = 4
    torch.testing.assert_close(loss, torch.tensor(0.15, dtype=F64))
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.125], [0.0, 0.375]], dtype=F64))
    torch.testing.assert_close(clip_fraction(logps, old, adv, mask), torch.tensor(0.5, dtype=F64))
    # Asymmetric range: clip_high 0.6 lets r = 1.5 through for A > 0 (l = -1.5, grad -1.5 / 4).
    logps.grad = None
    loss = policy_loss(logps, adv, mask, old_logps=old, clip_high=0.6)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(((-1.5 - 0.5) / 2 + (0.8 + 1.5) / 2) / 2, dtype=F64))
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.375, -0.125], [0.0, 0.375]], dtype=F64))


def test_on_policy_clipped_equals_released_unclipped() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=gen, dtype=F64)
    adv = torch.randn(4, generator=gen, dtype=F64)
    mask = torch.rand(4, 5, generator=gen) < 0.6
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    la = policy_loss(a, adv, mask)
    lb = policy_loss(b, adv, mask, old_logps=base.clone())
    la.backward(), lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


def test_kl_k3_hand_values_and_clamp() -> None:
    logps = torch.full((2, 3), HALF, dtype=F64)
    torch.testing.assert_close(kl_k3(logps, REF), K3)
    big = kl_k3(torch.tensor([[-60.0, 0.0]], dtype=F64), torch.tensor([[0.0, -60.0]], dtype=F64))
    # c clamped to +10 and -10
    torch.testing.assert_close(big, torch.tensor([[math.exp(10) - 11, math.exp(-10) + 9]], dtype=F64))


def test_kl_on_key_tokens_released() -> None:
    logps = _logps()
    loss = policy_loss(logps, ADV, MASK, ref_logps=REF, beta=0.1)
    loss.backward()
    # row 0: (-1 + 0.1 (1 - ln2) - 1 + 0.1 (ln2 - 0.5)) / 2 = -0.975; row 1: (3 + 0) / 1; mean = 1.0125
    torch.testing.assert_close(loss, torch.tensor(1.0125, dtype=F64))
    # d(beta k3)/dlogp = beta (1 - e^c): row 0 t0 0.1 * (1 - 2), t1 0.1 * (1 - 0.5); row 1 t0 0
    expected = torch.tensor([[(-1 - 0.1) / 4, (-1 + 0.05) / 4, 0.0], [1.5, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(logps.grad, expected)


def test_kl_on_valid_tokens_is_aggregated_over_its_own_mask() -> None:
    logps = _logps()
    loss = policy_loss(logps, ADV, MASK, ref_logps=REF, beta=0.1, kl_mask=VALID)
    loss.backward()
    policy = 1.0  # as in the beta = 0 case
    kl_rows = [0.1 * (0.5 + 2 * LN2 - 0.75) / 3, 0.1 * (1 - LN2) / 2]
    torch.testing.assert_close(loss, torch.tensor(policy + sum(kl_rows) / 2, dtype=F64))
    # t2 of row 0 and t1 of row 1 now get KL gradient only: beta (1 - e^c) / (N |valid_i|)
    torch.testing.assert_close(logps.grad[0, 2], torch.tensor(0.1 * (1 - 0.25) / 6, dtype=F64))
    torch.testing.assert_close(logps.grad[1, 1], torch.tensor(0.1 * (1 - 2) / 4, dtype=F64))
    # kl_mask == mask reproduces the released single aggregation
    same = policy_loss(_logps(), ADV, MASK, ref_logps=REF, beta=0.1, kl_mask=MASK)
    torch.testing.assert_close(same, torch.tensor(1.0125, dtype=F64))


def test_kl_off_when_beta_zero_and_error_without_reference() -> None:
    with_ref = policy_loss(_logps(), ADV, MASK, ref_logps=REF, beta=0.0)
    torch.testing.assert_close(with_ref, torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(_logps(), ADV, MASK, beta=0.04)


def test_masked_kl_mean_metric() -> None:
    logps = _logps()
    torch.testing.assert_close(masked_kl_mean(logps, REF, MASK), torch.tensor(0.5 / 3, dtype=F64))
    assert masked_kl_mean(logps, REF, torch.zeros_like(MASK)).item() == 0.0
    assert not masked_kl_mean(logps, REF, MASK).requires_grad


def test_empty_row_counts_in_mean_and_adds_zero() -> None:
    logps = _logps()
    mask = torch.tensor([[T_, T_, F_], [F_, F_, F_]])
    loss = policy_loss(logps, ADV, mask, ref_logps=REF, beta=0.1, kl_mask=torch.zeros_like(mask))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-1.0 / 2, dtype=F64))  # row 0 -> -1, divided by N = 2
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [0.0] * 3], dtype=F64))


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_all_masked_batch_is_zero_with_zero_grads_even_with_garbage(aggregation: str) -> None:
    nan, inf = float("nan"), float("inf")
    logps = _leaf([[nan, -inf, 0.0], [inf, 1.0, nan]])
    bad_ref = torch.tensor([[nan, inf, -inf], [0.0, nan, 5.0]], dtype=F64)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    loss = policy_loss(
        logps, ADV, empty, ref_logps=bad_ref, beta=0.1, old_logps=bad_ref, aggregation=aggregation
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logps.grad, torch.zeros(2, 3, dtype=F64))


def test_garbage_outside_mask_does_not_leak() -> None:
    nan = float("nan")
    logps = _leaf([[HALF, HALF, nan], [HALF, -float("inf"), nan]])
    loss = policy_loss(logps, ADV, MASK, ref_logps=REF, beta=0.1)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1.0125, dtype=F64))
    assert torch.isfinite(logps.grad).all()
    assert (logps.grad[~MASK] == 0).all()


def _random_case(seed: int, n: int = 8, t: int = 7) -> dict:
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(n, t, generator=gen) < 0.8
    mask = valid & (torch.rand(n, t, generator=gen) < 0.5)
    mask[2] = False  # a row with no key token
    return dict(
        logps=-torch.rand(n, t, generator=gen, dtype=F64) * 3,
        old=-torch.rand(n, t, generator=gen, dtype=F64) * 3,
        ref=-torch.rand(n, t, generator=gen, dtype=F64) * 3,
        adv=torch.randn(n, generator=gen, dtype=F64),
        mask=mask,
        valid=valid,
    )


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("separate_kl", [False, True])
def test_micro_batch_sum_equals_whole_group(aggregation: str, separate_kl: bool) -> None:
    c = _random_case(3)
    n, t = c["mask"].shape
    kl_mask = c["valid"] if separate_kl else None
    common = dict(ref_logps=c["ref"], beta=0.04, old_logps=c["old"], aggregation=aggregation)
    whole_in = c["logps"].clone().requires_grad_()
    whole = policy_loss(whole_in, c["adv"], c["mask"], kl_mask=kl_mask, **common)
    whole.backward()

    parts_in = c["logps"].clone().requires_grad_()
    counts = dict(num_sequences=n, num_tokens=int(c["mask"].sum()), max_len=t)
    if separate_kl:
        counts["num_kl_tokens"] = c["valid"].sum()  # a 0-dim tensor works too (e.g. all-reduced)
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        total = total + policy_loss(
            parts_in[rows], c["adv"][rows], c["mask"][rows],
            ref_logps=c["ref"][rows], beta=0.04, old_logps=c["old"][rows], aggregation=aggregation,
            kl_mask=None if kl_mask is None else kl_mask[rows], **counts,
        )
    total.backward()
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(parts_in.grad, whole_in.grad)
    assert whole_in.grad.abs().sum() > 0


def test_token_weights_sum_and_global_counts() -> None:
    w = token_weights(MASK, "seq-mean-token-mean", dtype=F64)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]], dtype=F64))
    w = token_weights(MASK, "token-mean", num_tokens=torch.tensor(6))
    torch.testing.assert_close(w.sum(), torch.tensor(0.5))
    vals = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 0.0]], dtype=F64)
    torch.testing.assert_close(aggregate(vals, MASK, "token-mean"), torch.tensor(7 / 3, dtype=F64))


def test_low_precision_inputs_compute_in_float32() -> None:
    logps = torch.full((2, 3), HALF, dtype=torch.bfloat16, requires_grad=True)
    loss = policy_loss(logps, ADV.to(torch.bfloat16), MASK, ref_logps=REF.to(torch.bfloat16), beta=0.1)
    loss.backward()
    assert loss.dtype == torch.float32
    assert logps.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, torch.tensor(1.0125), atol=2e-2, rtol=0)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="bool"):
        policy_loss(_logps(), ADV, MASK.double())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(_logps(), ADV[:1], MASK)
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(_logps(), ADV, MASK, old_logps=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kl_mask"):
        policy_loss(_logps(), ADV, MASK, ref_logps=REF, beta=0.1, kl_mask=VALID[:, :2])
    with pytest.raises(ValueError, match="num_kl_tokens"):
        policy_loss(_logps(), ADV, MASK, num_kl_tokens=3)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(_logps(), ADV, MASK, old_logps=REF, clip_low=1.5)


def test_masked_ops_never_nan() -> None:
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]])
    m = torch.tensor([[T_, F_], [F_, F_]])
    torch.testing.assert_close(masked_sum(x, m, dim=-1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.0, 0.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_global_normalisation_matches_one_process_on_uneven_ranks(tmp_path):
    """`loss.normalize: global`: two ranks holding 3 and 2 completions of different lengths, gradients averaged
    as DDP/FSDP do, give one process's loss and gradients on all 5 (every aggregation, KL on key or valid tokens,
    soft weights); `rank` (released) does not (`tests/_loss_norm_worker.py`)."""
    import sys
    from pathlib import Path

    from tests.hangs import run_in_own_session
    from tests.helpers import file_rendezvous

    worker = Path(__file__).with_name("_loss_norm_worker.py")
    rc, out, err = run_in_own_session([sys.executable, str(worker), file_rendezvous(tmp_path)], 120,
                                      "the 2-process loss worker")
    assert rc == 0 and out.strip().endswith("OK"), err[-12000:]


def test_across_ranks_without_a_process_group_changes_nothing():
    from ktr.config import LossConfig
    from ktr.training.update import LossInputs, LossTerms

    mask = torch.tensor([[True, True, False], [True, False, False]])
    inputs = LossInputs(torch.zeros(2, 3, dtype=torch.long), mask, torch.ones(2))
    rank = LossTerms.of(LossConfig(aggregation="token-mean"), inputs)
    assert LossTerms.of(LossConfig(aggregation="token-mean", normalize="global"), inputs) == rank
    assert (rank.num_sequences, int(rank.num_tokens), rank.max_len) == (2, 3, 3)
