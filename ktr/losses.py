"""Policy-gradient loss of GRPO / Video-KTR (layer L1), docs/method.md section 3.

Three pieces, each defined once and reused by the chunked fused loss (``ktr/fused.py``):

* :func:`per_token_loss` - the per-token terms ``l_t = -(surrogate_t - beta * k3_t)``, returned as the
  policy part and the KL part separately so that each can be aggregated over its own mask.
* :func:`token_weights` - every aggregation rule is linear in ``l``, so it is a weight tensor ``W [N, T]``
  with ``loss = sum_{i,t} W[i,t] * l[i,t]``. A chunked loss computes ``W`` once on the full ``[N, T]`` mask
  (per-row counts need whole rows), then sums ``W[chunk] * l[chunk]`` chunk by chunk.
* :func:`policy_loss` - the two combined, with empty-mask safety and micro-batch denominators.

Shapes: ``N`` completions (``B * G``), ``T`` completion positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ktr.ops import check_mask, masked_count, masked_fill_zero, masked_mean, safe_denominator, upcast

__all__ = [
    "AGGREGATIONS",
    "TokenTerms",
    "aggregate",
    "clip_fraction",
    "get_aggregation",
    "kl_k3",
    "masked_kl_mean",
    "per_token_loss",
    "policy_loss",
    "released_kl_mean",
    "token_weights",
    "truncated_is_weights",
]

WeightNorm = Literal["weights", "mask"]

# Bound on |log ratio| in the clipped objective: exp(20) ~ 5e8 keeps ratio * A finite in float32
# (an unbounded exp overflows to inf, and inf * 0 = NaN). Only reached by wildly off-policy tokens.
_LOG_RATIO_BOUND = 20.0
# The released code clamps c = ref - logp to [-10, 10] before the k3 estimator.
_KL_LOG_BOUND = 10.0


class TokenTerms(NamedTuple):
    """Per-token loss terms, each ``[N, T]``; the full per-token loss is ``policy + kl``."""

    policy: Tensor  # [N, T] -surrogate_t
    kl: Tensor | None  # [N, T] beta * k3_t; None when the KL term is off


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 estimator of KL(pi || ref) per token: ``exp(c) - c - 1``, ``c = clamp(ref - logp, -10, 10)``.

    Args:
        logps: ``[N, T]`` log-probs of the sampled tokens under the policy.
        ref_logps: ``[N, T]`` the same under the reference model.
    Returns:
        ``[N, T]`` non-negative k3 values (float32 at least).
    """
    c = (upcast(ref_logps) - upcast(logps)).clamp(-_KL_LOG_BOUND, _KL_LOG_BOUND)
    return torch.exp(c) - c - 1.0


def per_token_loss(
    logps: Tensor,
    advantages: Tensor,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    old_logps: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> TokenTerms:
    """Per-token terms ``l_t = -(surrogate_t - beta * k3_t)``; the single home of the formula.

    Args:
        logps: ``[N, T]`` policy log-probs (with grad).
        advantages: ``[N]`` per completion (or ``[N, T]`` per token).
        ref_logps: ``[N, T]`` reference log-probs; needed when ``beta != 0``.
        beta: KL coefficient (released run: 0.04).
        old_logps: ``[N, T]`` behaviour-policy log-probs. ``None`` is the released one-update-per-rollout
            case: ``ratio = exp(logp - logp.detach())`` is exactly 1 with gradient ``A * grad logp`` and
            nothing is clipped. Given, the PPO clipped surrogate
            ``min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)`` with ``ratio = exp(logp - old)``.
        clip_low / clip_high: PPO clip range (only used with ``old_logps``).
    Returns:
        :class:`TokenTerms` with ``policy = -surrogate`` and ``kl = beta * k3`` (``None`` when off).
        No masking happens here: callers aggregate with :func:`token_weights` or :func:`aggregate`.
    """
    _check_kl_args(ref_logps, beta)
    logps = upcast(logps)
    adv = upcast(advantages)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, T]
    if old_logps is None:
        ratio = torch.exp(logps - logps.detach())  # [N, T], value 1
        surrogate = ratio * adv
    else:
        if not (0.0 <= clip_low <= 1.0 and clip_high >= 0.0):
            raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got {clip_low}, {clip_high}")
        log_ratio = (logps - upcast(old_logps)).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        ratio = torch.exp(log_ratio)  # [N, T]
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        surrogate = torch.minimum(ratio * adv, clipped * adv)
    kl = beta * kl_k3(logps, ref_logps) if ref_logps is not None and beta != 0 else None
    return TokenTerms(policy=-surrogate, kl=kl)


