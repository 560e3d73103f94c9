"""Score functions of the attribution probes (layer L1), docs/method.md section 1.4 and the paper's score ablation.

A probe compares the policy with the media seen (``P``, the policy pass) and with the media perturbed (``Q``,
the probe's pass). ``logp_diff`` (released, the default) is the signed difference of the sampled token's
log-probabilities ``log P(y_t) - log Q(y_t)`` and costs nothing beyond the probe's own log-probs. The others
are distances between the two full next-token distributions over the whole vocabulary:

==============  ==========================================================  ===========
name            definition (per token, ``p = P(.)``, ``q = Q(.)``)           range
==============  ==========================================================  ===========
``kl``          ``KL(P || Q) = sum_v p_v (log p_v - log q_v)``               ``[0, inf)``
``js``          ``0.5 KL(P || M) + 0.5 KL(Q || M)``, ``M = (P + Q) / 2``     ``[0, log 2]``
``l1``          ``sum_v |p_v - q_v|``                                        ``[0, 2]``
``l2``          ``sqrt(sum_v (p_v - q_v)^2)``                                ``[0, sqrt 2]``
``cosine``      ``1 - <p, q> / (|p| |q|)`` (a distance: 0 when equal)        ``[0, 1]``
``hellinger``   ``sqrt(0.5 sum_v (sqrt p_v - sqrt q_v)^2)``                  ``[0, 1]``
==============  ==========================================================  ===========

KL direction: ``P`` is the unperturbed policy (the distribution the tokens were sampled from), ``Q`` the
perturbed one, as in the authors' early `kl` experiment (``sum p * (logp_full - logp_masked)``). The distances
are computed chunk by chunk from the two passes' final hidden states through the output projection, so no
``[N, T, V]`` tensor exists: each chunk holds two ``[c, V]`` float32 log-softmaxes and a few same-sized
temporaries. The projection runs in the weight's dtype (as in the policy pass); softmax and distances in
float32. Everything here is under ``no_grad``: scores never carry gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ktr.config import DEFAULT_CHUNK_SIZE
from ktr.ops import project_logits

__all__ = ["DISTRIBUTION_SCORES", "SCORE_FUNCTIONS", "distribution_distance", "distribution_scores",
           "naive_distribution_scores"]

# logp [c, V], logq [c, V] (float32 log-softmaxes) -> [c]
Distance = Callable[[Tensor, Tensor], Tensor]


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def _js(logp: Tensor, logq: Tensor) -> Tensor:
    logm = torch.logaddexp(logp, logq) - math.log(2.0)  # [c, V] log((p + q) / 2)
    return 0.5 * (logp.exp() * (logp - logm)).sum(-1) + 0.5 * (logq.exp() * (logq - logm)).sum(-1)


def _l1(logp: Tensor, logq: Tensor) -> Tensor:
    return (logp.exp() - logq.exp()).abs().sum(-1)


def _l2(logp: Tensor, logq: Tensor) -> Tensor:
    return (logp.exp() - logq.exp()).square().sum(-1).sqrt()


def _cosine(logp: Tensor, logq: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(logp.exp(), logq.exp(), dim=-1, eps=1e-12)


def _hellinger(logp: Tensor, logq: Tensor) -> Tensor:
    return (0.5 * ((0.5 * logp).exp() - (0.5 * logq).exp()).square().sum(-1)).sqrt()


DISTRIBUTION_SCORES: dict[str, Distance] = {
    "kl": _kl,
    "js": _js,
    "l1": _l1,
    "l2": _l2,
    "cosine": _cosine,
    "hellinger": _hellinger,
}
SCORE_FUNCTIONS = ("logp_diff", *DISTRIBUTION_SCORES)
"""Every `key_tokens.<signal>.score` name: the released log-prob difference, then the distances."""


def distribution_distance(name: str) -> Distance:
    if name not in DISTRIBUTION_SCORES:
        raise ValueError(f"unknown distribution score {name!r}; valid: {sorted(DISTRIBUTION_SCORES)}")
    return DISTRIBUTION_SCORES[name]


def _log_softmax(h: Tensor, weight: Tensor, bias: Tensor | None, float32_logits: bool = False) -> Tensor:
    """Float32 ``[c, V]`` log-softmax of ``h [c, H]`` through the projection ``weight [V, H]`` (its rounding:
    :func:`ktr.ops.project_logits`)."""
    return project_logits(h.to(weight.dtype), weight, bias, float32_logits).log_softmax(-1)


@torch.no_grad()
def distribution_scores(base_hidden: Tensor, perturbed_hidden: Tensor, weight: Tensor, mask: Tensor, name: str,
                        *, bias: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        float32_logits: bool = False) -> Tensor:
    """Distance ``name`` between ``P`` (from ``base_hidden``) and ``Q`` (from ``perturbed_hidden``) per token.

    Args:
        base_hidden: ``[N, T, H]`` final hidden states of the unperturbed policy pass (``P``).
        perturbed_hidden: ``[N, T, H]`` the same positions in the probe's pass (``Q``).
        weight: ``[V, H]`` output projection; bias: ``[V]`` or None.
        mask: ``[N, T]`` bool tokens to score (others read 0 and cost nothing).
        name: a key of ``DISTRIBUTION_SCORES``.
        chunk_size: tokens projected at a time (two ``[chunk_size, V]`` float32 buffers and temporaries).
        float32_logits: round a low-precision projection to float32 only (``policy.head_logits``).
    Returns:
        ``[N, T]`` float32 distances, 0 outside ``mask``, without grad.
    """
    dist = distribution_distance(name)
    if base_hidden.shape != perturbed_hidden.shape or base_hidden.dim() != 3:
        raise ValueError(f"hidden states must be equal [N, T, H] shapes, got {tuple(base_hidden.shape)} and "
                         f"{tuple(perturbed_hidden.shape)}")
    if mask.dtype != torch.bool or mask.shape != base_hidden.shape[:2]:
        raise ValueError(f"`mask` must be bool [N, T]={tuple(base_hidden.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pos = mask.reshape(-1).nonzero().squeeze(1)  # [M]
    hp = base_hidden.reshape(-1, base_hidden.shape[-1]).index_select(0, pos)  # [M, H]
    hq = perturbed_hidden.reshape(-1, perturbed_hidden.shape[-1]).index_select(0, pos)  # [M, H]
    out = torch.zeros(pos.shape[0], dtype=torch.float32, device=base_hidden.device)  # [M]
    for start in range(0, pos.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        out[sl] = dist(_log_softmax(hp[sl], weight, bias, float32_logits),
                       _log_softmax(hq[sl], weight, bias, float32_logits))
    flat = torch.zeros(mask.numel(), dtype=torch.float32, device=base_hidden.device)
    return flat.index_put_((pos,), out).view(mask.shape)


@torch.no_grad()
def naive_distribution_scores(base_hidden: Tensor, perturbed_hidden: Tensor, weight: Tensor, mask: Tensor,
                              name: str, *, bias: Tensor | None = None, float32_logits: bool = False) -> Tensor:
    """Reference for :func:`distribution_scores` that materialises ``[N, T, V]`` (tests only)."""
    logp = _log_softmax(base_hidden, weight, bias, float32_logits)  # [N, T, V]
    logq = _log_softmax(perturbed_hidden, weight, bias, float32_logits)  # [N, T, V]
    n, t, v = logp.shape
    d = distribution_distance(name)(logp.reshape(n * t, v), logq.reshape(n * t, v)).view(n, t)
    return d.masked_fill(~mask, 0.0)
