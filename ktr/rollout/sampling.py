"""Next-token logits processing for the rollout's own sampling loop (layer L1: torch only).

`process_logits` applies, in transformers' order, what `generate` applies for ktr's rollouts: suppressed
tokens, temperature, top-k, top-p (`SuppressTokensLogitsProcessor`, `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, with `min_tokens_to_keep=1`), so that the shared-prefix backend
samples from the same distribution as `generate`. Filtered entries hold `-inf`.

`nucleus_filter` is an exact top-p filter that avoids sorting the whole vocabulary (a full sort of
8 x 151,936 floats is a large share of CPU decode time): it sorts only the `torch.topk` candidates and falls
back to the full sort for the rows where the candidates cannot decide the kept set.

`choose_tokens` draws the next token two ways (`sampling.draw`): `multinomial` is `generate`'s own draw
(`torch.multinomial`, so that with one seed the shared backend reproduces `generate`'s tokens), and
`inverse_cdf` (`draw_inverse_cdf`) is one uniform number per row placed on the row's cumulative weights, the same
distribution at a tenth of the CPU cost: for one sample `torch.multinomial` draws an exponential variate for every
vocabulary entry (the exponential race, `argmax(p / E)`), about 0.1 s for 32 rows of 151,936 on a 2-core Xeon; the
laptop demo takes 248 s with it and 129 s with `inverse_cdf` (`scripts/bench_draw.py`, docs/bench_draw.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor

from ktr.config import SampleDraw
from ktr.ops import exp_shifted_

NUCLEUS_CANDIDATES = (64, 1024)
"""Candidate-set sizes tried in turn by `nucleus_filter` before the full sort."""
NUCLEUS_MARGIN = 1e-5
"""Probability mass by which a kept/removed decision must clear the `top_p` boundary to be taken from the
candidates. It bounds the float32 rounding of either computation (~1e-7 for a 151,936-entry softmax and
cumulative sum); decisions closer than this go to the full sort, i.e. to transformers' own arithmetic."""