def _check_kl_args(ref_logps: Tensor | None, beta: float) -> None:
    # A configured KL coefficient with no reference log-probs is a wiring bug; do not drop it silently.
    if beta != 0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs `ref_logps`; pass beta=0.0 to train without the KL term")


# ---------------------------------------------------------------------------------------------------------
# Aggregation rules as token weights. Each fn(mask [N, T] bool, dtype, num_sequences, num_tokens, max_len)
# returns W [N, T] with W = 0 outside `mask`. Counts may be ints or (all-reduced) 0-dim tensors.


def _positive(x: Tensor) -> Tensor:
    # An empty count (0) becomes 1 so that 0 / 1 = 0. Not clamp_min(1): a sum of float weights may lie in (0, 1);
    # on integer counts the two are identical.
    return torch.where(x > 0, x, torch.ones_like(x))


def _seq_mean_token_mean(mask: Tensor, dtype: torch.dtype, num_sequences, num_tokens, max_len) -> Tensor:
    # Released rule: mean_i( sum_t M l / sum_t M ). A row with no selected token has W = 0, so it adds 0,
    # yet it still counts in the mean over i (the released code divides by the number of sequences).
    m = mask.to(dtype)  # [N, T] (0/1, or float weights)
    per_row = _positive(m.sum(dim=-1, keepdim=True))  # [N, 1]
    n_seq = safe_denominator(mask.shape[0] if num_sequences is None else num_sequences, m)
    return m / (per_row * n_seq)


def _token_mean(mask: Tensor, dtype: torch.dtype, num_sequences, num_tokens, max_len) -> Tensor:
    # DAPO: sum_{i,t} M l / sum_{i,t} M. No token at all -> numerator 0 over 1.
    m = mask.to(dtype)
    n_tok = _positive(torch.as_tensor(masked_count(mask) if num_tokens is None else num_tokens, dtype=m.dtype,
                                      device=m.device))
    return m / n_tok


def _seq_mean_token_sum_norm(mask: Tensor, dtype: torch.dtype, num_sequences, num_tokens, max_len) -> Tensor:
    # Dr. GRPO: sum_{i,t} M l / (N * max_len), a constant normaliser independent of lengths.
    m = mask.to(dtype)
    n_seq = safe_denominator(mask.shape[0] if num_sequences is None else num_sequences, m)
    length = safe_denominator(mask.shape[-1] if max_len is None else max_len, m)
    return m / (n_seq * length)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "seq-mean-token-mean": _seq_mean_token_mean,
    "token-mean": _token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def get_aggregation(name: str) -> Callable[..., Tensor]:
    """Look up an aggregation weight rule by name (``ValueError`` listing the valid names)."""
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation {name!r}; valid: {sorted(AGGREGATIONS)}") from None


def token_weights(
    mask: Tensor,
    aggregation: str = "seq-mean-token-mean",
    *,
    num_sequences: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    max_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    weights: Tensor | None = None,
    weight_norm: WeightNorm = "weights",
) -> Tensor:
    """Weights ``W [N, T]`` such that ``loss = sum(W * l)`` under ``aggregation`` (0 outside ``mask``).

    Args:
        mask: ``[N, T]`` bool, the tokens the term is averaged over.
        num_sequences: global number of sequences (denominator of the mean over i); default ``N``.
            Pass the whole batch's ``N`` when this call sees one micro-batch of it.
        num_tokens: global ``mask`` token count for ``token-mean`` (with float ``weights`` and
            ``weight_norm="weights"``: the global sum of the weights); default this call's.
        max_len: ``seq-mean-token-sum-norm`` length normaliser; default ``T``.
        weights: ``[N, T]`` float per-token weights ``w >= 0`` (soft key tokens, TW-GRPO), read on ``mask``.
        weight_norm: how the aggregation normalises with ``weights``. ``"weights"``: the rule runs on ``w``
            in place of the 0/1 mask, so every count becomes a sum of weights: ``seq-mean-token-mean`` is
            ``mean_i(sum_t w l / sum_t w)``, ``token-mean`` ``sum w l / sum w``, ``seq-mean-token-sum-norm``
            ``sum w l / (N * max_len)``; a 0/1 ``w`` equal to ``mask`` gives the mask's ``W`` bit for bit.
            ``"mask"``: ``W = w * W_mask``, the mask's counts kept (``mean_i(sum_t w l / sum_t M)``, ...), as the
            authors' early soft-weight code and TW-GRPO's code did.
    """
    rule = get_aggregation(aggregation)
    if weights is None:
        return rule(mask, dtype, num_sequences, num_tokens, max_len)
    if weights.shape != mask.shape or not weights.dtype.is_floating_point:
        raise ValueError(f"`weights` must be float {tuple(mask.shape)}, got {weights.dtype} {tuple(weights.shape)}")
    w = masked_fill_zero(weights.to(dtype), mask)  # [N, T]
    if weight_norm == "weights":
        return rule(w, dtype, num_sequences, num_tokens, max_len)
    if weight_norm == "mask":
        return rule(mask, dtype, num_sequences, num_tokens, max_len) * w
    raise ValueError(f"unknown weight_norm {weight_norm!r}; valid: ['mask', 'weights']")


