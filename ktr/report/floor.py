"""The noise floor of `ktr explain` pages: which selected tokens stand clear of noise (layer L2, torch only).

Training selects the top `ratio` of each pool whatever the scores are, so a page of one short answer always
marks some tokens, even when every score is 1e-5, and can mark a token whose temporal score is negative
(shuffling the frames *raised* its probability). An explain page claims more than training does: "this
token depends on the video". So `ktr explain` marks a token for a signal only when all three hold:

1. the training rule selects it (top `ratio` of its pool, `ktr.probes.select`), so a page never marks more
   than training would train;
2. its score is positive: a perturbation that raised the token's probability is not a dependence;
3. its score clears the pool's noise floor, `max(min_score, median + mads * 1.4826 * MAD)`, the median and
   MAD (median absolute deviation) over the same pool's valid scores. `1.4826 * MAD` estimates the standard
   deviation of the bulk of the pool without being pulled by the few tokens that do depend, so with
   `mads = 3` a token must stand more than three standard deviations above the typical token of its own
   answer(s): under Gaussian noise about 0.13 % of tokens pass by chance. `min_score` (0.01 by default: a
   1 % change of probability for log-probability differences, 0.01 nats of entropy) stops a pool whose
   scores are all tiny, with a tinier spread, from marking its largest crumbs.

Below `MIN_POOL_TOKENS` tokens in a pool the page says its statistics rest on too few tokens: with 50
tokens the 20 % quantile moves by about 6 points of rank from one sample to the next and the MAD by about a
quarter; with fewer, both are rough. The training path (`ktr.probes.keytokens`) is untouched: these are
explain's marks only, and the page shows both (the tooltip says when the rule selected a token the floor
left unmarked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ktr.config import KeyTokenConfig
from ktr.probes.select import SCOPES, combine_masks, pooled_quantile

NOISE_MADS = 3.0
"""How many robust standard deviations (1.4826 * MAD) above the pool's median a marked score must be."""
MIN_SCORE = 0.01
"""The floor's lower bound, in the score's unit (nats for log-probability differences and entropy)."""
MIN_POOL_TOKENS = 50
"""A pool with fewer valid tokens makes the page say its statistics rest on too few tokens."""
_MAD_TO_SD = 1.4826  # MAD of a normal distribution * 1.4826 = its standard deviation


@dataclass
class NoiseFloor:
    """What `ktr explain` marks, next to what the training rule selected (`KeyTokens` of the same answers)."""

    masks: dict[str, Tensor]  # signal -> [N, T] bool: marked (rule & positive & above the floor)
    mask: Tensor  # [N, T] bool: the marked signals combined as the config combines them
    floors: dict[str, Tensor]  # signal -> [N] float: the row's pool floor (NaN: empty pool)
    pool_tokens: dict[str, Tensor]  # signal -> [N] long: valid finite scores in the row's pool
    mads: float = NOISE_MADS
    min_score: float = MIN_SCORE
    min_pool_tokens: int = MIN_POOL_TOKENS


def pool_floors(scores: Tensor, eligible: Tensor, pool: int | None, mads: float = NOISE_MADS,
                min_score: float = MIN_SCORE) -> tuple[Tensor, Tensor]:
    """Per row, its pool's noise floor `max(min_score, median + mads * 1.4826 * MAD)` and its token count.

    Args:
        scores: `[N, T]` one signal's scores.
        eligible: `[N, T]` bool, the tokens of the pools (valid; video rows only for the temporal signal).
        pool: rows per pool (`None`: one pool of all rows), as `ktr.probes.select.SCOPES` gives it.
    Returns:
        `[N]` float floors (NaN where the pool has no finite eligible score) and `[N]` long counts.
    """
    n, t = scores.shape
    x = scores.detach().float()
    keep = eligible & torch.isfinite(x)
    g = n if pool is None else pool
    if n == 0 or t == 0:
        return x.new_full((n,), float("nan")), torch.zeros(n, dtype=torch.long)
    xs, ks = x.reshape(n // g, g * t), keep.reshape(n // g, g * t)
    median = pooled_quantile(xs, ks, 0.5)  # [P]
    mad = pooled_quantile((xs - median.unsqueeze(-1)).abs(), ks, 0.5)  # [P]
    floor = torch.clamp(median + mads * _MAD_TO_SD * mad, min=min_score)  # NaN stays NaN: nothing passes
    return floor.repeat_interleave(g), ks.sum(-1).repeat_interleave(g)


def noise_floor(key_masks: dict[str, Tensor], scores: dict[str, Tensor], valid: Tensor, video_rows: Tensor,
                cfg: KeyTokenConfig, group_size: int, mads: float = NOISE_MADS,
                min_score: float = MIN_SCORE) -> NoiseFloor:
    """The marks of an explain page from the training rule's per-signal masks (`KeyTokens.masks`) and scores.

    `valid` `[N, T]` bool, `video_rows` `[N]` bool (the temporal signal pools video rows only, as in training).
    The pools are the config's (`cfg.scope`); marked signals combine as `cfg.combine` does in training.
    """
    pool = SCOPES[cfg.scope](group_size)
    masks, floors, counts = {}, {}, {}
    for name, s in scores.items():
        eligible = valid & video_rows.unsqueeze(-1) if name == "temporal" else valid
        floors[name], counts[name] = pool_floors(s, eligible, pool, mads, min_score)
        x = s.detach().float()
        masks[name] = key_masks[name] & eligible & (x > 0) & (x >= floors[name].unsqueeze(-1))
    if not masks:
        mask = torch.zeros_like(valid)
    elif cfg.combine == "union" or "temporal" not in masks or len(masks) == 1:
        mask = combine_masks(list(masks.values()), cfg.combine)
    else:  # intersection: image rows have no temporal signal (as `select_key_tokens`)
        others = combine_masks([m for k, m in masks.items() if k != "temporal"], "intersection")
        mask = torch.where(video_rows.unsqueeze(-1), others & masks["temporal"], others)
    return NoiseFloor(masks=masks, mask=mask & valid, floors=floors, pool_tokens=counts, mads=mads,
                      min_score=min_score)
