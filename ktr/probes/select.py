"""Key-token selection (layer L1), docs/method.md section 2.

For one attribution signal, a token is key when its score reaches the ``1 - ratio`` quantile of its pool:
``thr = torch.quantile(scores[valid & finite], 1 - ratio)`` (linear interpolation) and
``mask = valid & (scores >= thr)``. The released pool is the group (all valid tokens of the G
completions of one prompt). Signals are then combined by union. A ``+inf`` score (the token impossible in the
perturbed pass) stays out of the quantile and is selected, as released; NaN and ``-inf`` never are.

The quantile is computed here by one batched sort over all pools instead of ``torch.quantile`` per
pool: it reproduces ``torch.quantile`` exactly (same float rank arithmetic and ``torch.lerp``, checked by
the tests), handles every pool at once, and has no 2**24-element input limit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ktr.config import Combine, Scope
from ktr.ops import check_mask, upcast

__all__ = ["COMBINERS", "SCOPES", "above_thresholds", "combine_masks", "pooled_quantile", "random_same_count",
           "context_representatives", "scope_thresholds", "select_scope", "select_top_ratio", "tie_equal_contexts",
           "top_ratio_thresholds"]


# torch.quantile converts the row length to the input's float dtype; beyond 2**24 float32 cannot hold
# every integer (torch.quantile refuses such inputs), so ranks are computed in float64 there.
_EXACT_FLOAT32_INT = 2**24


def pooled_quantile(values: Tensor, keep: Tensor, q: float) -> Tensor:
    """Per-row ``torch.quantile(values[p][keep[p]], q)``, linear interpolation, for every row at once.

    Args:
        values: ``[P, L]`` floating scores (one pool per row).
        keep: ``[P, L]`` bool, entries that belong to the pool.
        q: quantile level in ``[0, 1]``.
    Returns:
        ``[P]`` thresholds in ``values``' dtype; NaN for a row with no kept entry.
    """
    p, length = values.shape
    if length == 0:
        return values.new_full((p,), float("nan"))
    nan = torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    ordered = torch.sort(torch.where(keep, values, nan), dim=-1).values  # [P, L], NaN sorted last
    count = keep.sum(dim=-1, keepdim=True)  # [P, 1]
    rank_dtype = values.dtype if length <= _EXACT_FLOAT32_INT else torch.float64
    # As torch.quantile: q becomes a tensor of the input dtype, rank = q * (n - 1) in that dtype.
    ranks = (torch.tensor(q, dtype=rank_dtype, device=values.device) * (count - 1)).clamp_min(0)  # [P, 1]
    below = ranks.long()  # ranks >= 0, so truncation is floor
    above = ranks.ceil().long()
    weight = (ranks - below).to(values.dtype)
    low, high = ordered.gather(-1, below), ordered.gather(-1, above)  # [P, 1] each
    return torch.lerp(low, high, weight).squeeze(-1)  # [P]


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"`ratio` must be in [0, 1], got {ratio!r}")


def select_top_ratio(scores: Tensor, valid: Tensor, ratio: float, group_size: int | None = None) -> Tensor:
    """Boolean mask of the top-``ratio`` tokens of each pool (released Video-KTR rule).

    Args:
        scores: ``[N, T]`` attribution scores (any float dtype; bf16/fp16 are upcast to float32).
        valid: ``[N, T]`` bool completion tokens.
        ratio: fraction to keep, in ``[0, 1]`` (released: 0.2).
        group_size: ``None`` pools all rows together; ``G`` pools consecutive blocks of ``G`` rows
            (``N % G == 0``), the released per-prompt group; ``1`` makes every row its own pool.
    Returns:
        ``[N, T]`` bool: ``valid & (scores >= thr_pool)``.

    Behaviour at the edges, all following the quantile rule rather than a token count:
        * non-finite scores are left out of the quantile; ``+inf`` is then selected (it is above any threshold),
          nan and ``-inf`` never are (before 2026-12-08 ktr dropped ``+inf`` too);
        * a pool without a valid finite token selects nothing;
        * ``ratio = 1``: the threshold is the pool minimum, so every valid finite token is kept;
        * ``ratio = 0``: the threshold is the pool maximum, so the max-valued token(s) are kept, not none
          (this is what ``torch.quantile(..., 1.0)`` in the released code does);
        * ties at the threshold are all kept, so more than ``ratio`` of the pool can be selected.
    """
    return above_thresholds(scores, valid, top_ratio_thresholds(scores, valid, ratio, group_size))


def above_thresholds(scores: Tensor, valid: Tensor, thresholds: Tensor) -> Tensor:
    """`[N, T]` bool: valid scores at or above their row's threshold (`thresholds` `[N]`): ``+inf`` included,
    nan never (its comparisons are false), and nothing where the threshold is nan (a pool without a finite
    score)."""
    x = upcast(scores)  # [N, T]
    return valid & (x >= thresholds.unsqueeze(-1))


def top_ratio_thresholds(scores: Tensor, valid: Tensor, ratio: float, group_size: int | None = None) -> Tensor:
    """The threshold :func:`select_top_ratio` applies to each row: ``[N]`` float, its pool's quantile.

    Same arguments as :func:`select_top_ratio`; rows of one pool share a value; NaN where the pool has no
    valid finite token (nothing selected there). Scores are upcast as in the selection, so
    ``select_top_ratio(...) == valid & (upcast(s) >= thr[:, None])`` exactly.
    """
    _check_ratio(ratio)
    if scores.dim() != 2:
        raise ValueError(f"`scores` must be [N, T], got shape {tuple(scores.shape)}")
    check_mask(valid, scores, "valid")
    n, t = scores.shape
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or n % group_size):
        raise ValueError(f"`group_size` must be a positive int dividing N={n}, got {group_size!r}")
    x = upcast(scores)  # [N, T]
    if n == 0 or t == 0:
        return x.new_full((n,), float("nan"))
    keep = valid & torch.isfinite(x)  # [N, T]
    g = n if group_size is None else group_size
    thr = pooled_quantile(x.reshape(n // g, g * t), keep.reshape(n // g, g * t), 1.0 - ratio)  # [N // G]
    return thr.repeat_interleave(g)  # [N]


def tie_equal_contexts(scores: Tensor, tokens: Tensor, valid: Tensor, prompt_index: Tensor,
                       include_token: bool = True) -> Tensor:
    """Scores with every token of one context made bit-identical: the score of the context's first row.

    The G completions of a prompt often begin alike (always after a warm start), so their first tokens have the
    same context and, mathematically, the same score. Run as one row each (the released layout) those scores come
    out bit-identical and the quantile rule keeps or drops them together; in another layout (the packed
    shared-prefix row, another kernel or device) they differ in the last bits, and a threshold that falls among
    them keeps some copies and drops others. Copying one row's value to all rows of the same context restores
    the released ties in every layout (docs/fidelity.md, "Key-token ties").

    Args:
        scores: ``[N, T]`` attribution scores.
        tokens: ``[N, T]`` completion token ids.
        valid: ``[N, T]`` bool completion tokens.
        prompt_index: ``[N]`` rows with the same index share the prompt and its perturbation.
        include_token: the score depends on the token itself (``logp_diff``: contexts run through the token);
            False for functions of the next-token distribution (entropy, distribution distances), whose context
            ends before the token.
    Returns:
        ``[N, T]``: ``scores[r, t]`` where ``r`` is the lowest row of the same prompt, valid at ``t``, whose tokens
        before ``t`` (and at ``t`` with ``include_token``) equal row ``i``'s; invalid positions unchanged.
        Memory: an ``[N, N, T]`` bool temporary.
    """
    check_mask(valid, scores, "valid")
    return scores.gather(0, context_representatives(tokens, valid, prompt_index, include_token))


def context_representatives(tokens: Tensor, valid: Tensor, prompt_index: Tensor, include_token: bool = True) -> Tensor:
    """`[N, T]` long: for each valid token, the lowest row of the same prompt with the same context (the row whose
    score :func:`tie_equal_contexts` copies); the row itself at invalid positions. Arguments as there; the result
    depends only on the tokens, so one call serves every signal with the same `include_token`."""
    n = tokens.shape[0]
    rows = torch.arange(n, device=tokens.device)
    if tokens.numel() == 0:
        return rows.view(n, 1).expand(tokens.shape)
    same = (tokens.unsqueeze(1) == tokens.unsqueeze(0)) & valid.unsqueeze(1) & valid.unsqueeze(0)  # [N, N, T]
    through = same.cummin(dim=-1).values  # [N, N, T] equal and valid at every position <= t
    if include_token:
        equal = through
    else:  # equal before t, both valid at t
        equal = torch.cat([torch.ones_like(through[..., :1]), through[..., :-1]], dim=-1)
        equal &= valid.unsqueeze(1) & valid.unsqueeze(0)
    equal &= (prompt_index.unsqueeze(1) == prompt_index.unsqueeze(0)).unsqueeze(-1)
    first = torch.where(equal, rows.view(1, n, 1), n).amin(dim=1)  # [N, T]; row i itself when valid
    return torch.where(valid, first, rows.view(n, 1))


def _group_scope(group_size: int | None) -> int:
    if group_size is None:
        raise ValueError("scope 'group' needs `group_size` (G completions per prompt)")
    return group_size


# scope name -> pool size passed to select_top_ratio (None = one pool for the whole batch)
SCOPES: dict[str, Callable[[int | None], int | None]] = {
    "group": _group_scope,
    "sequence": lambda group_size: 1,
    "batch": lambda group_size: None,
}


def select_scope(
    scores: Tensor,
    valid: Tensor,
    ratio: float,
    scope: Scope = "group",
    group_size: int | None = None,
) -> Tensor:
    """:func:`select_top_ratio` with the pool named: ``group`` (released; needs ``group_size``),
    ``sequence`` (each row alone) or ``batch`` (all rows of this call). Returns ``[N, T]`` bool."""
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; valid: {sorted(SCOPES)}")
    return select_top_ratio(scores, valid, ratio, group_size=SCOPES[scope](group_size))


def scope_thresholds(scores: Tensor, valid: Tensor, ratio: float, scope: Scope = "group",
                     group_size: int | None = None) -> Tensor:
    """``[N]`` thresholds that :func:`select_scope` applies (see :func:`top_ratio_thresholds`)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown selection scope {scope!r}; valid: {sorted(SCOPES)}")
    return top_ratio_thresholds(scores, valid, ratio, group_size=SCOPES[scope](group_size))


COMBINERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "union": torch.logical_or,
    "intersection": torch.logical_and,
}


def combine_masks(masks: list[Tensor], how: Combine = "union") -> Tensor:
    """Combine per-signal key-token masks (each ``[N, T]`` bool); released: union ``M_V | M_E | M_T``."""
    if how not in COMBINERS:
        raise ValueError(f"unknown mask combination {how!r}; valid: {sorted(COMBINERS)}")
    if not masks:
        raise ValueError("combine_masks needs at least one mask")
    for i, m in enumerate(masks):
        check_mask(m, masks[0], f"masks[{i}]")
    return functools.reduce(COMBINERS[how], masks)


def random_same_count(mask: Tensor, valid: Tensor, group_size: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """The random-selection control: per group, as many valid tokens as ``mask`` keeps there, chosen uniformly.

    Args:
        mask: ``[N, T]`` bool, the key tokens to match (e.g. Video-KTR's union mask).
        valid: ``[N, T]`` bool completion tokens; only these can be drawn.
        group_size: ``G``, consecutive blocks of ``G`` rows form a group (``N % G == 0``).
        generator: CPU generator of the draw (default: the global RNG, reproducible under ``seed_everything``).
    Returns:
        ``[N, T]`` bool with ``out[group].sum() == (mask & valid)[group].sum()`` for every group, a uniformly
        random subset of that group's valid tokens.
    """
    check_mask(mask, valid, "mask")
    n, t = valid.shape
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"`group_size` must be a positive int dividing N={n}, got {group_size!r}")
    g = n // group_size
    pool = valid.reshape(g, group_size * t)  # [N / G, G * T]
    count = (mask & valid).reshape(g, group_size * t).sum(-1, keepdim=True)  # [N / G, 1]
    noise = torch.rand(pool.shape, generator=generator).to(valid.device)  # [N / G, G * T] in [0, 1)
    noise = noise.masked_fill(~pool, 2.0)  # invalid tokens rank last
    rank = noise.argsort(-1).argsort(-1)  # [N / G, G * T] rank of each token's noise in its group
    return (pool & (rank < count)).reshape(n, t)