def aggregate(values: Tensor, mask: Tensor, aggregation: str = "seq-mean-token-mean", **counts) -> Tensor:
    """Scalar ``sum(W * values)`` for ``values [N, T]`` over ``mask [N, T]``; ``counts`` (and ``weights``,
    ``weight_norm``) as in :func:`token_weights`.

    Entries outside ``mask`` are dropped with ``where`` (not multiplied by 0), so NaN there cannot leak.
    """
    weights = token_weights(mask, aggregation, dtype=upcast(values).dtype, **counts)
    return (masked_fill_zero(upcast(values), mask) * weights).sum()


def _check_inputs(logps: Tensor, advantages: Tensor, mask: Tensor, **others: Tensor | None) -> None:
    if logps.dim() != 2:
        raise ValueError(f"`logps` must be [N, T], got shape {tuple(logps.shape)}")
    check_mask(mask, logps, "mask")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"`advantages` has shape {tuple(advantages.shape)}, expected [N]={tuple(logps.shape[:1])} "
            f"or [N, T]={tuple(logps.shape)}"
        )
    for name, t in others.items():
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(logps.shape)}")


def policy_loss(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    old_logps: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    kl_mask: Tensor | None = None,
    num_sequences: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    max_len: int | None = None,
    num_kl_tokens: int | Tensor | None = None,
    weights: Tensor | None = None,
    weight_norm: WeightNorm = "weights",
) -> Tensor:
    """GRPO / Video-KTR loss, a scalar (float32 at least).

    Args:
        logps: ``[N, T]`` policy log-probs of the sampled tokens (with grad).
        advantages: ``[N]`` (or ``[N, T]``) advantages, no grad.
        mask: ``[N, T]`` bool; the key-token mask ``M`` for KTR, ``valid`` for vanilla GRPO.
        ref_logps, beta, old_logps, clip_low, clip_high: see :func:`per_token_loss`.
        aggregation: a name in ``AGGREGATIONS``:
            ``seq-mean-token-mean`` (released) ``mean_i(sum_t M l / sum_t M)``;
            ``token-mean`` (DAPO) ``sum M l / sum M``;
            ``seq-mean-token-sum-norm`` (Dr. GRPO) ``sum M l / (N * max_len)``.
        kl_mask: ``[N, T]`` bool tokens that carry the KL term. ``None`` (released): the KL term lives on
            ``mask`` and the loss is ``Agg_mask(policy + kl)``. Given (e.g. ``valid``), the two terms are
            aggregated separately, each over its own mask under the same rule, and summed:
            ``Agg_mask(policy) + Agg_kl_mask(kl)``. With ``kl_mask == mask`` both forms are equal, so the
            KL strength per token does not depend on how many tokens were selected as key.
        num_sequences, num_tokens, max_len: global denominators for micro-batching (see
            :func:`token_weights`): with them set to whole-batch values, the sum of ``policy_loss`` over
            row-wise micro-batches equals the whole-batch loss, in value and gradient.
        num_kl_tokens: global ``kl_mask`` token count for ``token-mean`` (only with ``kl_mask``; with
            ``kl_mask=None`` the KL term shares ``num_tokens``).
        weights: ``[N, T]`` float token weights on ``mask`` (soft key tokens, TW-GRPO); ``None`` is the 0/1
            mask. With ``kl_mask=None`` the KL term is weighted too (``w * (policy + kl)``, as the authors' soft
            code); a given ``kl_mask`` keeps its own unweighted aggregation.
        weight_norm: normaliser with ``weights``, see :func:`token_weights` (``"weights"``: sums of weights;
            ``"mask"``: the mask's counts). Pass ``num_tokens`` accordingly when micro-batching.
    Returns:
        scalar loss. Empty masks never give NaN: a row without selected tokens adds 0, a batch without
        any gives 0 with zero gradients. Positions outside ``mask`` (and ``kl_mask``) get exactly zero
        gradient even when their log-probs are NaN or inf (they are replaced before any arithmetic).
    """
    get_aggregation(aggregation)  # fail on a typo before any work
    _check_inputs(logps, advantages, mask, ref_logps=ref_logps, old_logps=old_logps)
    _check_kl_args(ref_logps, beta)
    if kl_mask is not None:
        check_mask(kl_mask, logps, "kl_mask")
    elif num_kl_tokens is not None:
        raise ValueError("`num_kl_tokens` is only meaningful with `kl_mask`; use `num_tokens` otherwise")
    use_kl = ref_logps is not None and beta != 0
    kl_region = mask if kl_mask is None else kl_mask  # [N, T]
    used = mask | kl_region if use_kl else mask  # [N, T] every position some term reads
    # Zero unused positions of every input first: where() blocks NaN in the forward pass, but only
    # replacing the inputs also keeps the backward pass free of 0 * NaN at padding.
    logps = masked_fill_zero(logps, used)
    old = None if old_logps is None else masked_fill_zero(old_logps, used)
    ref = masked_fill_zero(ref_logps, used) if use_kl else None
    terms = per_token_loss(
        logps, advantages, ref_logps=ref, beta=beta if use_kl else 0.0,
        old_logps=old, clip_low=clip_low, clip_high=clip_high,
    )
    counts = dict(num_sequences=num_sequences, max_len=max_len)
    weighted = {} if weights is None else dict(weights=weights, weight_norm=weight_norm)
    if terms.kl is None:
        return aggregate(terms.policy, mask, aggregation, num_tokens=num_tokens, **counts, **weighted)
    if kl_mask is None:
        return aggregate(terms.policy + terms.kl, mask, aggregation, num_tokens=num_tokens, **counts, **weighted)
    loss = aggregate(terms.policy, mask, aggregation, num_tokens=num_tokens, **counts, **weighted)
    return loss + aggregate(terms.kl, kl_mask, aggregation, num_tokens=num_kl_tokens, **counts)


