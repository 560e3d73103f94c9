"""Soft key-token weights (layer L1): the paper's hard-mask vs soft-weighting ablation.

Instead of the 0/1 top-``ratio`` mask, every valid token gets a float weight from the *rank* of its score
within its pool (the same pool as the hard selection: ``group``, ``sequence`` or ``batch``). With ``n`` eligible
(valid, finite) tokens in a pool, ranked by descending score (ties: earlier position first),
``r = rank / (n - 1)`` is 0 for the highest score and 1 for the lowest (``r = 0`` when ``n = 1``).

=================  ===============================================================  ==========================
weighting          ``w(r)``                                                          range
=================  ===============================================================  ==========================
``sigmoid``        ``1 + gamma * (sigmoid(k * (0.5 - r)) - 0.5)`` (authors' code)     within [1 - g/2, 1 + g/2]
``linear``         ``1 + gamma * (0.5 - r)``                                          [1 - g/2, 1 + g/2]
``exponential``    ``(1 + g/2) * ((1 - g/2) / (1 + g/2)) ** r`` (geometric decay)     [1 - g/2, 1 + g/2]
``softmax``        ``n * softmax_pool(-k * r)`` (mean 1 over the pool)                 (0, n]
=================  ===============================================================  ==========================

Sign convention (checked against the authors' ``compute_rank_weights``, which ranks with
``argsort(descending=True)``): ``r = 0`` is the top-scored token, so the top token gets the largest weight
(``1 + gamma * (sigmoid(k/2) - 0.5)`` ~ 1.75 for k = 20, gamma = 1.5) and the lowest ~0.25. Only the sigmoid is
the authors' formula; the paper names linear, exponential and softmax weightings without formulas, so these
are ktr's definitions, chosen to share the sigmoid's range (softmax: its natural normalisation, mean 1).

Deviation from the authors' code, on purpose: their ranks ran over the whole flat ``[N, T]`` batch with padding
set to -inf (so padding took the bottom ranks and squeezed the valid tokens' ranks upward); here ranks run
over the valid tokens of the pool only, so the weights do not depend on padding. Signals combine per token by
``mean`` (their default) or ``max`` over the signals that apply to the row (temporal: video rows only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ktr.ops import check_mask, upcast
from ktr.probes.select import SCOPES

__all__ = ["WEIGHTINGS", "combine_weights", "pool_ranks", "rank_weights"]


def pool_ranks(scores: Tensor, eligible: Tensor, group_size: int | None) -> Tensor:
    """Normalised descending rank ``r [N, T]`` in ``[0, 1]`` within each pool of ``group_size`` rows (None: one
    pool); ``r = 0`` is the highest score. Entries outside ``eligible & isfinite(scores)`` hold 1 (ignored)."""
    check_mask(eligible, scores, "eligible")
    n, t = scores.shape
    g = n if group_size is None else group_size
    if n == 0 or t == 0:
        return torch.ones_like(upcast(scores))
    x = upcast(scores)
    keep = (eligible & torch.isfinite(x)).reshape(n // g, g * t)  # [P, L]
    key = torch.where(keep, x.reshape(n // g, g * t), torch.full_like(x.reshape(n // g, g * t), float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [P, L]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(g * t, device=x.device).expand_as(order))
    count = keep.sum(-1, keepdim=True)  # [P, 1]
    r = rank.to(x.dtype) / (count - 1).clamp(min=1).to(x.dtype)  # [P, L]
    return torch.where(keep, r, torch.ones_like(r)).reshape(n, t)


def _sigmoid(r: Tensor, keep: Tensor, k: float, gamma: float) -> Tensor:
    return 1.0 + gamma * (torch.sigmoid(k * (0.5 - r)) - 0.5)


def _linear(r: Tensor, keep: Tensor, k: float, gamma: float) -> Tensor:
    return 1.0 + gamma * (0.5 - r)


def _exponential(r: Tensor, keep: Tensor, k: float, gamma: float) -> Tensor:
    top, bottom = 1.0 + gamma / 2, 1.0 - gamma / 2
    return top * (bottom / top) ** r


def _softmax(r: Tensor, keep: Tensor, k: float, gamma: float) -> Tensor:
    # keep / r are [P, L] here: the softmax runs over each pool's eligible tokens
    logits = torch.where(keep, -k * r, torch.full_like(r, float("-inf")))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an empty pool: all -inf -> NaN -> 0
    return p * keep.sum(-1, keepdim=True).to(r.dtype)


# r [P, L], keep [P, L] bool, k, gamma -> w [P, L] (read only where keep)
WEIGHTINGS: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "linear": _linear,
    "exponential": _exponential,
    "softmax": _softmax,
}


def rank_weights(scores: Tensor, eligible: Tensor, weighting: str, scope: str = "group",
                 group_size: int | None = None, k: float = 20.0, gamma: float = 1.5) -> Tensor:
    """Soft weights ``[N, T]`` float32 of one signal: ``WEIGHTINGS[weighting]`` of the pool ranks, 0 outside
    ``eligible & isfinite(scores)``. ``scores``/``eligible`` ``[N, T]``; ``scope`` as in ``select_scope``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {sorted(WEIGHTINGS)} (or `hard`)")
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; valid: {sorted(SCOPES)}")
    g = SCOPES[scope](group_size)
    n, t = scores.shape
    r = pool_ranks(scores, eligible, g)  # [N, T]
    keep = eligible & torch.isfinite(upcast(scores))  # [N, T]
    pools = n if g is None else g
    if n == 0 or t == 0:
        return torch.zeros_like(r)
    shape = (n // pools, pools * t)
    w = WEIGHTINGS[weighting](r.reshape(shape), keep.reshape(shape), k, gamma).reshape(n, t)
    return torch.where(keep, w, torch.zeros_like(w))


def combine_weights(weights: list[Tensor], eligible: list[Tensor], how: str = "mean") -> Tensor:
    """Per-token ``mean`` or ``max`` over the signals eligible there (each ``[N, T]``); 0 where none is."""
    if not weights or len(weights) != len(eligible):
        raise ValueError("combine_weights needs one eligibility mask per weight tensor, and at least one")
    w = torch.stack(weights)  # [S, N, T]
    e = torch.stack(eligible)  # [S, N, T]
    count = e.sum(0)  # [N, T]
    if how == "mean":
        out = torch.where(e, w, torch.zeros_like(w)).sum(0) / count.clamp(min=1).to(w.dtype)
    elif how == "max":
        out = torch.where(e, w, torch.full_like(w, float("-inf"))).amax(0)
    else:
        raise ValueError(f"unknown weight combination {how!r}; valid: ['max', 'mean']")
    return torch.where(count > 0, out, torch.zeros_like(out))