def top_p_full_sort(scores: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """`scores` `[R, V]` with tokens outside the nucleus set to `-inf`: transformers' `TopPLogitsWarper`."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)  # [R, V] ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = 0
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)  # [R, V] back in vocabulary order
    return scores.masked_fill(remove, -float("inf"))


def _nucleus_from_candidates(scores: Tensor, top_p: float, k: int, min_tokens_to_keep: int,
                             lse: Tensor) -> tuple[Tensor, Tensor]:
    """The smallest kept score `[R, 1]` from the top-`k` candidates, and `[R]` bool: rows where it is exact.

    In exact arithmetic the full-sort filter keeps token j iff the mass strictly above it (in descending
    order) is below `top_p`, plus the `min_tokens_to_keep` most likely. A row is decided here when the cut
    falls inside the candidates, no tie of values straddles it (the full sort orders ties arbitrarily), and
    the masses on both sides of it clear the boundary by `NUCLEUS_MARGIN`. Then the kept set is exactly
    `scores >= threshold`. `lse` `[R, 1]`: log-sum-exp of each row.
    """
    values, _ = torch.topk(scores, k, dim=-1)  # [R, k] descending
    probs = (values.double() - lse.double()).exp()  # [R, k]
    above = probs.cumsum(-1) - probs  # [R, k] mass strictly above each candidate
    n_mass = (above < top_p).sum(-1)  # [R]: the kept prefix by mass (`above` is non-decreasing)
    n_keep = n_mass.clamp(min=min_tokens_to_keep)  # [R]
    inside = n_keep < k
    cut = n_keep.clamp(max=k - 1).unsqueeze(-1)  # [R, 1] first removed candidate
    last = (cut - 1).clamp(min=0)  # [R, 1] last kept candidate
    threshold = values.gather(-1, last)  # [R, 1]
    no_tie = threshold != values.gather(-1, cut)
    removed_clear = above.gather(-1, cut) - top_p > NUCLEUS_MARGIN
    kept_clear = (top_p - above.gather(-1, last) > NUCLEUS_MARGIN) | (n_keep > n_mass).unsqueeze(-1)
    return threshold, inside & (no_tie & removed_clear & kept_clear).squeeze(-1)


def _exp_shifted_rows(scores: Tensor) -> tuple[Tensor, Tensor]:
    """`exp(scores - top)` `[R, V]` and `top` `[R, 1]`, the row maximum (0 for an all `-inf` row), through
    `ktr.ops.exp_shifted_`: on CPU a peaked row's underflowing entries would otherwise take the exp kernel's slow
    path (a sixth of a 32-token decode's CPU time on the bench model); they read 0 (each below 1.2e-38 next to the
    row maximum's 1)."""
    top = scores.amax(dim=-1, keepdim=True)  # [R, 1]
    top = top.masked_fill(top.isinf(), 0.0)
    return exp_shifted_(scores - top), top


def _logsumexp(scores: Tensor) -> Tensor:
    """`[R, 1]` log-sum-exp of `scores` `[R, V]`, as `torch.logsumexp` computes it (row max, then the log of the
    summed shifted exponentials) but through `_exp_shifted_rows`. An all `-inf` row gives `-inf`."""
    weights, top = _exp_shifted_rows(scores)
    return weights.sum(dim=-1, keepdim=True).log_().add_(top)


def nucleus_filter(scores: Tensor, top_p: float, min_tokens_to_keep: int = 1,
                   candidates: tuple[int, ...] = NUCLEUS_CANDIDATES) -> Tensor:
    """`top_p_full_sort` (the same kept set), sorting only candidate sets where they suffice. `scores` `[R, V]`.

    Rows are tried with each candidate size in turn; rows no candidate set decides go to the full sort.
    """
    if top_p >= 1.0 or not scores.is_floating_point():
        return top_p_full_sort(scores, top_p, min_tokens_to_keep)
    threshold = torch.full_like(scores[:, :1], -float("inf"))  # [R, 1]
    todo = torch.arange(scores.shape[0], device=scores.device)  # rows still undecided
    lse = _logsumexp(scores)  # [R, 1]
    for k in candidates:
        k = min(k, scores.shape[-1])
        if todo.numel() == 0 or k <= min_tokens_to_keep:
            break
        thr, exact = _nucleus_from_candidates(scores[todo], top_p, k, min_tokens_to_keep, lse[todo])
        threshold[todo[exact]] = thr[exact]
        todo = todo[~exact]
    out = scores.masked_fill(scores < threshold, -float("inf"))
    if todo.numel():
        out[todo] = top_p_full_sort(scores[todo], top_p, min_tokens_to_keep)
    return out


def top_k_filter(scores: Tensor, top_k: int) -> Tensor:
    """`scores` `[R, V]` below the k-th largest set to `-inf` (transformers' `TopKLogitsWarper`)."""
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]  # [R, 1]
    return scores.masked_fill(scores < kth, -float("inf"))


def process_logits(logits: Tensor, suppress: Tensor, sample: bool, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, exact_nucleus: bool = True) -> Tensor:
    """Scores `[R, V]` float32 to sample (or argmax) from, as transformers' `generate` builds them.

    `suppress` `[n]` long: token ids never produced. Warpers apply only when sampling, and only when active
    (temperature != 1, top_k > 0, top_p < 1), as in `generate`. `exact_nucleus=False` uses the full sort.
    """
    scores = logits.float()
    scores = scores.index_fill(-1, suppress, -float("inf"))
    if not sample:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = nucleus_filter(scores, top_p) if exact_nucleus else top_p_full_sort(scores, top_p)
    return scores


def inverse_cdf_index(cdf: Tensor, u: Tensor) -> Tensor:
    """`[R]` index of the first entry of each row of `cdf` `[R, V]` (non-decreasing, last entry > 0) above
    `u` `[R, 1]` (in `[0, cdf[:, -1])`): the token whose cumulative-weight interval holds `u`.

    An entry of zero weight has the same cumulative value as the entry before it, so it can never be the first
    one above `u`. `u` is kept in `[0, total)` (a rounding of `U * total` can reach the total, and a position
    inside a block computed as a difference can fall a rounding below 0), so the index is always a token of
    positive weight."""
    total = cdf[:, -1:]  # [R, 1]
    u = torch.minimum(u.clamp(min=0.0), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u.contiguous(), right=True).squeeze(1)


DRAW_BLOCK = 1024
"""Vocabulary entries per block of `draw_inverse_cdf` (the first draw picks a block, the second a token in it)."""


def draw_inverse_cdf(scores: Tensor, generator: torch.Generator | None = None, block: int = DRAW_BLOCK) -> Tensor:
    """`[R]` one token per row of `scores` `[R, V]` (float, `-inf` = filtered), drawn from `softmax(scores)`.

    One uniform number per row (`torch.rand`, float64) is placed on the row's cumulative weights
    `exp(scores - max)` in two steps, which keeps the work to a few passes over the row: the float32 sums of
    `block`-entry blocks, accumulated in float64, pick a block; the number's position inside that block's sum then
    picks a token from the block's own cumulative weights in float64. A token's chance is its weight over the row's
    sum up to the rounding of its block's float32 sum (~1e-7 relative, as fine as `torch.multinomial`'s float32
    race); a float32 cumulative sum over the whole row would instead move a flat 151,936-entry row's chances by
    about 1%. Entries below 1.2e-38 of the row maximum read 0 (`_exp_shifted_rows`). The random stream differs
    from `torch.multinomial`'s, so one seed draws other tokens than `generate`; the distribution is the same."""
    weights, _ = _exp_shifted_rows(scores.float())  # [R, V] float32, max 1 per row, 0 where filtered
    r, v = weights.shape
    full = v // block * block
    sums = weights[:, :full].reshape(r, v // block, block).sum(-1)  # [R, nb] float32
    if full < v:  # a last, shorter block
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], dim=-1)
    sums = sums.to(torch.float64)
    outer = sums.cumsum(-1)  # [R, nb]
    u = torch.rand((r, 1), dtype=torch.float64, device=scores.device, generator=generator) * outer[:, -1:]
    chosen = inverse_cdf_index(outer, u)  # [R] block of each row
    block_sum = sums.gather(1, chosen[:, None])  # [R, 1]
    before = outer.gather(1, chosen[:, None]) - block_sum  # [R, 1] weight of the blocks before it
    frac = (u - before) / block_sum  # [R, 1] position inside the block's sum, in [0, 1)
    cols = chosen[:, None] * block + torch.arange(block, device=scores.device)  # [R, block]
    inner = weights.gather(1, cols.clamp(max=v - 1)).masked_fill(cols >= v, 0.0)  # [R, block]
    inner = inner.to(torch.float64).cumsum_(-1)  # [R, block]
    return chosen * block + inverse_cdf_index(inner, frac * inner[:, -1:])


def draw_multinomial(scores: Tensor) -> Tensor:
    """`[R]` one token per row of `scores` `[R, V]` drawn by `torch.multinomial`, as `generate` draws."""
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


DRAWS: dict[str, Callable[[Tensor], Tensor]] = {"multinomial": draw_multinomial, "inverse_cdf": draw_inverse_cdf}
"""`sampling.draw` -> the function drawing one token per row from `softmax(scores)`."""
assert set(DRAWS) == set(get_args(SampleDraw)), "SampleDraw and DRAWS must name the same draws"


def choose_tokens(scores: Tensor, sample: bool, draw: str = "multinomial") -> Tensor:
    """`[R]` next tokens from `softmax(scores)` by the draw `DRAWS[draw]`, or the argmax when not `sample`."""
    if not sample:
        return scores.argmax(-1)
    if draw not in DRAWS:
        raise ValueError(f"unknown draw {draw!r}; valid: {sorted(DRAWS)}")
    return DRAWS[draw](scores)