@torch.no_grad()
def truncated_is_weights(logps: Tensor, rollout_logps: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance weights ``min(exp(logp_policy - logp_rollout), cap)`` ``[N, T]`` (0 outside ``mask``).

    The rollout engine (vLLM) samples from a slightly different distribution than the policy scores (other
    kernels, precision, positions); multiplying each token's policy-gradient term by this detached weight
    corrects for it (TIS). The policy gradient is linear in the advantage, so the module passes per-token
    advantages ``A_i * w_it`` to :func:`policy_loss`: the KL term and the normalisers stay as they are.

    >>> logps, rollout_logps = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    >>> truncated_is_weights(logps, rollout_logps, torch.tensor([[True, True]]), 2.0)
    tensor([[2., 1.]])
    """
    log_ratio = (upcast(logps) - upcast(rollout_logps)).clamp(max=_LOG_RATIO_BOUND)  # [N, T]
    return masked_fill_zero(log_ratio.exp().clamp(max=cap), mask)


# ---------------------------------------------------------------------------------------------------------
# Metrics: detached 0-dim tensors (no .item(), the caller decides when to sync).


@torch.no_grad()
def masked_kl_mean(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean k3 KL over ``mask`` (``[N, T]`` inputs); 0 when the mask is empty."""
    check_mask(mask, logps, "mask")
    logps, ref_logps = masked_fill_zero(logps, mask), masked_fill_zero(ref_logps, mask)
    return masked_mean(kl_k3(logps, ref_logps), mask)


@torch.no_grad()
def released_kl_mean(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """The released trainer's KL metric: k3 averaged over each row's ``mask`` tokens, then over rows.

    With ``mask`` the key-token mask this is what the released code logged as ``kl`` (its completion mask had
    been replaced by the key tokens); :func:`masked_kl_mean` (ktr's ``train/kl``) averages over all valid tokens
    at once instead. Rows without a ``mask`` token are left out (the released code divided 0 by 0 there);
    0 when no row has one. Inputs ``[N, T]``.
    """
    check_mask(mask, logps, "mask")
    k3 = kl_k3(masked_fill_zero(logps, mask), masked_fill_zero(ref_logps, mask))  # [N, T]
    per_row = masked_mean(k3, mask, dim=-1)  # [N]
    has = mask.any(-1)  # [N]
    return masked_mean(per_row, has)


@torch.no_grad()
def clip_fraction(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> Tensor:
    """Fraction of ``mask`` tokens whose clipped branch is active (zero policy gradient); 0 if empty.

    Active means ``A > 0 and ratio > 1 + clip_high`` or ``A < 0 and ratio < 1 - clip_low``.
    Inputs as in :func:`policy_loss` (``advantages [N]`` or ``[N, T]``).
    """
    check_mask(mask, logps, "mask")
    adv = upcast(advantages)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    ratio = torch.exp((upcast(logps) - upcast(old_logps)).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    active = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    return masked_mean(active.to(ratio.dtype), mask)
